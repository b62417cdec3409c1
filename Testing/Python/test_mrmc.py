"""Multi-reader multi-case ROC analysis (Obuchowski-Rockette, Hillis degrees of freedom) and
``breastdlr evaluate --readers ... --aided ...``.

The reference figures are those OR-DBM MRMC 2.5 (Schartz, Hillis, Pesce, Berbaum; University of Iowa) prints for the
Van Dyke data with trapezoidal AUCs and jackknife covariances (distributed with RJafroc as
inst/obumrm2/VanDyke-traparea-jackknife-obuch-anova.txt; the same figures are in Chakraborty's RJafroc book,
"Obuchowski Rockette Applications").  The data and their source: Testing/Python/data/README.md.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from conftest import write_csv as _write

from BreastDLRLib.cli import main
from BreastDLRLib.evaluation import EvaluationInputError, delong_test, roc_auc
from BreastDLRLib.evaluation.mrmc import ai_versus_readers, cases_for_power, mrmc_power, obuchowski_rockette

DATA = Path(__file__).parent / "data" / "vandyke_roc.csv"


@pytest.fixture(scope="module")
def vandyke():
    rows = list(csv.DictReader(open(DATA, newline="", encoding="utf-8")))
    y = np.array([int(r["disease"]) for r in rows])
    ratings = np.array([[[float(r[f"r{j}_m{m}"]) for r in rows] for j in range(5)] for m in range(2)])
    return rows, y, ratings


def test_vandyke_matches_or_dbm_mrmc(vandyke):
    _, y, ratings = vandyke
    assert ratings.shape == (2, 5, 114) and y.sum() == 45
    r = obuchowski_rockette(y, ratings, modalities=["1", "2"], readers=[f"{j + 1}" for j in range(5)])
    # TREATMENT x READER AUC ESTIMATES
    np.testing.assert_allclose(r.auc, [[0.91964573, 0.85877617, 0.90386473, 0.97310789, 0.82979066],
                                       [0.94782609, 0.90531401, 0.92173913, 0.99935588, 0.92995169]], atol=1e-8)
    # TREATMENT X READER ANOVA of AUCs (mean squares)
    assert r.ms_t == pytest.approx(0.00479617, abs=1e-8)
    assert r.ms_r == pytest.approx(0.00383620, abs=1e-8)
    assert r.ms_tr == pytest.approx(0.00055103, abs=1e-8)
    # Obuchowski-Rockette variance components and covariances
    assert r.var_r == pytest.approx(0.00153500, abs=1e-8)
    assert r.var_tr == pytest.approx(0.00020040, abs=1e-8)
    assert r.cov1 == pytest.approx(0.00034661, abs=1e-8)
    assert r.cov2 == pytest.approx(0.00034407, abs=1e-8)
    assert r.cov3 == pytest.approx(0.00023903, abs=1e-8)
    assert r.var == pytest.approx(0.00080229, abs=1e-8)
    # Analysis 1, random readers and random cases: F = 4.46 on (1, 15.26), p = .0517, error term 0.00107626
    a = r.rrrc
    assert a.statistic == pytest.approx(4.456, abs=5e-4) and a.ndf == 1
    assert a.ddf == pytest.approx(15.26, abs=5e-3) and a.p_value == pytest.approx(0.05167, abs=5e-5)
    d = a.differences[0]
    assert (d.a, d.b) == ("1", "2")
    assert d.estimate == pytest.approx(-0.04380032, abs=1e-8) and d.std_err == pytest.approx(0.02075, abs=5e-6)
    assert d.statistic == pytest.approx(-2.11, abs=5e-3)
    assert (d.ci_low, d.ci_high) == (pytest.approx(-0.08796, abs=5e-6), pytest.approx(0.00036, abs=5e-6))
    m1, m2 = a.means
    assert (m1.estimate, m1.std_err, m1.df) == (pytest.approx(0.89703704, abs=1e-8), pytest.approx(0.03317360, abs=1e-8),
                                                pytest.approx(12.74, abs=5e-3))
    assert (m1.ci_low, m1.ci_high) == (pytest.approx(0.82522360, abs=1e-8), pytest.approx(0.96885048, abs=1e-8))
    assert (m2.estimate, m2.std_err, m2.df) == (pytest.approx(0.94083736, abs=1e-8), pytest.approx(0.02156637, abs=1e-8),
                                                pytest.approx(12.71, abs=5e-3))
    assert (m2.ci_low, m2.ci_high) == (pytest.approx(0.89413783, abs=1e-8), pytest.approx(0.98753689, abs=1e-8))
    # Analysis 2, fixed readers and random cases: X2 = 5.47595, p = 0.0193; difference SE 0.01872
    f = r.frrc
    assert f.statistic == pytest.approx(5.47595, abs=5e-6) and f.p_value == pytest.approx(0.0193, abs=5e-5)
    fd = f.differences[0]
    assert fd.std_err == pytest.approx(0.01872, abs=5e-6)
    assert (fd.ci_low, fd.ci_high) == (pytest.approx(-0.08049, abs=5e-6), pytest.approx(-0.00711, abs=5e-6))
    assert [m.std_err for m in f.means] == [pytest.approx(0.02428971, abs=1e-8), pytest.approx(0.01677632, abs=1e-8)]
    assert (f.means[0].ci_low, f.means[1].ci_high) == (pytest.approx(0.84943008, abs=1e-8),
                                                       pytest.approx(0.97371835, abs=1e-8))
    # single-reader differences (part d)
    expected = [(-0.02818, 0.02551, 0.2693), (-0.04654, 0.02630, 0.0768), (-0.01787, 0.03121, 0.5668),
                (-0.02625, 0.01729, 0.1290), (-0.10016, 0.04406, 0.0230)]
    for got, (est, se, p) in zip(r.per_reader, expected):
        assert (got.estimate, got.std_err, got.p_value) == (pytest.approx(est, abs=5e-6), pytest.approx(se, abs=5e-6),
                                                            pytest.approx(p, abs=5e-5))
    # random readers, fixed cases (the RJafroc book): F = 8.704 on (1, 4), p = 0.04196, CI (-0.08502, -0.00258)
    c = r.rrfc
    assert (c.statistic, c.ddf, c.p_value) == (pytest.approx(8.704, abs=5e-4), 4, pytest.approx(0.04196, abs=5e-6))
    assert (c.differences[0].ci_low, c.differences[0].ci_high) == (pytest.approx(-0.08502, abs=5e-6),
                                                                   pytest.approx(-0.00258, abs=5e-6))
    assert [m.std_err for m in c.means] == [pytest.approx(0.02483, abs=5e-6), pytest.approx(0.01615, abs=5e-6)]


def test_delong_covariances_agree_with_the_single_curve_and_paired_tests(vandyke):
    """With DeLong covariances, each AUC's variance is roc_auc's and each reader's unaided-aided difference has the
    standard error of the paired DeLong test (both checked against pROC in test_evaluation_stats.py)."""
    _, y, ratings = vandyke
    r = obuchowski_rockette(y, ratings, covariance="delong")
    jk = obuchowski_rockette(y, ratings)
    for j, d in enumerate(r.per_reader):
        t = delong_test(y, ratings[0, j], ratings[1, j])
        assert d.estimate / d.std_err == pytest.approx(t.z, rel=1e-9)
    var = np.mean([roc_auc(y, ratings[i, j]).variance for i in range(2) for j in range(5)])
    assert r.var == pytest.approx(var, rel=1e-12)
    assert r.var != pytest.approx(jk.var, rel=1e-3)          # the two estimators really differ here
    np.testing.assert_allclose(r.auc, jk.auc)


def test_jackknife_shortcut_equals_recomputing_each_auc():
    """The leave-one-case-out AUCs come from placement values; a brute-force jackknife gives the same covariances."""
    rng = np.random.default_rng(3)
    y = np.array([1] * 9 + [0] * 12)
    ratings = rng.integers(1, 6, size=(3, 2, y.size)).astype(float) + y * rng.integers(0, 3, size=(3, 2, y.size))
    r = obuchowski_rockette(y, ratings)
    flat = ratings.reshape(6, -1)
    loo = np.array([[roc_auc(np.delete(y, k), np.delete(s, k)).auc for k in range(y.size)] for s in flat])
    dev = loo - loo.mean(1, keepdims=True)
    cov = (y.size - 1) / y.size * dev @ dev.T
    assert r.var == pytest.approx(np.mean(np.diag(cov)), rel=1e-12)
    c4 = cov.reshape(3, 2, 3, 2)
    assert r.cov1 == pytest.approx(np.mean([c4[i, j, k, j] for i in range(3) for k in range(3) if i != k for j in range(2)]))
    assert len(r.rrrc.differences) == 3                      # three modalities: every pair


def test_readers_who_agree_exactly_get_the_large_sample_test():
    """No reader-by-modality spread (MS(TR) = 0): Hillis' ddf is infinite and F(1, inf) is a chi-square(1)."""
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    base = np.array([5, 4, 3, 2, 3, 1, 1.0])
    r = obuchowski_rockette(y, np.stack([np.stack([base, base]), np.stack([base + y, base + y])]))
    assert r.ms_tr == 0 and r.rrrc.ddf == np.inf
    assert r.rrrc.p_value == pytest.approx(r.rrrc.differences[0].p_value)   # the z test of the same difference
    assert 0 < r.rrrc.p_value < 1


