"""Multi-reader multi-case (MRMC) ROC analysis: the Obuchowski-Rockette method with Hillis' degrees of freedom.

The design of the reader studies in the DLR papers: J readers each read the same K cases in I modalities (for
example without and then with the AI's help), and the question is whether the reader-averaged AUC differs between
the modalities when both readers and cases are a sample (random-reader random-case, RRRC), the readers are fixed
and only the cases a sample (FRRC), or the cases are fixed (RRFC).

The figure of merit is the empirical (Wilcoxon) AUC of each modality-reader pair.  Its case-sampling
covariances come from the jackknife over cases (the default, as in OR-DBM MRMC and RJafroc) or from DeLong's
structural components.  Formulas: Obuchowski & Rockette 1995; Hillis 2007 (the denominator degrees of freedom
of the RRRC test) and Hillis et al. 2008; the variance-component notation is that of Chakraborty's
*Observer Performance Methods* (RJafroc).

Also here: the AI against the readers' average (:func:`ai_versus_readers`, Hillis 2007 section 5.3) and the power
and number of cases of a next study from these variance components (:func:`mrmc_power`, :func:`cases_for_power`;
Hillis, Obuchowski and Berbaum 2011).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import stats as _st

from .stats import EvaluationInputError, _binary, delong_placements, to_json

COVARIANCE_METHODS = ("jackknife", "delong")


@dataclass
class TreatmentDifference:
    """A difference of reader-averaged AUCs (modality a minus modality b) with its test and interval."""
    a: str
    b: str
    estimate: float
    std_err: float
    df: float                       # inf for the normal (z) approximation of FRRC
    statistic: float                # t (or z)
    p_value: float
    ci_low: float
    ci_high: float


@dataclass
class TreatmentMean:
    """One modality's reader-averaged AUC with its interval."""
    modality: str
    estimate: float
    std_err: float
    df: float
    ci_low: float
    ci_high: float


@dataclass
class ORAnalysis:
    """One generalisation (RRRC, FRRC or RRFC): the overall test and the intervals."""
    statistic: float                # F (RRRC, RRFC) or chi-square (FRRC)
    ndf: float
    ddf: float                      # inf for FRRC's chi-square
    p_value: float
    differences: List[TreatmentDifference]
    means: List[TreatmentMean]


@dataclass
class MRMCResult:
    modalities: List[str]
    readers: List[str]
    n_diseased: int
    n_nondiseased: int
    covariance: str
    level: float
    auc: np.ndarray                 # (modalities, readers)
    ms_t: float
    ms_r: float
    ms_tr: float
    var: float                      # error variance (mean of the AUCs' case-sampling variances)
    cov1: float                     # same reader, different modality
    cov2: float                     # same modality, different readers
    cov3: float                     # different modality and reader
    var_r: float                    # reader variance component
    var_tr: float                   # modality-by-reader variance component
    rrrc: ORAnalysis
    frrc: ORAnalysis
    rrfc: ORAnalysis
    per_reader: List[TreatmentDifference] = field(default_factory=list)   # FRRC, each reader on their own

    def to_dict(self) -> Dict:
        """Plain JSON values (NaN and infinite degrees of freedom as None)."""
        def an(a: ORAnalysis):
            return {"statistic": a.statistic, "ndf": a.ndf, "ddf": a.ddf, "p_value": a.p_value,
                    "differences": [asdict(d) for d in a.differences], "means": [asdict(m) for m in a.means]}

        return to_json({
            "method": "Obuchowski-Rockette, Hillis degrees of freedom", "figure_of_merit": "empirical AUC",
            "covariance": self.covariance, "level": self.level, "modalities": self.modalities, "readers": self.readers,
            "n_diseased": self.n_diseased, "n_nondiseased": self.n_nondiseased,
            "auc": {m: {r: float(self.auc[i, j]) for j, r in enumerate(self.readers)} for i, m in enumerate(self.modalities)},
            "anova": {"ms_t": self.ms_t, "ms_r": self.ms_r, "ms_tr": self.ms_tr},
            "variance_components": {"var": self.var, "cov1": self.cov1, "cov2": self.cov2, "cov3": self.cov3,
                                    "var_r": self.var_r, "var_tr": self.var_tr},
            "rrrc": an(self.rrrc), "frrc": an(self.frrc), "rrfc": an(self.rrfc),
            "per_reader": [asdict(d) for d in self.per_reader],
        })


