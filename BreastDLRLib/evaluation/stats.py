"""Statistics for evaluating a classifier against a reference standard (numpy/scipy only).

Conventions, shared by every function here:

* ``y_true`` is 1-D, 0/1 or bool; 1 (True) is the positive class (a case), 0 a control.
* Higher scores mean "more likely positive"; a case is called positive when ``score >= threshold``.
  AUCs are not flipped automatically (an AUC below 0.5 is reported as such, like pROC with
  ``direction="<"``).
* Ties between a case and a control count 1/2 (Mann-Whitney).
* Ratios that are 0/0 are NaN with a NaN interval; they never raise.

References: DeLong, DeLong & Clarke-Pearson (1988) Biometrics 44:837; Sun & Xu (2014) IEEE SPL
21:1389 (fast DeLong); Robin et al. (2011) BMC Bioinformatics 12:77 (pROC); Fleiss, Cohen & Everitt
(1969) Psychol Bull 72:323; Fleiss (1971) Psychol Bull 76:378; Newcombe (1998) Stat Med 17:857;
Vickers & Elkin (2006) Med Decis Making 26:565.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
from scipy import stats as _st

from ..errors import BreastDLRError

__all__ = [
    "EvaluationInputError",
    "Estimate",
    "AUCResult",
    "DeLongTestResult",
    "BinaryMetrics",
    "YoudenResult",
    "McNemarResult",
    "KappaResult",
    "FleissKappaResult",
    "NetBenefitResult",
    "CalibrationResult",
    "RocCurve",
    "delong_placements",
    "roc_auc",
    "delong_test",
    "proportion_ci",
    "binary_metrics",
    "youden_threshold",
    "mcnemar",
    "cohen_kappa",
    "fleiss_kappa",
    "net_benefit",
    "calibration_curve",
    "roc_curve",
]


MISSING = {"", "nan", "na", "n/a", "none", "null"}   # table cells that mean "no value" (any case)


class EvaluationInputError(BreastDLRError, ValueError):
    """Labels, scores or counts that cannot be evaluated as given (also a ValueError)."""


# --------------------------------------------------------------------------------------- results
class Estimate(NamedTuple):
    """A point estimate with its confidence interval; unpacks as ``(value, low, high)``."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class AUCResult:
    """AUC with its CI.  ``variance`` is always DeLong's (pROC ``var(roc, method="delong")``)."""

    auc: float
    ci_low: float
    ci_high: float
    variance: float
    method: str
    level: float
    n_cases: int
    n_controls: int


@dataclass(frozen=True)
class DeLongTestResult:
    """Paired DeLong test of AUC(a) - AUC(b); ``ci_low``/``ci_high`` bound that difference."""

    z: float
    p_value: float
    auc_a: float
    auc_b: float
    difference: float
    ci_low: float
    ci_high: float
    level: float


@dataclass(frozen=True)
class BinaryMetrics:
    """Confusion-matrix metrics, each an :class:`Estimate` ``(value, low, high)``.

    ``f1`` CI: the ``ci`` interval for the Jaccard index J = TP/(TP+FP+FN) (given TP+FP+FN, TP is
    binomial with probability J under multinomial sampling), mapped through F1 = 2J/(1+J).
    """

    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: Estimate
    specificity: Estimate
    ppv: Estimate
    npv: Estimate
    accuracy: Estimate
    f1: Estimate
    ci_method: str
    level: float


@dataclass(frozen=True)
class YoudenResult:
    """Threshold maximising sensitivity + specificity - 1 (positive means score >= threshold)."""

    threshold: float
    sensitivity: float
    specificity: float
    youden: float


@dataclass(frozen=True)
class McNemarResult:
    statistic: float
    p_value: float
    method: str


@dataclass(frozen=True)
class KappaResult:
    """Cohen's kappa with the Fleiss-Cohen-Everitt (1969) asymptotic SE, as R's vcd::Kappa (>= 1.4)."""

    kappa: float
    se: float
    ci_low: float
    ci_high: float
    level: float
    weights: Optional[str]
    categories: tuple


@dataclass(frozen=True)
class FleissKappaResult:
    """Fleiss' kappa; ``se`` under H0 kappa = 0 (Fleiss, Nee & Landis 1979), ``z = kappa/se`` and
    two-sided ``p_value``, as irr::kappam.fleiss."""

    kappa: float
    se: float
    z: float
    p_value: float
    n_subjects: int
    n_raters: int