def test_ai_against_the_readers_is_the_single_modality_analysis_of_their_differences(vandyke):
    """Hillis 2007, section 5.3: the readers' AUC differences from the AI, D_j, analysed as one modality (reader mean
    square of D, Cov2 of D by the jackknife, t = mean D / sqrt((MS_R + J Cov2) / J) on Hillis' df).  Computed here
    from leave-one-case-out AUCs by brute force; the product repeats the AI as a second modality instead."""
    _, y, ratings = vandyke
    ai, rad = ratings[1, 0], ratings[0]                      # reader 1's cine-MRI ratings play the AI
    j_n, k_n = rad.shape
    got = ai_versus_readers(y, ai, rad, ai_name="cine")
    full = np.array([roc_auc(y, s).auc for s in rad]) - roc_auc(y, ai).auc
    loo = np.array([[roc_auc(np.delete(y, k), np.delete(s, k)).auc - roc_auc(np.delete(y, k), np.delete(ai, k)).auc
                     for k in range(k_n)] for s in rad])
    dev = loo - loo.mean(1, keepdims=True)
    cov = (k_n - 1) / k_n * dev @ dev.T
    cov2 = np.mean([cov[a, b] for a in range(j_n) for b in range(j_n) if a != b])
    ms_r = np.var(full, ddof=1)
    den = ms_r + j_n * max(cov2, 0)
    t = full.mean() / np.sqrt(den / j_n)
    df = den ** 2 / (ms_r ** 2 / (j_n - 1))
    assert got["difference"]["estimate"] == pytest.approx(-full.mean(), rel=1e-12)     # AI minus the readers
    assert got["f"] == pytest.approx(t ** 2, rel=1e-9) and got["ddf"] == pytest.approx(df, rel=1e-9)
    assert got["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    assert got["ai_auc"] == pytest.approx(0.94782609, abs=1e-8)
    assert (got["readers_better"], got["readers_worse"]) == (1, 4)                  # only 0.97311 beats 0.94783


def test_power_matches_rjafroc_on_the_van_dyke_components(vandyke):
    """Hillis, Obuchowski and Berbaum 2011 with the Van Dyke variance components as the pilot (114 cases) and the
    observed difference -0.043800322: the powers RJafroc 2.1 asserts in tests/testthat/test-SsSampleSizeRoc.R
    (SsPowerGivenJK, method "OR")."""
    _, y, ratings = vandyke
    r = obuchowski_rockette(y, ratings)
    kw = dict(pilot_cases=114, var_tr=r.var_tr, var=r.var, cov1=r.cov1, cov2=r.cov2, cov3=r.cov3)
    e = -0.043800322
    assert mrmc_power(e, 10, 165, **kw) == pytest.approx(0.80541995, abs=1e-8)
    assert mrmc_power(e, 10, 131, generalisation="frrc", **kw) == pytest.approx(0.80091813, abs=1e-8)
    assert mrmc_power(e, 10, 53, generalisation="rrfc", **kw) == pytest.approx(0.80496663, abs=1e-8)
    assert mrmc_power(r.rrrc.differences[0].estimate, 6, 111, **kw) == pytest.approx(0.5526116, abs=5e-8)
    # the smallest number of cases for 80 %: power just below it one case earlier
    k = cases_for_power(e, 10, **kw)
    assert mrmc_power(e, 10, k, **kw) >= 0.8 > mrmc_power(e, 10, k - 1, **kw)
    # three readers never reach 80 % here: the treatment-by-reader variance caps the power
    assert cases_for_power(e, 3, **kw) is None and mrmc_power(e, 3, 100000, **kw) < 0.8
    with pytest.raises(EvaluationInputError, match="generalisation"):
        mrmc_power(e, 10, 100, generalisation="xx", **kw)


@pytest.mark.parametrize("shape, message", [((1, 3), "two modalities"), ((2, 1), "two readers")])
def test_too_small_a_design_is_refused(shape, message):
    y = np.array([1, 1, 0, 0, 0])
    with pytest.raises(EvaluationInputError, match=message):
        obuchowski_rockette(y, np.ones((*shape, 5)))


def test_missing_ratings_and_mismatched_truth_are_refused():
    y = np.array([1, 1, 0, 0])
    r = np.arange(16, dtype=float).reshape(2, 2, 4)
    r[1, 0, 2] = np.nan
    with pytest.raises(EvaluationInputError, match="fully crossed"):
        obuchowski_rockette(y, r)
    with pytest.raises(EvaluationInputError, match="5 truths"):
        obuchowski_rockette([1, 1, 0, 0, 0], np.ones((2, 2, 4)))
    with pytest.raises(EvaluationInputError, match="two diseased"):
        obuchowski_rockette([1, 0, 0, 0], np.ones((2, 2, 4)))


# ------------------------------------------------------------------------------------------ breastdlr evaluate
@pytest.fixture()
def study(tmp_path, vandyke):
    rows, _, _ = vandyke
    readers = [f"r{j}" for j in range(5)]
    preds = _write(tmp_path / "study.csv", ["case_id", *readers, *[f"{r}_ai" for r in readers]],
                   [(r["case_id"], *[r[f"r{j}_m0"] for j in range(5)], *[r[f"r{j}_m1"] for j in range(5)]) for r in rows])
    truth = _write(tmp_path / "manifest.csv", ["case_id", "label"],
                   [(r["case_id"], "malignant" if r["disease"] == "1" else "benign") for r in rows])
    return {"preds": preds, "truth": truth, "dir": tmp_path, "readers": readers}


def _run(study, out, *extra):
    return main(["evaluate", str(study["preds"]), "--truth", str(study["truth"]), "--out", str(out), "--n-boot", "20",
                 *extra])


def test_evaluate_with_aided_reading_runs_the_mrmc_analysis(study, capsys):
    """The 1-5 ratings are valid BI-RADS grades 1-5 (ordinal scores 1-5, the same order), so the report must give
    the Van Dyke figures."""
    out = study["dir"] / "eval"
    rs = study["readers"]
    assert _run(study, out, "--readers", ",".join(rs), "--aided", ",".join(f"{r}_ai" for r in rs)) == 0
    printed = capsys.readouterr().out
    assert "aided - unaided 0.044 (95% CI -0.000 to 0.088), F(1, 15.26) = 4.46, p = 0.0517" in printed
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    mr = m["mrmc"]
    assert mr["modalities"] == ["unaided", "aided"] and mr["readers"] == rs
    assert mr["aided_columns"] == {r: f"{r}_ai" for r in rs}
    assert (mr["n_diseased"], mr["n_nondiseased"]) == (45, 69)
    assert mr["rrrc"]["p_value"] == pytest.approx(0.05167, abs=5e-5)
    assert mr["frrc"]["statistic"] == pytest.approx(5.47595, abs=5e-6)
    assert mr["auc"]["aided"]["r4"] == pytest.approx(0.92995169, abs=1e-8)
    # agreement: among the unaided readings and among the aided ones, never a reader with themself
    assert m["reader_agreement"]["readers"] == rs
    assert m["reader_agreement_aided"]["readers"] == [f"{r}_ai" for r in rs]
    assert m["reader_agreement"]["fleiss"]["n_raters"] == 5
    assert "mrmc.png" in m["plots"] and (out / "mrmc.png").stat().st_size > 1000
    ss = mr["sample_size"]
    assert ss["effect"] == pytest.approx(0.04380032, abs=1e-8) and ss["pilot_cases"] == 114
    assert {r["readers"]: r["cases"] for r in ss["cases"]}[10] == cases_for_power(
        0.04380032206119144, 10, 114, mr["variance_components"]["var_tr"], mr["variance_components"]["var"],
        mr["variance_components"]["cov1"], mr["variance_components"]["cov2"], mr["variance_components"]["cov3"])
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Multi-reader multi-case analysis" in html and "random readers, random cases" in html


def test_evaluate_compares_each_score_column_with_the_readers_average(study, vandyke, capsys):
    out = study["dir"] / "ai"
    assert _run(study, out, "--readers", "r0,r1,r2,r3", "--columns", "r4_ai") == 0
    assert "r4_ai against the readers' average (random readers and cases): AUC 0.930" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    av = m["ai_vs_readers"]["r4_ai"]
    _, y, ratings = vandyke
    direct = ai_versus_readers(y, ratings[1, 4], ratings[0, :4])
    assert av["p_value"] == pytest.approx(direct["p_value"]) and av["readers"] == ["r0", "r1", "r2", "r3"]
    assert av["difference"]["estimate"] == pytest.approx(direct["difference"]["estimate"])
    assert "AI against the readers' average" in (out / "report.html").read_text(encoding="utf-8")
    assert m["mrmc"] is None


def test_aided_columns_must_pair_with_the_readers(study, capsys):
    out = study["dir"] / "eval"
    assert _run(study, out, "--readers", "r0,r1", "--aided", "r0_ai") == 2
    err = capsys.readouterr().err
    assert "--aided names 1 column(s) but --readers names 2" in err and not out.exists()
    assert _run(study, out, "--readers", "r0", "--aided", "r0_ai") == 2
    assert "at least two readers" in capsys.readouterr().err and not out.exists()
    assert _run(study, out, "--readers", "r0,r1", "--aided", "r1,r0_ai") == 2
    assert "names a column twice" in capsys.readouterr().err and not out.exists()


def test_a_case_without_both_readings_is_left_out(study, tmp_path):
    """A missing aided grade leaves the case out of the whole study (the design stays fully crossed)."""
    rows = list(csv.reader(open(study["preds"], newline="", encoding="utf-8")))
    rows[1][6] = ""                                          # N01: reader r0's aided grade missing
    preds = _write(tmp_path / "gap.csv", rows[0], rows[1:])
    out = tmp_path / "gap"
    assert main(["evaluate", str(preds), "--truth", str(study["truth"]), "--out", str(out), "--n-boot", "20",
                 "--readers", "r0,r1", "--aided", "r0_ai,r1_ai"]) == 0
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert m["cases"]["excluded"]["missing_score"] == 1
    assert (m["mrmc"]["n_diseased"], m["mrmc"]["n_nondiseased"]) == (45, 68)


def test_a_single_cancer_leaves_the_ai_versus_readers_analysis_out_but_not_the_evaluation(tmp_path):
    """One malignant case is enough for an AUC but not for a case-resampling variance: the evaluation still runs
    (it asked for no MRMC), and ai_vs_readers is null."""
    truth = _write(tmp_path / "t.csv", ["case_id", "label"],
                   [("a", "malignant"), ("b", "benign"), ("c", "benign"), ("d", "benign")])
    preds = _write(tmp_path / "p.csv", ["case_id", "probability_malignant", "r1", "r2"],
                   [("a", "0.9", "5", "4a"), ("b", "0.2", "2", "3"), ("c", "0.4", "3", "4b"), ("d", "0.1", "2", "2")])
    out = tmp_path / "out"
    assert main(["evaluate", str(preds), "--truth", str(truth), "--out", str(out), "--n-boot", "20",
                 "--readers", "r1,r2"]) == 0
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert m["ai_vs_readers"] is None and m["columns"]["r1"]["auc"]["value"] == 1.0


def test_likelihood_ratings_give_the_same_mrmc_as_the_grades(study, capsys):
    """The Van Dyke ratings 1-5 put on the percent scale by an order-keeping map (1, 5, 25, 70, 97 %: one ACR
    category each) must give the published OR-DBM MRMC figures again, and the same agreement as the grades 1-5."""
    to_pct = {"1": "1", "2": "5", "3": "25", "4": "70", "5": "97"}
    rows = list(csv.reader(open(study["preds"], newline="", encoding="utf-8")))
    preds = _write(study["dir"] / "pct.csv", rows[0], [[r[0], *[to_pct[v] for v in r[1:]]] for r in rows[1:]])
    rs = study["readers"]
    args = ["--readers", ",".join(rs), "--aided", ",".join(f"{r}_ai" for r in rs)]
    assert _run(study, study["dir"] / "grades", *args) == 0
    out = study["dir"] / "pct"
    capsys.readouterr()
    # above 50 % = the grades 4 and 5, as BI-RADS grades positive from 4A
    assert main(["evaluate", str(preds), "--truth", str(study["truth"]), "--out", str(out), "--n-boot", "20", *args,
                 "--reader-scale", "percent", "--reader-positive", "50"]) == 0
    assert "aided - unaided 0.044 (95% CI -0.000 to 0.088), F(1, 15.26) = 4.46, p = 0.0517" in capsys.readouterr().out
    g = json.loads((study["dir"] / "grades" / "metrics.json").read_text(encoding="utf-8"))
    p = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert p["mrmc"]["frrc"]["statistic"] == pytest.approx(5.47595, abs=5e-6)
    assert p["mrmc"]["auc"]["aided"]["r4"] == pytest.approx(0.92995169, abs=1e-8)
    assert p["reader_agreement"]["categories"] == ["3", "4a", "4b", "4c", "5"]
    for key in ("reader_agreement", "reader_agreement_aided"):
        for a, b in zip(g[key]["pairs"], p[key]["pairs"]):
            for k in ("kappa", "kappa_linear", "kappa_positive_call"):
                assert a[k]["kappa"] == pytest.approx(b[k]["kappa"], abs=1e-12)
        assert g[key]["fleiss"]["kappa"] == pytest.approx(p[key]["fleiss"]["kappa"], abs=1e-12)
    for r in rs:
        assert g["columns"][r]["operating_point"]["confusion_matrix"] == p["columns"][r]["operating_point"]["confusion_matrix"]