def _aucs_and_covariance(y: np.ndarray, ratings: np.ndarray, method: str):
    """AUC per (modality, reader) and the covariance matrix of the flattened AUCs over case sampling."""
    i_n, j_n, k_n = ratings.shape
    flat = ratings.reshape(i_n * j_n, k_n)
    m, n = int(y.sum()), int((~y).sum())
    aucs, v10s, v01s = [], [], []
    for row in flat:
        a, v10, v01 = delong_placements(y, row)
        aucs.append(a), v10s.append(v10), v01s.append(v01)
    aucs = np.array(aucs)
    v10s, v01s = np.array(v10s), np.array(v01s)
    if method == "delong":
        cov = np.cov(v10s, ddof=1) / m + np.cov(v01s, ddof=1) / n
    else:
        # the AUC with each case left out, from the placement values (no AUC is recomputed): leaving out a
        # diseased case removes its row of comparisons, leaving out a control its column
        jk = np.empty((flat.shape[0], k_n))
        jk[:, y] = (m * aucs[:, None] - v10s) / (m - 1)
        jk[:, ~y] = (n * aucs[:, None] - v01s) / (n - 1)
        dev = jk - jk.mean(axis=1, keepdims=True)
        cov = (k_n - 1) / k_n * dev @ dev.T
    return aucs.reshape(i_n, j_n), np.atleast_2d(cov)


def _mean_off(cov4: np.ndarray, same_t: bool, same_r: bool) -> float:
    """Mean of the covariances between (i, j) and (i', j') with i == i' iff ``same_t`` and j == j' iff ``same_r``."""
    i_n, j_n = cov4.shape[:2]
    vals = [cov4[i, j, ip, jp] for i in range(i_n) for j in range(j_n) for ip in range(i_n) for jp in range(j_n)
            if (i == ip) == same_t and (j == jp) == same_r]
    return float(np.mean(vals)) if vals else float("nan")


def _f_sf(f: float, ndf: float, ddf: float) -> float:
    """P(F(ndf, ddf) > f); infinite ``ddf`` (readers without any reader-by-modality spread) is chi-square / ndf."""
    if not np.isfinite(f):
        return float("nan")
    return float(_st.chi2.sf(f * ndf, ndf) if not np.isfinite(ddf) else _st.f.sf(f, ndf, ddf))