@dataclass(frozen=True)
class NetBenefitResult:
    thresholds: np.ndarray
    model: np.ndarray
    treat_all: np.ndarray
    treat_none: np.ndarray


@dataclass(frozen=True)
class CalibrationResult:
    """Per bin: mean predicted risk, observed event rate and count (NaN where a bin is empty)."""

    bin_edges: np.ndarray
    mean_predicted: np.ndarray
    observed: np.ndarray
    counts: np.ndarray
    brier: float


@dataclass(frozen=True)
class RocCurve:
    """Empirical ROC: point k calls positive every score >= ``thresholds[k]`` (first is +inf)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


# ---------------------------------------------------------------------------------------- inputs
def _binary(y, name: str = "y_true") -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise EvaluationInputError(f"{name} must be a flat list of 0/1 labels, got shape {arr.shape}.")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise EvaluationInputError(f"{name} must contain only 0 and 1 (or True/False); got values of type {arr.dtype}.")
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        bad = np.unique(arr[~((arr == 0) | (arr == 1))])[:5]
        raise EvaluationInputError(f"{name} must contain only 0 and 1 (or True/False); found {bad.tolist()}.")
    return arr.astype(bool)


def _scores(s, n: int, name: str = "y_score") -> np.ndarray:
    arr = np.asarray(s, dtype=float)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise EvaluationInputError(f"{name} must be a flat list with one score per label ({n}), got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise EvaluationInputError(f"{name} contains missing or infinite values; remove or impute them first.")
    return arr


def _labels_and_scores(y_true, y_score, need_both: bool = True):
    y = _binary(y_true)
    s = _scores(y_score, y.shape[0])
    if need_both and (y.all() or not y.any()):
        only = "positive" if y.any() else ("negative" if y.size else "no")
        raise EvaluationInputError(
            f"y_true contains only {only} cases; ROC statistics need at least one positive and one negative case.")
    return y, s


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise EvaluationInputError(f"Confidence level must be between 0 and 1 (e.g. 0.95), got {level}.")
    return float(_st.norm.ppf(0.5 + level / 2.0))


def to_json(obj: Any) -> Any:
    """Plain JSON values: numpy converted, NaN and +-inf as None."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


# ------------------------------------------------------------------------------------- ROC / AUC
def delong_placements(y_true, y_score) -> tuple[float, np.ndarray, np.ndarray]:
    """``(auc, v10, v01)``: DeLong structural components by midranks (Sun & Xu 2014).

    ``v10[i]`` = fraction of controls below case i (ties 1/2); ``v01[j]`` = fraction of cases above
    control j (ties 1/2); cases and controls keep their input order (pROC's ``X`` and ``Y``).
    """
    y, s = _labels_and_scores(y_true, y_score)
    cases, controls = s[y], s[~y]
    m, n = cases.size, controls.size
    tz = _st.rankdata(np.concatenate([cases, controls]))
    tx = _st.rankdata(cases)
    ty = _st.rankdata(controls)
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    return float(v10.mean()), v10, v01


def _delong_variance(v10: np.ndarray, v01: np.ndarray) -> float:
    if v10.size < 2 or v01.size < 2:
        return float("nan")
    return float(np.var(v10, ddof=1) / v10.size + np.var(v01, ddof=1) / v01.size)


def _bootstrap_aucs(y: np.ndarray, s: np.ndarray, n_boot: int, seed: int, chunk: int = 256) -> np.ndarray:
    """Stratified bootstrap AUCs: cases and controls resampled separately with replacement."""
    levels, inv = np.unique(s, return_inverse=True)
    m, n = int(y.sum()), int((~y).sum())
    p_case = np.bincount(inv[y], minlength=levels.size) / m
    p_ctrl = np.bincount(inv[~y], minlength=levels.size) / n
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        a = rng.multinomial(m, p_case, size=b).astype(float)
        c = rng.multinomial(n, p_ctrl, size=b).astype(float)
        below = np.cumsum(c, axis=1) - c  # controls strictly below each level
        out[start:start + b] = (a * (below + 0.5 * c)).sum(axis=1) / (m * n)
    return out


