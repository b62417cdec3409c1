"""Tests of BreastDLRLib.evaluation.stats against published results of independent implementations
(R's pROC, vcd, stats; SAS PROC FREQ; Newcombe 1998) and against brute-force computations.

pROC's aSAH data (113 patients: 41 "Poor" outcome = cases, 72 "Good" = controls) is not shipped with
BreastDLR.  pROC's own test suite publishes the DeLong placements of every patient for the three
markers (tests/testthat/helper-deLongPlacementsCpp-expected.R in github.com/xrobin/pROC, commit
13bdf2cf3cb3b941e890a57742999fa37e3f66fa): X[i] = share of controls below case i (ties 1/2), Y[j] =
share of cases above control j, in data order.  They are stored below as whole numbers
(144*X = 2*72*X and 82*Y = 2*41*Y).  ``_scores_from_placements`` rebuilds ordinal scores that order
every case against every control exactly as the real marker does (checked by the first test), which
fixes the AUC, DeLong variance, paired DeLong test, sensitivities and specificities: everything
compared here.  Expected values are pROC's own (tests/testthat/test-var.R, test-ci.auc.R,
test-roc.test.R, helper-coords-expected.R at commit ee2877e858bcd2757c05ce797ea64ade2c05885b).
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as st

from BreastDLRLib.evaluation import (
    EvaluationInputError,
    binary_metrics,
    calibration_curve,
    cohen_kappa,
    delong_placements,
    delong_test,
    fleiss_kappa,
    mcnemar,
    net_benefit,
    proportion_ci,
    roc_auc,
    roc_curve,
    youden_threshold,
)

# ----------------------------------------------------------------------------- pROC aSAH placements
_ASAH_144X = {
    "ndka": "116 90 98 110 6 40 74 134 140 134 134 58 104 124 24 36 102 2 144 124 62 74 80 102 128 93 124 36 "
            "142 109 6 49 124 6 48 134 76 104 138 74 110",
    "wfns": "117 94 128 140 140 140 140 94 140 94 37 94 140 128 128 94 140 140 140 94 140 94 140 94 128 140 128 "
            "128 37 128 128 94 94 140 140 94 94 140 140 140 140",
    "s100b": "81 63 103 78 130 144 140 26 123 50 26 128 126 139 144 118 144 144 144 26 144 120 0 50 116 144 118 "
             "144 38 118 81 63 74 116 144 88 144 121 144 144 130",
}
_ASAH_82Y = {
    "ndka": "82 68 72 58 74 33 74 26 42 26 28 6 66 74 48 74 74 2 46 62 62 26 80 72 74 63 44 72 34 8 72 74 48 66 "
            "72 44 16 18 60 50 4 74 28 62 58 58 34 80 28 48 66 58 26 58 50 72 62 58 16 68 48 45 8 52 48 66 16 60 "
            "38 18 74 42",
    "wfns": "80 80 80 80 18 80 66 66 80 66 66 80 80 80 66 80 66 80 80 53 44 80 44 80 18 18 80 80 66 44 80 80 66 "
            "66 80 66 80 66 66 80 80 80 80 66 80 66 80 80 53 66 44 66 80 44 80 80 18 44 66 66 80 80 80 53 80 66 "
            "66 44 44 80 80 80",
    "s100b": "58 55 66 80 28 52 66 66 80 73 80 70 63 77 52 77 63 58 52 80 53 55 36 70 24 28 53 77 32 28 63 73 70 "
             "73 80 58 66 55 54 80 80 70 80 70 73 53 70 73 37 63 42 77 66 39 77 80 48 34 66 54 73 55 66 77 80 52 "
             "54 28 52 54 24 27",
}
_N_CASES, _N_CONTROLS = 41, 72


def _ints(text: str) -> np.ndarray:
    return np.array([int(v) for v in text.split()])


def _scores_from_placements(x2: np.ndarray, y2: np.ndarray) -> np.ndarray:
    """Ordinal scores (cases first, then controls) that reproduce the given doubled placements.

    Merges case levels (ascending X) with control levels (ascending value = descending Y): the next
    case level lies below, ties with, or lies above the next control level when its doubled X equals
    2*placed, 2*placed + (controls at that level), or more.
    """
    case_levels = sorted(set(x2.tolist()))
    ctrl_levels = sorted(set(y2.tolist()), reverse=True)
    case_val, ctrl_val = {}, {}
    placed = rank = i = j = 0
    while i < len(case_levels) or j < len(ctrl_levels):
        if j == len(ctrl_levels):
            case_val[case_levels[i]] = rank
            i += 1
        else:
            n_d = int(np.sum(y2 == ctrl_levels[j]))
            c = case_levels[i] if i < len(case_levels) else None
            if c is not None and c == 2 * placed:
                case_val[c] = rank
                i += 1
            elif c is not None and c == 2 * placed + n_d:
                case_val[c] = ctrl_val[ctrl_levels[j]] = rank
                i, j, placed = i + 1, j + 1, placed + n_d
            else:
                ctrl_val[ctrl_levels[j]] = rank
                j, placed = j + 1, placed + n_d
        rank += 1
    return np.array([case_val[v] for v in x2.tolist()] + [ctrl_val[v] for v in y2.tolist()], dtype=float)


@pytest.fixture(scope="module")
def asah():
    y = np.r_[np.ones(_N_CASES, int), np.zeros(_N_CONTROLS, int)]
    scores = {k: _scores_from_placements(_ints(_ASAH_144X[k]), _ints(_ASAH_82Y[k])) for k in _ASAH_144X}
    return y, scores


def test_asah_scores_reproduce_pROC_placements(asah):
    y, scores = asah
    for marker, s in scores.items():
        _, v10, v01 = delong_placements(y, s)
        assert np.array_equal(np.round(v10 * 144).astype(int), _ints(_ASAH_144X[marker])), marker
        assert np.array_equal(np.round(v01 * 82).astype(int), _ints(_ASAH_82Y[marker])), marker
        np.testing.assert_allclose(v10 * 144, np.round(v10 * 144), atol=1e-9)


# pROC test-var.R: var(r.marker) (DeLong); AUCs from the placements file (theta)
@pytest.mark.parametrize("marker, auc, var", [
    ("wfns", 0.823678861788618, 0.00146991470882363),
    ("ndka", 0.611957994579946, 0.0031908105493913),
    ("s100b", 0.731368563685637, 0.00266868245717244),
])
def test_auc_and_delong_variance_match_pROC(asah, marker, auc, var):
    y, scores = asah
    r = roc_auc(y, scores[marker])
    assert r.auc == pytest.approx(auc, abs=1e-12)
    assert r.variance == pytest.approx(var, rel=1e-10)
    assert (r.n_cases, r.n_controls) == (41, 72)


def test_delong_ci_matches_pROC_ci_auc(asah):
    y, scores = asah
    # pROC test-ci.auc.R: expected.ci.auc for r.ndka
    r = roc_auc(y, scores["ndka"], method="delong", level=0.95)
    assert (r.ci_low, r.auc, r.ci_high) == pytest.approx((0.501244999271703, 0.611957994579946, 0.722670989888189),
                                                         abs=1e-12)
    # pROC documentation: ci(roc(aSAH$outcome, aSAH$s100b)) -> 95% CI: 0.6301-0.8326 (DeLong)
    r = roc_auc(y, scores["s100b"])
    assert round(r.ci_low, 4) == 0.6301 and round(r.ci_high, 4) == 0.8326
    # a wider level gives a wider, still symmetric interval
    r90, r99 = roc_auc(y, scores["s100b"], level=0.90), roc_auc(y, scores["s100b"], level=0.99)
    assert r99.ci_low < r.ci_low < r90.ci_low and r90.ci_high < r.ci_high < r99.ci_high
    assert r90.auc - r90.ci_low == pytest.approx(st.norm.ppf(0.95) * np.sqrt(r90.variance))


# pROC test-roc.test.R: t1 = roc.test(r.wfns, r.s100b), t2 = (r.wfns, r.ndka), t3 = (r.ndka, r.s100b)
@pytest.mark.parametrize("a, b, z, p, lo, hi", [
    ("wfns", "s100b", 2.20898359144091, 0.0271757822291882, 0.0104061769564846, 0.174214419249478),
    ("wfns", "ndka", 2.79777591868904, 0.00514557970691098, 0.0634011709339876, 0.3600405634833566),
    ("ndka", "s100b", -1.39077002573558, 0.164295175223054, -0.2876917446341914, 0.0488706064228094),
])
def test_delong_test_matches_pROC_roc_test(asah, a, b, z, p, lo, hi):
    y, scores = asah
    t = delong_test(y, scores[a], scores[b])
    assert t.z == pytest.approx(z, rel=1e-10)
    assert t.p_value == pytest.approx(p, rel=1e-9)
    assert (t.ci_low, t.ci_high) == pytest.approx((lo, hi), abs=1e-12)
    assert t.auc_a == pytest.approx(roc_auc(y, scores[a]).auc)
    assert t.auc_b == pytest.approx(roc_auc(y, scores[b]).auc)
    swapped = delong_test(y, scores[b], scores[a])
    assert swapped.z == pytest.approx(-t.z) and swapped.p_value == pytest.approx(t.p_value)


def test_delong_test_of_identical_curves_is_z0_p1(asah):
    # pROC test-roc.test.R: roc.test(r.wfns, r.wfns) has Z = 0, p = 1
    y, scores = asah
    for s in (scores["wfns"], 3.0 * scores["wfns"] + 7.0):  # also a monotone transform: same ROC
        t = delong_test(y, scores["wfns"], s)
        assert (t.z, t.p_value) == (0.0, 1.0)


def test_youden_matches_pROC_coords_best(asah):
    # pROC helper-coords-expected.R: coords(r.s100b, "best") is threshold 0.205 with specificity 58/72
    # and sensitivity 26/41 (Youden 0.4397)
    y, scores = asah
    r = youden_threshold(y, scores["s100b"])
    assert r.sensitivity == pytest.approx(26 / 41) and r.specificity == pytest.approx(58 / 72)
    assert r.youden == pytest.approx(26 / 41 + 58 / 72 - 1)
    u = np.unique(scores["s100b"])
    k = np.searchsorted(u, r.threshold)
    assert r.threshold == pytest.approx((u[k - 1] + u[k]) / 2)  # midway between neighbouring scores


# ------------------------------------------------------------------------------ AUC invariants
def _tied_data(rng, n=60, levels=8, shift=1.0):
    y = np.r_[np.ones(n // 3, int), np.zeros(n - n // 3, int)]
    s = np.round(rng.normal(size=n) + shift * y, 1) * (levels / 8)
    return y, np.round(s * 4) / 4  # coarse grid: many ties within and across classes


def _psi(cases, controls):
    return (cases[:, None] > controls[None, :]) + 0.5 * (cases[:, None] == controls[None, :])


def test_delong_variance_equals_bruteforce_structural_components():
    rng = np.random.default_rng(7)
    for _ in range(5):
        y, s = _tied_data(rng)
        psi = _psi(s[y == 1], s[y == 0])
        m, n = psi.shape
        v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
        auc = psi.mean()
        s10 = ((v10 - auc) ** 2).sum() / (m - 1)
        s01 = ((v01 - auc) ** 2).sum() / (n - 1)
        r = roc_auc(y, s)
        assert r.auc == pytest.approx(auc, abs=1e-14)
        assert r.variance == pytest.approx(s10 / m + s01 / n, rel=1e-12)
        half = st.norm.ppf(0.975) * np.sqrt(r.variance)
        assert (r.ci_low, r.ci_high) == pytest.approx((max(0, auc - half), min(1, auc + half)))


def test_delong_test_equals_bruteforce_covariance():
    rng = np.random.default_rng(11)
    y, a = _tied_data(rng)
    b = np.round(a + rng.normal(scale=1.0, size=a.size), 1)
    pa, pb = _psi(a[y == 1], a[y == 0]), _psi(b[y == 1], b[y == 0])
    m, n = pa.shape
    xa, xb, ya, yb = pa.mean(1), pb.mean(1), pa.mean(0), pb.mean(0)
    cov = lambda u, v: ((u - u.mean()) * (v - v.mean())).sum() / (u.size - 1)  # noqa: E731
    var = (cov(xa, xa) + cov(xb, xb) - 2 * cov(xa, xb)) / m + (cov(ya, ya) + cov(yb, yb) - 2 * cov(ya, yb)) / n
    z = (pa.mean() - pb.mean()) / np.sqrt(var)
    t = delong_test(y, a, b)
    assert t.z == pytest.approx(z, rel=1e-12)
    assert t.p_value == pytest.approx(2 * st.norm.sf(abs(z)), rel=1e-12)


def test_auc_symmetries_and_extremes():
    rng = np.random.default_rng(3)
    y, s = _tied_data(rng)
    r = roc_auc(y, s)
    assert roc_auc(y, 1 - s).auc == pytest.approx(1 - r.auc, abs=1e-14)
    assert roc_auc(1 - y, s).auc == pytest.approx(1 - r.auc, abs=1e-14)
    assert roc_auc(y.astype(bool), s) == r  # bool labels give the same result
    perfect = roc_auc([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.8, 0.9])
    assert (perfect.auc, perfect.variance, perfect.ci_low, perfect.ci_high) == (1.0, 0.0, 1.0, 1.0)
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]).auc == 0.0  # no automatic flipping
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]).auc == 0.5  # ties count 1/2
    assert roc_auc([0, 1, 1], [0.5, 0.5, 0.7]).auc == pytest.approx(0.75)


def test_delong_hand_example_and_clipping():
    # cases 3, 5, 6 vs controls 1, 2, 4: V10 = (2/3, 1, 1), V01 = (1, 1, 2/3); each sample variance is
    # 1/27, so var = 1/27/3 + 1/27/3 = 2/81; the upper limit 8/9 + 1.96*sqrt(2/81) > 1 is clipped to 1
    r = roc_auc([0, 0, 0, 1, 1, 1], [1, 2, 4, 3, 5, 6])
    assert r.auc == pytest.approx(8 / 9) and r.variance == pytest.approx(2 / 81)
    assert r.ci_high == 1.0 and r.ci_low == pytest.approx(8 / 9 - st.norm.ppf(0.975) * np.sqrt(2 / 81))
    flipped = roc_auc([1, 1, 1, 0, 0, 0], [1, 2, 4, 3, 5, 6])
    assert flipped.auc == pytest.approx(1 / 9) and flipped.ci_low == 0.0


def test_youden_ties_take_the_lowest_threshold():
    # thresholds 1.5 (sens 1, spec 1/2) and 3.5 (sens 1/2, spec 1) both give J = 1/2
    r = youden_threshold([0, 1, 0, 1], [1, 2, 3, 4])
    assert (r.threshold, r.sensitivity, r.specificity, r.youden) == (1.5, 1.0, 0.5, 0.5)


def test_bootstrap_ci_is_seeded_and_agrees_with_naive_resampling():
    rng = np.random.default_rng(5)
    y, s = _tied_data(rng, n=90)
    r1 = roc_auc(y, s, method="bootstrap", n_boot=2000, seed=1)
    assert r1 == roc_auc(y, s, method="bootstrap", n_boot=2000, seed=1)
    assert r1 != roc_auc(y, s, method="bootstrap", n_boot=2000, seed=2)
    assert r1.ci_low < r1.auc < r1.ci_high
    assert r1.variance == roc_auc(y, s).variance  # variance stays DeLong's
    # independent reference: resample case and control indices separately, brute-force AUC
    cases, controls = s[y == 1], s[y == 0]
    g = np.random.default_rng(99)
    aucs = [_psi(g.choice(cases, cases.size), g.choice(controls, controls.size)).mean() for _ in range(2000)]
    lo, hi = np.quantile(aucs, [0.025, 0.975])
    assert r1.ci_low == pytest.approx(lo, abs=0.02) and r1.ci_high == pytest.approx(hi, abs=0.02)
    # exact cases: every resample of all-tied scores has AUC 1/2, of separated scores AUC 1
    tied = roc_auc([0, 1, 0, 1, 1], [2.0] * 5, method="bootstrap", n_boot=50)
    assert (tied.ci_low, tied.ci_high) == (0.5, 0.5)
    sep = roc_auc([0, 1, 0, 1, 1], [1, 5, 2, 6, 7], method="bootstrap", n_boot=50)
    assert (sep.ci_low, sep.ci_high) == (1.0, 1.0)
    d = roc_auc(y, s)
    assert r1.ci_low == pytest.approx(d.ci_low, abs=0.04) and r1.ci_high == pytest.approx(d.ci_high, abs=0.04)


@pytest.mark.parametrize("y, s", [
    ([1, 1, 1], [0.1, 0.2, 0.3]),
    ([0, 0], [0.1, 0.2]),
    ([0, 2, 1], [0.1, 0.2, 0.3]),
    ([0, 1, 1], [0.1, np.nan, 0.3]),
    ([0, 1, 1], [0.1, 0.2]),
    (["a", "b"], [0.1, 0.2]),
])
def test_roc_auc_refuses_bad_input_with_valueerror(y, s):
    with pytest.raises(ValueError):
        roc_auc(y, s)
    with pytest.raises(EvaluationInputError):
        roc_auc(y, s)


def test_single_class_message_is_clear():
    with pytest.raises(ValueError, match="only positive"):
        roc_auc([1, 1], [0.2, 0.4])
    with pytest.raises(ValueError, match="only negative"):
        delong_test([0, 0], [0.2, 0.4], [0.1, 0.3])


def test_roc_curve_matches_sklearn_and_integrates_to_auc():
    from sklearn.metrics import roc_curve as sk_roc_curve

    rng = np.random.default_rng(13)
    y, s = _tied_data(rng)
    c = roc_curve(y, s)
    fpr, tpr, thr = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(c.fpr, fpr)
    np.testing.assert_allclose(c.tpr, tpr)
    np.testing.assert_allclose(c.thresholds[1:], thr[1:])
    assert c.thresholds[0] == np.inf and (c.fpr[0], c.tpr[0], c.fpr[-1], c.tpr[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(c.tpr, c.fpr) == pytest.approx(roc_auc(y, s).auc, abs=1e-14)


def test_youden_matches_bruteforce_search():
    rng = np.random.default_rng(17)
    for _ in range(5):
        y, s = _tied_data(rng)
        best = max((np.mean(s[y == 1] >= t) + np.mean(s[y == 0] < t) - 1, t) for t in np.unique(s))
        r = youden_threshold(y, s)
        assert r.youden == pytest.approx(best[0], abs=1e-12)
        assert r.sensitivity == pytest.approx(np.mean(s[y == 1] >= r.threshold))
        assert r.specificity == pytest.approx(np.mean(s[y == 0] < r.threshold))
        below = np.unique(s)[np.unique(s) < r.threshold]
        assert r.threshold == pytest.approx((below.max() + s[s > r.threshold].min()) / 2)


# ----------------------------------------------------------------------------- proportions
# Newcombe (1998) Stat Med 17:857, Table II: method 3 (Wilson score) and method 5 (exact, Clopper-Pearson)
@pytest.mark.parametrize("x, n, wilson, exact", [
    (81, 263, (0.2553, 0.3662), (0.2527, 0.3676)),
    (15, 148, (0.0624, 0.1605), (0.0578, 0.1617)),
    (0, 20, (0.0, 0.1611), (0.0, 0.1684)),
    (1, 29, (0.0061, 0.1718), (0.0009, 0.1776)),
])
def test_proportion_ci_matches_newcombe_1998_and_scipy(x, n, wilson, exact):
    w = proportion_ci(x, n, "wilson")
    e = proportion_ci(x, n, "clopper-pearson")
    assert (round(w.low, 4), round(w.high, 4)) == wilson
    assert (round(e.low, 4), round(e.high, 4)) == exact
    ref = st.binomtest(x, n)  # scipy: independent implementation of both intervals
    for got, method in ((w, "wilson"), (e, "exact")):
        ci = ref.proportion_ci(confidence_level=0.95, method=method)
        assert (got.low, got.high) == pytest.approx((ci.low, ci.high), abs=1e-9)
    ci90 = ref.proportion_ci(confidence_level=0.90, method="exact")
    assert proportion_ci(x, n, "clopper-pearson", 0.90)[1:] == pytest.approx((ci90.low, ci90.high), abs=1e-9)


def test_binary_metrics_counts_values_and_cis():
    from sklearn.metrics import confusion_matrix, f1_score

    rng = np.random.default_rng(21)
    y = rng.integers(0, 2, 200)
    yp = np.where(rng.random(200) < 0.8, y, 1 - y)
    m = binary_metrics(y, yp, ci="clopper-pearson")
    tn, fp, fn, tp = confusion_matrix(y, yp).ravel()
    assert (m.tp, m.fp, m.tn, m.fn) == (tp, fp, tn, fn)
    assert m.sensitivity == proportion_ci(tp, tp + fn, "clopper-pearson")
    assert m.specificity == proportion_ci(tn, tn + fp, "clopper-pearson")
    assert m.ppv == proportion_ci(tp, tp + fp, "clopper-pearson")
    assert m.npv == proportion_ci(tn, tn + fn, "clopper-pearson")
    assert m.accuracy == proportion_ci(tp + tn, 200, "clopper-pearson")
    value, low, high = m.f1
    assert value == pytest.approx(f1_score(y, yp))
    j = st.binomtest(int(tp), int(tp + fp + fn)).proportion_ci(method="exact")  # Jaccard interval, mapped
    assert (low, high) == pytest.approx((2 * j.low / (1 + j.low), 2 * j.high / (1 + j.high)))
    assert binary_metrics(y.astype(bool), yp.astype(bool), ci="clopper-pearson") == m


def test_binary_metrics_undefined_ratios_are_nan():
    m = binary_metrics([0, 0, 0], [0, 0, 0])  # no positives at all
    for est in (m.sensitivity, m.ppv, m.f1):
        assert all(np.isnan(v) for v in est)
    assert m.specificity == (1.0, pytest.approx(proportion_ci(3, 3).low), 1.0)
    assert m.npv.value == 1.0 and m.accuracy.value == 1.0
    with pytest.raises(ValueError):
        binary_metrics([0, 1], [1, 1, 0])


def test_f1_interval_has_nominal_coverage():
    # TP/FP/FN/TN probabilities .3/.1/.1/.5: true F1 = 2*.3/(2*.3+.1+.1) = 0.75
    rng = np.random.default_rng(23)
    truth = np.repeat([1, 0, 1, 0], [3, 1, 1, 5])
    pred = np.repeat([1, 1, 0, 0], [3, 1, 1, 5])
    hits = 0
    for _ in range(1000):
        idx = rng.integers(0, 10, 100)
        lo, hi = binary_metrics(truth[idx], pred[idx]).f1[1:]
        hits += lo <= 0.75 <= hi
    assert 0.925 <= hits / 1000 <= 0.975


# ---------------------------------------------------------------------------------- McNemar
def test_mcnemar_agresti_presidential_approval():
    # R ?mcnemar.test example (Agresti 1990 p. 350): discordant cells 150 and 86.
    r = mcnemar(150, 86, exact=False, correction=True)
    assert r.statistic == pytest.approx((64 - 1) ** 2 / 236)  # R prints 16.818, p-value = 4.115e-05
    assert round(r.statistic, 3) == 16.818 and r.p_value == pytest.approx(4.115e-05, rel=1e-3)
    u = mcnemar(150, 86, exact=False, correction=False)
    assert np.sqrt(u.statistic) == pytest.approx(4.17, abs=5e-3)  # Agresti: z = -4.17
    assert u.p_value == pytest.approx(st.chi2.sf(64 ** 2 / 236, 1))


def test_mcnemar_exact_equals_binomial_test():
    for b, c in ((150, 86), (3, 11), (0, 6), (5, 5)):
        r = mcnemar(b, c)  # exact by default
        assert r.p_value == pytest.approx(st.binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-12)
        assert r.statistic == min(b, c)
    assert mcnemar(0, 0).p_value == 1.0 and mcnemar(0, 0, exact=False).p_value == 1.0
    assert mcnemar(7, 7, exact=False).statistic == 0.0  # R: no Yates correction when b == c
    with pytest.raises(ValueError):
        mcnemar(-1, 3)


# ------------------------------------------------------------------------------------- kappa
def _ratings(table):
    t = np.asarray(table)
    i, j = np.indices(t.shape)
    return np.repeat(i.ravel(), t.ravel()), np.repeat(j.ravel(), t.ravel())


def test_cohen_kappa_sas_skin_condition():
    # SAS/STAT PROC FREQ "Agreement Study" (SkinCondition, two dermatologists, 88 patients):
    # simple kappa 0.3449, ASE 0.0724, 95% confidence limits 0.2030 to 0.4868
    r = cohen_kappa(*_ratings([[10, 4, 1, 0], [5, 10, 12, 2], [2, 4, 12, 5], [0, 2, 6, 13]]))
    assert [round(v, 4) for v in (r.kappa, r.se, r.ci_low, r.ci_high)] == [0.3449, 0.0724, 0.2030, 0.4868]


def test_cohen_kappa_vcd_sexualfun():
    # R vcd::Kappa(SexualFun) (Agresti; husband x wife, 91 couples): Unweighted 0.1293 (ASE 0.06860),
    # Weighted with Equal-Spacing weights 0.2374 (ASE 0.07832)
    table = [[7, 7, 2, 3], [2, 8, 3, 7], [1, 5, 4, 9], [2, 8, 9, 14]]
    u = cohen_kappa(*_ratings(table))
    w = cohen_kappa(*_ratings(table), weights="linear")
    assert (round(u.kappa, 4), round(u.se, 5)) == (0.1293, 0.06860)
    assert (round(w.kappa, 4), round(w.se, 5)) == (0.2374, 0.07832)


def test_cohen_kappa_sas_three_category_example():
    # SAS PROC FREQ printout recorded in statsmodels' test_inter_rater.py (table [[0,4,1],[0,8,0],[0,1,5]]):
    # simple kappa 0.4842, ASE 0.1380, CL 0.2137-0.7547; weighted (Cicchetti-Allison = linear) kappa
    # 0.4701, ASE 0.1457, CL 0.1845-0.7558
    a, b = _ratings([[0, 4, 1], [0, 8, 0], [0, 1, 5]])
    u, w = cohen_kappa(a, b), cohen_kappa(a, b, weights="linear")
    assert [round(v, 4) for v in (u.kappa, u.se, u.ci_low, u.ci_high)] == [0.4842, 0.1380, 0.2137, 0.7547]
    assert [round(v, 4) for v in (w.kappa, w.se, w.ci_low, w.ci_high)] == [0.4701, 0.1457, 0.1845, 0.7558]


def test_cohen_kappa_values_match_sklearn():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(31)
    a = rng.integers(0, 5, 150)
    b = np.clip(a + rng.integers(-1, 2, 150), 0, 4)
    for w in (None, "linear", "quadratic"):
        assert cohen_kappa(a, b, weights=w).kappa == pytest.approx(cohen_kappa_score(a, b, weights=w), abs=1e-12)
    assert cohen_kappa(["x", "y", "z"], ["x", "y", "z"]).kappa == 1.0
    with pytest.raises(ValueError):
        cohen_kappa(a, b, weights="cubic")


def test_cohen_kappa_se_matches_sampling_spread():
    # independent check of the non-null SE: spread of kappa over multinomial samples of the same table
    table = np.array([[10, 4, 1, 0], [5, 10, 12, 2], [2, 4, 12, 5], [0, 2, 6, 13]])
    p = (table / table.sum()).ravel()
    rng = np.random.default_rng(37)
    n = 400
    ref = cohen_kappa(*_ratings(np.round(p * n * 100).astype(int).reshape(4, 4)), weights="quadratic")
    ks = [cohen_kappa(*_ratings(rng.multinomial(n, p).reshape(4, 4)), weights="quadratic").kappa for _ in range(600)]
    assert np.std(ks, ddof=1) == pytest.approx(ref.se * 10, rel=0.1)  # se scales as 1/sqrt(n): 40000 vs 400


def test_fleiss_kappa_wikipedia_example():
    # Fleiss' kappa worked example (Wikipedia "Fleiss' kappa"): 10 subjects, 14 raters, 5 categories;
    # P-bar = 0.378, P-bar_e = 0.213, kappa = 0.210
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    r = fleiss_kappa(counts)
    assert round(r.kappa, 3) == 0.210 and (r.n_subjects, r.n_raters) == (10, 14)
    assert r.z == pytest.approx(r.kappa / r.se) and r.p_value == pytest.approx(2 * st.norm.sf(r.z))


# irr's `diagnoses` data (Fleiss 1971): 30 patients, 6 psychiatrists, 5 diagnoses (1..5), as printed in
# statsmodels' test_inter_rater.py; irr::kappam.fleiss(diagnoses): Kappa = 0.4302445, z = 17.65183
_DIAGNOSES = """4 4 4 4 4 4  2 2 2 5 5 5  2 3 3 3 3 5  5 5 5 5 5 5  2 2 2 4 4 4  1 1 3 3 3 3  3 3 3 3 5 5
1 1 3 3 3 4  1 1 4 4 4 4  5 5 5 5 5 5  1 4 4 4 4 4  1 2 4 4 4 4  2 2 2 3 3 3  1 4 4 4 4 4  2 2 4 4 4 5
3 3 3 3 3 5  1 1 1 4 5 5  1 1 1 1 1 2  2 2 4 4 4 4  1 3 3 5 5 5  5 5 5 5 5 5  2 4 4 4 4 4  2 2 4 5 5 5
1 1 4 4 4 4  1 4 4 4 4 5  2 2 2 2 2 4  1 1 1 1 5 5  2 2 4 4 4 4  1 3 3 3 3 3  5 5 5 5 5 5"""


def test_fleiss_kappa_irr_diagnoses():
    ratings = np.array(_DIAGNOSES.split(), int).reshape(30, 6)
    counts = np.stack([np.bincount(r, minlength=6)[1:] for r in ratings])
    assert counts.sum(axis=0).tolist() == [26, 26, 30, 55, 43]
    r = fleiss_kappa(counts)
    assert r.kappa == pytest.approx(0.4302445, abs=5e-8)
    assert r.z == pytest.approx(17.65183, abs=5e-6)
    assert r.p_value < 1e-60 and (r.n_subjects, r.n_raters) == (30, 6)


def test_fleiss_kappa_two_raters_is_scotts_pi_and_null_se_matches_simulation():
    rng = np.random.default_rng(41)
    a, b = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    counts = np.stack([np.bincount(np.r_[x, y], minlength=3) for x, y in zip(a, b)])
    pooled = np.bincount(np.r_[a, b], minlength=3) / 100
    pi = (np.mean(a == b) - (pooled ** 2).sum()) / (1 - (pooled ** 2).sum())  # Scott's pi by hand
    assert fleiss_kappa(counts).kappa == pytest.approx(pi, abs=1e-12)
    # under H0 (independent raters) the spread of kappa should match irr's null SE
    p = np.array([0.5, 0.3, 0.2])
    ks, ses = [], []
    for _ in range(1000):
        c = rng.multinomial(6, p, size=30)
        r = fleiss_kappa(c)
        ks.append(r.kappa)
        ses.append(r.se)
    assert np.std(ks, ddof=1) == pytest.approx(np.mean(ses), rel=0.1)
    with pytest.raises(ValueError):
        fleiss_kappa([[2, 1], [1, 1]])  # unequal numbers of raters


# --------------------------------------------------------------------------- decision curves
def test_net_benefit_hand_example_and_bruteforce():
    y = np.array([1, 1, 0, 0, 0])
    s = np.array([0.9, 0.4, 0.6, 0.3, 0.1])
    r = net_benefit(y, s, [0.0, 0.3, 0.5])
    # pt=0: all treated: 2/5; pt=0.3 (score 0.3 is treated): TP 2 FP 2 -> 2/5 - 2/5*3/7;
    # pt=0.5: TP 1 FP 1 -> 1/5 - 1/5
    np.testing.assert_allclose(r.model, [0.4, 0.4 - 0.4 * 3 / 7, 0.0])
    np.testing.assert_allclose(r.treat_all, [0.4, 0.4 - 0.6 * 3 / 7, 0.4 - 0.6])
    np.testing.assert_array_equal(r.treat_none, 0.0)
    rng = np.random.default_rng(43)
    y = rng.integers(0, 2, 300)
    s = np.clip(0.3 * y + rng.random(300) * 0.7, 0, 1)
    pts = np.linspace(0, 0.9, 19)
    r = net_benefit(y, s, pts)
    for k, pt in enumerate(pts):
        treat = s >= pt
        nb = np.sum(treat & (y == 1)) / 300 - np.sum(treat & (y == 0)) / 300 * pt / (1 - pt)
        assert r.model[k] == pytest.approx(nb)
    assert r.treat_all[0] == pytest.approx(y.mean())
    with pytest.raises(ValueError):
        net_benefit(y, s, [0.2, 1.0])


def test_calibration_curve_bruteforce_and_brier():
    from sklearn.metrics import brier_score_loss

    rng = np.random.default_rng(47)
    s = rng.random(500)
    s[:3] = [0.0, 1.0, 0.5]
    y = (rng.random(500) < s).astype(int)
    c = calibration_curve(y, s, n_bins=10)
    for k in range(10):
        lo, hi = k / 10, (k + 1) / 10
        inside = (s >= lo) & ((s < hi) if k < 9 else (s <= hi))
        assert c.counts[k] == inside.sum()
        assert c.mean_predicted[k] == pytest.approx(s[inside].mean())
        assert c.observed[k] == pytest.approx(y[inside].mean())
    assert c.counts.sum() == 500
    assert c.brier == pytest.approx(brier_score_loss(y, s))
    empty = calibration_curve([0, 1], [0.05, 0.95], n_bins=4)
    assert list(empty.counts) == [1, 0, 0, 1] and np.isnan(empty.observed[1]) and np.isnan(empty.mean_predicted[2])
    q = calibration_curve(y, s, n_bins=5, strategy="quantile")
    assert np.all(np.abs(q.counts - 100) <= 1)
    with pytest.raises(ValueError):
        calibration_curve([0, 1], [0.2, 1.3])