def obuchowski_rockette(y_true, ratings, modalities: Optional[Sequence[str]] = None,
                        readers: Optional[Sequence[str]] = None, covariance: str = "jackknife",
                        level: float = 0.95) -> MRMCResult:
    """Obuchowski-Rockette MRMC analysis of ``ratings`` (modalities x readers x cases) against ``y_true``.

    Every reader rates every case in every modality (the fully crossed design); higher ratings mean more
    suspicion.  Needs at least two modalities, two readers, and two diseased and two non-diseased cases.
    """
    if covariance not in COVARIANCE_METHODS:
        raise EvaluationInputError(f'Unknown covariance method "{covariance}"; use one of: {", ".join(COVARIANCE_METHODS)}.')
    if not 0.0 < level < 1.0:
        raise EvaluationInputError(f"Confidence level must be between 0 and 1 (e.g. 0.95), got {level}.")
    r = np.asarray(ratings, dtype=float)
    if r.ndim != 3:
        raise EvaluationInputError(f"MRMC ratings must be modalities x readers x cases, got an array of {r.ndim} dimensions.")
    i_n, j_n, k_n = r.shape
    y = _binary(y_true)
    if y.size != k_n:
        raise EvaluationInputError(f"{k_n} cases were rated but {y.size} truths were given.")
    if i_n < 2 or j_n < 2:
        raise EvaluationInputError(f"An MRMC analysis needs at least two modalities and two readers; got {i_n} "
                                   f"modalit{'y' if i_n == 1 else 'ies'} and {j_n} reader{'' if j_n == 1 else 's'}.")
    if not np.isfinite(r).all():
        raise EvaluationInputError("Every reader must rate every case in every modality (a fully crossed study); "
                                   "some ratings are missing or not numbers.")
    if y.sum() < 2 or (~y).sum() < 2:
        raise EvaluationInputError("An MRMC analysis needs at least two diseased and two non-diseased cases.")
    modalities = [str(m) for m in (modalities or [f"modality{i}" for i in range(i_n)])]
    readers = [str(x) for x in (readers or [f"reader{j}" for j in range(j_n)])]
    if len(modalities) != i_n or len(readers) != j_n:
        raise EvaluationInputError("The modality and reader names must match the ratings' shape.")

    auc, cov = _aucs_and_covariance(y, r, covariance)
    cov4 = cov.reshape(i_n, j_n, i_n, j_n)
    var = float(np.mean([cov4[i, j, i, j] for i in range(i_n) for j in range(j_n)]))
    cov1 = _mean_off(cov4, same_t=False, same_r=True)
    cov2 = _mean_off(cov4, same_t=True, same_r=False)
    cov3 = _mean_off(cov4, same_t=False, same_r=False)

    grand = auc.mean()
    t_means, r_means = auc.mean(axis=1), auc.mean(axis=0)
    ms_t = j_n * float(((t_means - grand) ** 2).sum()) / (i_n - 1)
    ms_r = i_n * float(((r_means - grand) ** 2).sum()) / (j_n - 1)
    ms_tr = float(((auc - t_means[:, None] - r_means[None, :] + grand) ** 2).sum()) / ((i_n - 1) * (j_n - 1))
    var_tr = ms_tr - var + cov1 + cov2 - cov3
    var_r = (ms_r - var_tr - var - (i_n - 1) * cov1 + cov2 + (i_n - 1) * cov3) / i_n
    alpha = 1.0 - level
    pairs = list(combinations(range(i_n), 2))

    def diffs(se: float, df: float) -> List[TreatmentDifference]:
        out = []
        crit = _st.norm.ppf(1 - alpha / 2) if not np.isfinite(df) else _st.t.ppf(1 - alpha / 2, df)
        for a, b in pairs:
            est = float(t_means[a] - t_means[b])
            stat = est / se if se > 0 else float("nan")
            p = float(2 * (_st.norm.sf(abs(stat)) if not np.isfinite(df) else _st.t.sf(abs(stat), df)))
            out.append(TreatmentDifference(modalities[a], modalities[b], est, se, df, stat, p,
                                           float(est - crit * se), float(est + crit * se)))
        return out

    def mean_ci(i: int, se: float, df: float) -> TreatmentMean:
        crit = _st.norm.ppf(1 - alpha / 2) if not np.isfinite(df) else _st.t.ppf(1 - alpha / 2, df)
        return TreatmentMean(modalities[i], float(t_means[i]), se, df, float(t_means[i] - crit * se),
                             float(t_means[i] + crit * se))

    # per-modality quantities (reader mean square, variance and Cov2 of one modality)
    ms_r_i = [float(((auc[i] - t_means[i]) ** 2).sum()) / (j_n - 1) for i in range(i_n)]
    var_i = [float(np.mean([cov4[i, j, i, j] for j in range(j_n)])) for i in range(i_n)]
    cov2_i = [float(np.mean([cov4[i, j, i, jp] for j in range(j_n) for jp in range(j_n) if j != jp])) for i in range(i_n)]

    # random readers, random cases (Hillis 2007 ddf)
    den = ms_tr + j_n * max(cov2 - cov3, 0.0)
    f_rrrc = ms_t / den if den > 0 else float("nan")
    ddf = den ** 2 / (ms_tr ** 2 / ((i_n - 1) * (j_n - 1))) if ms_tr > 0 else float("inf")
    rrrc_means = []
    for i in range(i_n):
        den_i = ms_r_i[i] + j_n * max(cov2_i[i], 0.0)
        df_i = den_i ** 2 / ms_r_i[i] ** 2 * (j_n - 1) if ms_r_i[i] > 0 else float("inf")
        rrrc_means.append(mean_ci(i, float(np.sqrt(den_i / j_n)), df_i))
    rrrc = ORAnalysis(f_rrrc, i_n - 1, ddf, _f_sf(f_rrrc, i_n - 1, ddf),
                      diffs(float(np.sqrt(2 * den / j_n)), ddf), rrrc_means)

    # fixed readers, random cases: a chi-square test
    den_f = var - cov1 + (j_n - 1) * max(cov2 - cov3, 0.0)
    chi2 = (i_n - 1) * ms_t / den_f if den_f > 0 else float("nan")
    frrc = ORAnalysis(chi2, i_n - 1, float("inf"), float(_st.chi2.sf(chi2, i_n - 1)) if np.isfinite(chi2) else float("nan"),
                      diffs(float(np.sqrt(2 * den_f / j_n)), float("inf")),
                      [mean_ci(i, float(np.sqrt((var_i[i] + (j_n - 1) * max(cov2_i[i], 0.0)) / j_n)), float("inf"))
                       for i in range(i_n)])

    # random readers, fixed cases
    f_rrfc = ms_t / ms_tr if ms_tr > 0 else float("nan")
    df_rrfc = float((i_n - 1) * (j_n - 1))
    rrfc = ORAnalysis(f_rrfc, i_n - 1, df_rrfc, _f_sf(f_rrfc, i_n - 1, df_rrfc),
                      diffs(float(np.sqrt(2 * ms_tr / j_n)), df_rrfc),
                      [mean_ci(i, float(np.sqrt(ms_r_i[i] / j_n)), j_n - 1.0) for i in range(i_n)])

    # each reader on their own (FRRC): the difference of that reader's AUCs between two modalities
    per_reader = []
    z = _st.norm.ppf(1 - alpha / 2)
    for j in range(j_n):
        for a, b in pairs:
            est = float(auc[a, j] - auc[b, j])
            se = float(np.sqrt(max(cov4[a, j, a, j] + cov4[b, j, b, j] - 2 * cov4[a, j, b, j], 0.0)))
            stat = est / se if se > 0 else float("nan")
            per_reader.append(TreatmentDifference(f"{readers[j]}:{modalities[a]}", f"{readers[j]}:{modalities[b]}", est, se,
                                                  float("inf"), stat, float(2 * _st.norm.sf(abs(stat))) if se > 0 else float("nan"),
                                                  float(est - z * se), float(est + z * se)))
    return MRMCResult(modalities, readers, int(y.sum()), int((~y).sum()), covariance, level, auc, ms_t, ms_r, ms_tr,
                      var, cov1, cov2, cov3, float(var_r), float(var_tr), rrrc, frrc, rrfc, per_reader)