def roc_auc(y_true, y_score, method: str = "delong", level: float = 0.95, n_boot: int = 2000,
            seed: int = 0) -> AUCResult:
    """Empirical AUC with a DeLong (pROC ``ci.auc`` default) or stratified percentile-bootstrap CI.

    "delong": auc +/- z * sqrt(var), clipped to [0, 1].  "bootstrap": ``n_boot`` stratified resamples
    (seeded, deterministic), percentile interval (R ``quantile`` type 7).  The variance is DeLong's
    in both cases; it is NaN when a class has a single member.
    """
    y, s = _labels_and_scores(y_true, y_score)
    z = _z(level)
    auc, v10, v01 = delong_placements(y, s)
    var = _delong_variance(v10, v01)
    if method == "delong":
        half = z * np.sqrt(var)
        lo, hi = max(0.0, auc - half), min(1.0, auc + half)
    elif method == "bootstrap":
        if int(n_boot) < 1:
            raise EvaluationInputError(f"n_boot must be a positive number of resamples, got {n_boot}.")
        aucs = _bootstrap_aucs(y, s, int(n_boot), seed)
        lo, hi = (float(q) for q in np.quantile(aucs, [(1 - level) / 2, 1 - (1 - level) / 2]))
    else:
        raise EvaluationInputError(f'Unknown AUC interval method "{method}"; use "delong" or "bootstrap".')
    return AUCResult(auc=auc, ci_low=float(lo), ci_high=float(hi), variance=var, method=method,
                     level=level, n_cases=int(v10.size), n_controls=int(v01.size))


def delong_test(y_true, score_a, score_b, level: float = 0.95) -> DeLongTestResult:
    """DeLong's test for two correlated ROC curves (same patients), two-sided, as pROC ``roc.test``.

    z = (AUC_a - AUC_b) / sd, sd from the structural-component covariance.  When that sd is 0:
    z = 0, p = 1 if the AUCs are equal (e.g. a score against itself), else z = +/-inf, p = 0.
    """
    y = _binary(y_true)
    sa = _scores(score_a, y.shape[0], "score_a")
    sb = _scores(score_b, y.shape[0], "score_b")
    auc_a, xa, ya = delong_placements(y, sa)
    auc_b, xb, yb = delong_placements(y, sb)
    zcrit = _z(level)
    m, n = xa.size, ya.size
    if m < 2 or n < 2:
        var = float("nan")
    else:
        s10 = np.cov(np.vstack([xa, xb]), ddof=1)
        s01 = np.cov(np.vstack([ya, yb]), ddof=1)
        var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
        var = max(float(var), 0.0)
    d = auc_a - auc_b
    sd = float(np.sqrt(var))
    if np.isnan(sd):
        z = p = float("nan")
    elif sd <= 1e-12 * max(1.0, abs(d)):
        z, p = (0.0, 1.0) if abs(d) <= 1e-12 else (float(np.copysign(np.inf, d)), 0.0)
    else:
        z = d / sd
        p = float(2 * _st.norm.sf(abs(z)))
    return DeLongTestResult(z=float(z), p_value=float(p), auc_a=auc_a, auc_b=auc_b, difference=d,
                            ci_low=d - zcrit * sd, ci_high=d + zcrit * sd, level=level)


def roc_curve(y_true, y_score) -> RocCurve:
    """Empirical ROC points from (0, 0) to (1, 1), one per distinct score (descending thresholds)."""
    y, s = _labels_and_scores(y_true, y_score)
    thr = np.unique(s)[::-1]
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # index one past the last occurrence of each distinct threshold in descending order
    ends = np.searchsorted(-s_sorted, -thr, side="right")
    tp = np.concatenate([[0], np.cumsum(y_sorted)[ends - 1]])
    fp = np.concatenate([[0], np.cumsum(~y_sorted)[ends - 1]])
    return RocCurve(fpr=fp / (~y).sum(), tpr=tp / y.sum(), thresholds=np.concatenate([[np.inf], thr]))


def youden_threshold(y_true, y_score) -> YoudenResult:
    """Best Youden threshold among pROC's candidates: -inf, midpoints of neighbouring distinct
    scores, +inf.  On ties the lowest threshold (highest sensitivity) wins."""
    y, s = _labels_and_scores(y_true, y_score)
    u = np.unique(s)
    cand = np.concatenate([[-np.inf], (u[:-1] + u[1:]) / 2.0, [np.inf]])
    cases, controls = np.sort(s[y]), np.sort(s[~y])
    sens = 1.0 - np.searchsorted(cases, cand, side="left") / cases.size   # P(case >= t)
    spec = np.searchsorted(controls, cand, side="left") / controls.size   # P(control < t)
    j = sens + spec - 1.0
    k = int(np.argmax(j >= j.max() - 1e-12))
    return YoudenResult(threshold=float(cand[k]), sensitivity=float(sens[k]), specificity=float(spec[k]),
                        youden=float(j[k]))