def ai_versus_readers(y_true, ai_scores, reader_ratings, ai_name: str = "AI",
                      readers: Optional[Sequence[str]] = None, covariance: str = "jackknife",
                      level: float = 0.95) -> Dict:
    """The AI's AUC against the readers' average AUC, generalising to readers and cases (random readers, random
    cases): Hillis 2007, section 5.3, the analysis of Kooi et al. 2017 and RJafroc's ``StCadVsRad``.

    The AI is one fixed reader, so its scores are repeated for every reader and the Obuchowski-Rockette analysis
    compares the two "modalities"; its F test, degrees of freedom and p-value are those of the single-modality
    analysis of the readers' AUC differences from the AI (the intermediate variance components of the repeated
    design are not reported: they have no meaning of their own).  ``reader_ratings`` is readers x cases."""
    rr = np.asarray(reader_ratings, dtype=float)
    if rr.ndim != 2:
        raise EvaluationInputError("The readers' ratings must be readers x cases.")
    ai = np.asarray(ai_scores, dtype=float)
    res = obuchowski_rockette(y_true, np.stack([np.repeat(ai[None], rr.shape[0], axis=0), rr]),
                              modalities=[ai_name, "readers"], readers=readers, covariance=covariance, level=level)
    d, t = res.rrrc.differences[0], res.rrrc
    readers_mean = t.means[1]
    return to_json({"method": "Obuchowski-Rockette with the AI as a fixed reader (Hillis 2007, section 5.3)",
            "covariance": covariance, "level": level, "ai": ai_name, "readers": res.readers,
            "n_diseased": res.n_diseased, "n_nondiseased": res.n_nondiseased,
            "ai_auc": float(res.auc[0, 0]), "reader_auc": {r: float(a) for r, a in zip(res.readers, res.auc[1])},
            "readers_mean_auc": {"estimate": readers_mean.estimate, "std_err": readers_mean.std_err,
                                 "df": readers_mean.df, "ci_low": readers_mean.ci_low, "ci_high": readers_mean.ci_high},
            "difference": {"estimate": d.estimate, "std_err": d.std_err, "ci_low": d.ci_low, "ci_high": d.ci_high},
            "f": t.statistic, "ndf": t.ndf, "ddf": t.ddf, "p_value": t.p_value,
            "readers_better": int(np.sum(res.auc[1] > res.auc[0, 0])), "readers_worse": int(np.sum(res.auc[1] < res.auc[0, 0]))})