def rule_out_threshold(y_true, y_score, sensitivity: float = 0.95) -> float:
    """The largest threshold t (positive = score >= t) whose sensitivity is at least ``sensitivity``, placed
    midway between neighbouring observed scores as pROC places its thresholds (a rule-out operating point)."""
    y, s = _labels_and_scores(y_true, y_score)
    if not 0.0 < sensitivity <= 1.0:
        raise EvaluationInputError(f"The target sensitivity must be in (0, 1], got {sensitivity}.")
    u = np.unique(s)
    cases = np.sort(s[y])
    sens = 1.0 - np.searchsorted(cases, u, side="left") / cases.size     # P(case >= u)
    k = int(np.nonzero(sens >= sensitivity)[0].max())
    return float((u[k] + u[k - 1]) / 2.0) if k > 0 else float(u[0])


# ----------------------------------------------------------------------------- binary decisions
def proportion_ci(x: int, n: int, method: str = "wilson", level: float = 0.95) -> Estimate:
    """x/n with a Wilson score (R ``prop.test(correct=FALSE)``) or Clopper-Pearson (R ``binom.test``)
    interval; NaN for n = 0."""
    if n < 0 or x < 0 or x > n:
        raise EvaluationInputError(f"A proportion needs 0 <= x <= n, got x={x}, n={n}.")
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"))
    p = x / n
    alpha = 1.0 - level
    if method == "wilson":
        z = _z(level)
        z2 = z * z
        centre = (x + z2 / 2.0) / (n + z2)
        half = z * np.sqrt(n * p * (1 - p) + z2 / 4.0) / (n + z2)
        lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    elif method == "clopper-pearson":
        _z(level)
        lo = 0.0 if x == 0 else float(_st.beta.ppf(alpha / 2, x, n - x + 1))
        hi = 1.0 if x == n else float(_st.beta.ppf(1 - alpha / 2, x + 1, n - x))
    else:
        raise EvaluationInputError(f'Unknown interval method "{method}"; use "wilson" or "clopper-pearson".')
    return Estimate(float(p), float(lo), float(hi))


def binary_metrics(y_true, y_pred, ci: str = "wilson", level: float = 0.95) -> BinaryMetrics:
    """Sensitivity, specificity, PPV, NPV, accuracy and F1 with binomial CIs (see :class:`BinaryMetrics`)."""
    y = _binary(y_true)
    yp = _binary(y_pred, "y_pred")
    if yp.shape != y.shape:
        raise EvaluationInputError(f"y_pred has {yp.size} values but y_true has {y.size}; they must match.")
    tp = int(np.sum(y & yp))
    fp = int(np.sum(~y & yp))
    tn = int(np.sum(~y & ~yp))
    fn = int(np.sum(y & ~yp))
    jac = proportion_ci(tp, tp + fp + fn, ci, level)
    f1 = Estimate(*(2 * v / (1 + v) for v in jac))
    return BinaryMetrics(
        tp=tp, fp=fp, tn=tn, fn=fn,
        sensitivity=proportion_ci(tp, tp + fn, ci, level),
        specificity=proportion_ci(tn, tn + fp, ci, level),
        ppv=proportion_ci(tp, tp + fp, ci, level),
        npv=proportion_ci(tn, tn + fn, ci, level),
        accuracy=proportion_ci(tp + tn, y.size, ci, level),
        f1=f1, ci_method=ci, level=level)