GENERALISATIONS = ("rrrc", "frrc", "rrfc")


def mrmc_power(effect: float, readers: int, cases: int, pilot_cases: int, var_tr: float, var: float, cov1: float,
               cov2: float, cov3: float, alpha: float = 0.05, generalisation: str = "rrrc") -> float:
    """Power of a two-modality Obuchowski-Rockette study with ``readers`` readers and ``cases`` cases to detect a
    reader-averaged AUC difference ``effect``, from the variance components of a pilot study of ``pilot_cases``
    cases (Hillis, Obuchowski and Berbaum 2011, Acad Radiol 18:129; the error variance and covariances scale with
    pilot_cases / cases, a negative treatment-by-reader variance counts as 0)."""
    if generalisation not in GENERALISATIONS:
        raise EvaluationInputError(f"Unknown generalisation '{generalisation}'; use one of: {', '.join(GENERALISATIONS)}.")
    if readers < 2 or cases < 2 or pilot_cases < 2:
        raise EvaluationInputError("A power calculation needs at least two readers and two cases.")
    if not 0.0 < alpha < 1.0:
        raise EvaluationInputError(f"The significance level must be between 0 and 1, got {alpha}.")
    j, scale = float(readers), pilot_cases / float(cases)
    tr = max(var_tr, 0.0)
    spread = max(cov2 - cov3, 0.0)
    if generalisation == "frrc":
        den = scale * (var - cov1 + (j - 1) * spread)
        ncp = j * effect ** 2 / (2 * den)
        return float(_st.ncx2.sf(_st.chi2.isf(alpha, 1), 1, ncp))
    if generalisation == "rrfc":
        den = tr + scale * (var - cov1 - spread)
        ddf = j - 1
    else:
        den = tr + scale * (var - cov1 + (j - 1) * spread)
        ddf = den ** 2 * (j - 1) / (tr + scale * (var - cov1 - spread)) ** 2
    ncp = j * effect ** 2 / (2 * den)
    return float(_st.ncf.sf(_st.f.isf(alpha, 1, ddf), 1, ddf, ncp))


def cases_for_power(effect: float, readers: int, pilot_cases: int, var_tr: float, var: float, cov1: float,
                    cov2: float, cov3: float, power: float = 0.8, alpha: float = 0.05, generalisation: str = "rrrc",
                    max_cases: int = 100000) -> Optional[int]:
    """The smallest number of cases that gives ``power`` (see :func:`mrmc_power`); None when even ``max_cases``
    do not (with random readers, a treatment-by-reader variance caps the power more readers would give)."""
    kw = dict(var_tr=var_tr, var=var, cov1=cov1, cov2=cov2, cov3=cov3, alpha=alpha, generalisation=generalisation)
    if mrmc_power(effect, readers, max_cases, pilot_cases, **kw) < power:
        return None
    lo, hi = 2, max_cases                                  # power grows with the cases: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        if mrmc_power(effect, readers, mid, pilot_cases, **kw) >= power:
            hi = mid
        else:
            lo = mid + 1
    return lo


def next_study_sizes(res: MRMCResult, power: float = 0.8, alpha: float = 0.05, readers: Sequence[int] = (3, 5, 10, 15, 20)):
    """Cases a next study of each size of reader panel needs for ``power`` to detect the difference this study
    observed (random readers and cases; :func:`cases_for_power`), or None when the difference is zero."""
    effect = float(res.rrrc.differences[0].estimate)
    if not np.isfinite(effect) or effect == 0:
        return None
    pilot = res.n_diseased + res.n_nondiseased
    kw = dict(var_tr=res.var_tr, var=res.var, cov1=res.cov1, cov2=res.cov2, cov3=res.cov3, power=power, alpha=alpha)
    panel = sorted({len(res.readers), *readers})
    return {"effect": abs(effect), "power": power, "alpha": alpha, "pilot_cases": pilot,
            "method": "Hillis, Obuchowski and Berbaum 2011 (random readers and cases)",
            "cases": [{"readers": j, "cases": cases_for_power(abs(effect), j, pilot, **kw)} for j in panel]}