def mcnemar(b: int, c: int, exact: bool = True, correction: bool = True) -> McNemarResult:
    """McNemar's test on the discordant counts b and c.

    exact: statistic = min(b, c), p = two-sided binomial test with n = b + c, p = 1/2 (capped at 1).
    Otherwise R's ``mcnemar.test``: (|b - c| - 1)^2 / (b + c) with ``correction`` (no correction when
    b == c), else (b - c)^2 / (b + c), chi-square with 1 df.  b + c = 0 gives statistic 0, p = 1.
    """
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise EvaluationInputError(f"McNemar counts must be non-negative, got b={b}, c={c}.")
    n = b + c
    if exact:
        k = min(b, c)
        p = 1.0 if n == 0 else min(1.0, 2.0 * float(_st.binom.cdf(k, n, 0.5)))
        return McNemarResult(statistic=float(k), p_value=p, method="exact binomial")
    if n == 0:
        return McNemarResult(statistic=0.0, p_value=1.0, method="chi-square")
    yates = 1.0 if (correction and b != c) else 0.0
    stat = (abs(b - c) - yates) ** 2 / n
    return McNemarResult(statistic=float(stat), p_value=float(_st.chi2.sf(stat, 1)),
                         method="chi-square with continuity correction" if correction else "chi-square")


# ------------------------------------------------------------------------------------- agreement
def _kappa_weights(k: int, weights: Optional[str]) -> np.ndarray:
    d = np.abs(np.subtract.outer(np.arange(k), np.arange(k))) / max(k - 1, 1)
    if weights is None:
        return np.eye(k)
    if weights == "linear":
        return 1.0 - d
    if weights == "quadratic":
        return 1.0 - d ** 2
    raise EvaluationInputError(f'Unknown kappa weights "{weights}"; use None, "linear" or "quadratic".')


def cohen_kappa(r1: Sequence, r2: Sequence, weights: Optional[str] = None, level: float = 0.95,
                categories: Optional[Sequence] = None) -> KappaResult:
    """Cohen's (weighted) kappa of two raters with the Fleiss-Cohen-Everitt (1969) large-sample SE.

    Matches R's vcd::Kappa (version >= 1.4): "linear" = "Equal-Spacing", "quadratic" = "Fleiss-Cohen"
    agreement weights over the sorted categories (or ``categories`` in the given order).  The CI is
    kappa +/- z * se, clipped to [-1, 1] as vcd's ``confint``.
    """
    a, b = np.asarray(r1), np.asarray(r2)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise EvaluationInputError("The two raters' ratings must be flat lists of the same, non-zero length.")
    cats = np.unique(np.concatenate([a, b])) if categories is None else np.asarray(categories)
    index = {v: i for i, v in enumerate(cats.tolist())}
    try:
        ia = np.array([index[v] for v in a.tolist()])
        ib = np.array([index[v] for v in b.tolist()])
    except KeyError as exc:
        raise EvaluationInputError(f"Rating {exc.args[0]!r} is not one of the categories {cats.tolist()}.") from None
    k = cats.size
    table = np.zeros((k, k))
    np.add.at(table, (ia, ib), 1.0)
    n = table.sum()
    p = table / n
    w = _kappa_weights(k, weights)
    row, col = p.sum(axis=1), p.sum(axis=0)
    po = float((w * p).sum())
    pc = float((w * np.outer(row, col)).sum())
    z = _z(level)
    if pc >= 1.0:  # both raters used one and the same category: kappa undefined
        nan = float("nan")
        return KappaResult(nan, nan, nan, nan, level, weights, tuple(cats.tolist()))
    kappa = (po - pc) / (1.0 - pc)
    wi = w @ col   # weighted mean agreement of row category i over rater 2's margin
    wj = w.T @ row  # of column category j over rater 1's margin
    resid = w - (wi[:, None] + wj[None, :]) * (1.0 - kappa)
    var = ((p * resid ** 2).sum() - (kappa - pc * (1.0 - kappa)) ** 2) / ((1.0 - pc) ** 2 * n)
    se = float(np.sqrt(max(var, 0.0)))
    return KappaResult(kappa=float(kappa), se=se, ci_low=max(-1.0, float(kappa - z * se)),
                       ci_high=min(1.0, float(kappa + z * se)),
                       level=level, weights=weights, categories=tuple(cats.tolist()))


def fleiss_kappa(counts) -> FleissKappaResult:
    """Fleiss' kappa from a subjects x categories table of rater counts (same raters per subject).

    se is the null (kappa = 0) standard error of Fleiss, Nee & Landis (1979); z = kappa/se and the
    two-sided p as irr::kappam.fleiss (irr >= 0.6; irr 0.5 used Fleiss' 1971 formula instead).
    """
    t = np.asarray(counts, dtype=float)
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 2:
        raise EvaluationInputError("counts must be a table with one row per subject and one column per category.")
    if np.any(t < 0) or np.any(t != np.round(t)):
        raise EvaluationInputError("counts must be non-negative whole numbers of raters.")
    per = t.sum(axis=1)
    nr = per[0]
    if nr < 2 or np.any(per != nr):
        raise EvaluationInputError("Every subject must be rated by the same number (at least 2) of raters.")
    ns = t.shape[0]
    agree = float(((t ** 2).sum(axis=1) - nr).sum() / (nr * (nr - 1) * ns))
    pj = t.sum(axis=0) / (ns * nr)
    pq = pj * (1.0 - pj)
    spq = float(pq.sum())
    if spq <= 0.0:  # every rating in one category: kappa undefined
        nan = float("nan")
        return FleissKappaResult(nan, nan, nan, nan, int(ns), int(nr))
    chance = float((pj ** 2).sum())
    kappa = (agree - chance) / (1.0 - chance)
    var = 2.0 / (spq ** 2 * ns * nr * (nr - 1)) * (spq ** 2 - float((pq * (1.0 - 2.0 * pj)).sum()))
    se = float(np.sqrt(var))
    z = kappa / se
    return FleissKappaResult(kappa=float(kappa), se=se, z=float(z), p_value=float(2 * _st.norm.sf(abs(z))),
                             n_subjects=int(ns), n_raters=int(nr))


# ------------------------------------------------------------------------------ clinical utility
def net_benefit(y_true, y_score, thresholds) -> NetBenefitResult:
    """Decision-curve net benefit (Vickers & Elkin 2006) at each threshold probability pt in [0, 1).

    model: TP/n - FP/n * pt/(1-pt) with positives score >= pt; treat all: prevalence - (1 - prevalence)
    * pt/(1-pt); treat none: 0.
    """
    y = _binary(y_true)
    if y.size == 0:
        raise EvaluationInputError("y_true is empty; net benefit needs at least one patient.")
    s = _scores(y_score, y.size)
    pt = np.atleast_1d(np.asarray(thresholds, dtype=float))
    if pt.ndim != 1 or np.any(~np.isfinite(pt)) or np.any(pt < 0) or np.any(pt >= 1):
        raise EvaluationInputError("Threshold probabilities must lie in [0, 1) (e.g. 0.05 to 0.5).")
    n = y.size
    odds = pt / (1.0 - pt)
    pos = s[None, :] >= pt[:, None]
    tp = (pos & y[None, :]).sum(axis=1)
    fp = (pos & ~y[None, :]).sum(axis=1)
    prev = y.mean()
    return NetBenefitResult(thresholds=pt, model=tp / n - fp / n * odds,
                            treat_all=prev - (1.0 - prev) * odds, treat_none=np.zeros_like(pt))


def calibration_curve(y_true, y_score, n_bins: int = 10, strategy: str = "uniform") -> CalibrationResult:
    """Observed event rate vs mean predicted risk per bin, and the Brier score.

    "uniform": equal-width bins on [0, 1]; "quantile": bins with equal numbers of predictions.  Bins
    are half-open [lo, hi) except the last, which includes 1.
    """
    y = _binary(y_true)
    if y.size == 0:
        raise EvaluationInputError("y_true is empty; calibration needs at least one patient.")
    s = _scores(y_score, y.size)
    if np.any(s < 0) or np.any(s > 1):
        raise EvaluationInputError("Calibration needs predicted probabilities between 0 and 1.")
    if int(n_bins) < 1:
        raise EvaluationInputError(f"n_bins must be at least 1, got {n_bins}.")
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    elif strategy == "quantile":
        edges = np.quantile(s, np.linspace(0.0, 1.0, int(n_bins) + 1))
    else:
        raise EvaluationInputError(f'Unknown binning strategy "{strategy}"; use "uniform" or "quantile".')
    idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, edges.size - 2)
    nb = edges.size - 1
    counts = np.bincount(idx, minlength=nb)
    sum_pred = np.bincount(idx, weights=s, minlength=nb)
    sum_obs = np.bincount(idx, weights=y.astype(float), minlength=nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.where(counts > 0, sum_pred / counts, np.nan)
        observed = np.where(counts > 0, sum_obs / counts, np.nan)
    return CalibrationResult(bin_edges=edges, mean_predicted=mean_pred, observed=observed, counts=counts,
                             brier=float(np.mean((s - y) ** 2)))
