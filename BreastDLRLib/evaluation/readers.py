"""Reader studies in ``breastdlr evaluate``: radiologists' ratings as scores, and how well the readers agree
with each other.

Two rating scales (``--reader-scale``):

* ``birads`` (default): one BI-RADS category per case (``3``, ``4a``, ``BI-RADS 4B``, ...).  For the ROC analysis
  the categories become ordinal scores (:data:`GRADE_SCORE`: 4A = 4.0, 4B = 4.3, 4C = 4.6), so a reader's ROC
  curve and AUC are the empirical ones over their grades, as in the reader studies of the DLR papers, and a
  reader's call is positive from a chosen grade on (default 4A: biopsy recommended).  BI-RADS 0 (incomplete)
  and 6 (known cancer) are not grades of suspicion and are refused.  A reader who grades some lesions "4" and
  others "4A"-"4C" is refused (one scale per reader); when some readers use an undivided 4, agreement is
  measured on 4A-4C merged into 4.
* ``percent``: the reader's likelihood of malignancy, 0-100 %, the finer scale many MRMC studies ask for.  The
  AUC is the empirical one over the ratings, and a call is positive above a chosen likelihood (default 2 %, the
  ceiling of BI-RADS 3 in the ACR atlas).  For agreement the ratings are put into the BI-RADS categories by the
  atlas' likelihood ranges (:func:`percent_grade`).

Agreement between readers is Cohen's kappa for each pair (unweighted and linear-weighted over the ordered grades,
and on the positive call) and, from three readers on, Fleiss' kappa over all of them.  An empty cell leaves the
case out, as for a missing score.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import ClinicalInputError
from ..recommend import normalise_birads
from .mrmc import next_study_sizes, obuchowski_rockette
from .stats import MISSING, EvaluationInputError, cohen_kappa, fleiss_kappa

GRADES = ("1", "2", "3", "4", "4a", "4b", "4c", "5")       # ordered; "4" is the undivided category
GRADE_SCORE = {"1": 1.0, "2": 2.0, "3": 3.0, "4": 4.0, "4a": 4.0, "4b": 4.3, "4c": 4.6, "5": 5.0}
SUBDIVIDED = ("4a", "4b", "4c")
DEFAULT_POSITIVE = "4a"
SCALES = ("birads", "percent")
DEFAULT_POSITIVE_PERCENT = 2.0
# ACR BI-RADS Atlas, 5th edition (2013): likelihood of malignancy of each final assessment category.  A rating
# is in the first category whose upper bound it does not pass; 4C is "> 50 % and < 95 %", 5 is ">= 95 %".
PERCENT_GRADES = (("2", 0.0), ("3", 2.0), ("4a", 10.0), ("4b", 50.0))


def percent_grade(p: float) -> str:
    """The BI-RADS category of a likelihood of malignancy in percent (ACR atlas): 0 % -> 2 (benign; 1 and 2 cannot
    be told apart on this scale), up to 2 % -> 3, up to 10 % -> 4A, up to 50 % -> 4B, below 95 % -> 4C, else 5."""
    for grade, upper in PERCENT_GRADES:
        if p <= upper:
            return grade
    return "4c" if p < 95.0 else "5"


@dataclass(frozen=True)
class ReaderCall:
    """How reader columns are read (``scale``) and when a reader's call is positive: score >= ``cut``."""

    scale: str              # "birads" or "percent"
    positive: str           # a grade ("4a") or a likelihood in percent ("2")
    cut: float

    @property
    def text(self) -> str:
        """E.g. "positive from BI-RADS 4A" or "positive above 2 % likelihood of malignancy"."""
        if self.scale == "birads":
            return f"positive from BI-RADS {self.positive.upper()}"
        return f"positive above {self.positive} % likelihood of malignancy"

    @property
    def short(self) -> str:
        return f"BI-RADS {self.positive.upper()} and above" if self.scale == "birads" else f"above {self.positive} %"


def check_scale(scale: str) -> None:
    """``--reader-scale`` is one of :data:`SCALES`."""
    if scale not in SCALES:
        raise EvaluationInputError(f"--reader-scale must be birads or percent, got '{scale}'.")


def _percent(text: str) -> float:
    """A percentage as written ("7.5", "12 %"); NaN when it is not a number."""
    try:
        return float(str(text).strip().rstrip("%").strip())
    except ValueError:
        return float("nan")


def reader_call(scale: str = "birads", positive: Optional[str] = None) -> ReaderCall:
    """``--reader-scale`` and ``--reader-positive`` checked (an error names the fix); ``positive`` None = the
    scale's default (4A, or 2 %)."""
    check_scale(scale)
    if scale == "birads":
        g = positive_from(DEFAULT_POSITIVE if positive is None else positive)
        return ReaderCall("birads", g, GRADE_SCORE[g])
    p = DEFAULT_POSITIVE_PERCENT if positive is None else _percent(positive)
    if not 0.0 <= p < 100.0:
        raise EvaluationInputError(f"With --reader-scale percent, --reader-positive is the likelihood of malignancy "
                                   f"above which a reader's call is positive, from 0 to below 100 (default 2, the "
                                   f"ceiling of BI-RADS 3); got '{positive}'.")
    return ReaderCall("percent", f"{p:g}", float(np.nextafter(p, np.inf)))


def parse_percent(text: str, column: str, case_id: str) -> Optional[float]:
    """A reader's likelihood of malignancy (0-100, a trailing % allowed); None when empty; an error otherwise."""
    t = (text or "").strip()
    if t.lower() in MISSING:
        return None
    v = _percent(t)
    if not 0.0 <= v <= 100.0:
        raise EvaluationInputError(f"The reader column '{column}' holds '{t}' for case {case_id}, which is not a "
                                   "likelihood of malignancy from 0 to 100 %; with --reader-scale percent every rating "
                                   "is a percentage (leave the cell empty when the reader gave none; for BI-RADS "
                                   "grades use --reader-scale birads).")
    return v


def parse_grade(text: str, column: str, case_id: str) -> Optional[str]:
    """A reader's cell as a normalised BI-RADS grade ("4a"); None when empty; an error for anything else."""
    t = (text or "").strip()
    if t.lower() in MISSING:
        return None
    try:
        g = normalise_birads(t)
    except ClinicalInputError:
        raise EvaluationInputError(f"The reader column '{column}' holds '{t}' for case {case_id}, which is not a BI-RADS "
                                   "grade; use 1, 2, 3, 4, 4A, 4B, 4C or 5 (leave the cell empty when the reader gave "
                                   "none).") from None
    if g == "0":
        raise EvaluationInputError(f"The reader column '{column}' holds BI-RADS 0 (incomplete assessment) for case "
                                   f"{case_id}; it is not a grade of suspicion. Leave the cell empty to leave the case "
                                   "out of the reader study.")
    if g == "6":
        raise EvaluationInputError(f"The reader column '{column}' holds BI-RADS 6 (known biopsy-proven cancer) for case "
                                   f"{case_id}; a diagnostic reader study grades lesions before their pathology is "
                                   "known. Leave the cell empty to leave the case out.")
    return g


def positive_from(text: str) -> str:
    """The grade from which a reader's call counts as positive (``--reader-positive``), normalised."""
    try:
        g = normalise_birads(str(text))
    except ClinicalInputError:
        g = None
    if g not in ("2", "3", "4", "4a", "4b", "4c", "5"):
        raise EvaluationInputError(f"--reader-positive must be a BI-RADS grade from 2 to 5 such as 4A (positive from "
                                   f"that grade on), got '{text}'.")
    return "4a" if g == "4" else g


def check_scales(grades: Dict[str, Sequence[str]], positive: str) -> None:
    """One scale per reader; a cut inside category 4 needs readers who subdivide it."""
    for col, gs in grades.items():
        used = set(gs)
        if "4" in used and used & set(SUBDIVIDED):
            sub = sorted(g.upper() for g in used & set(SUBDIVIDED))
            raise EvaluationInputError(f"The reader column '{col}' grades some cases 4 and others {', '.join(sub)}; "
                                       "use one scale per reader (either 4 alone, or 4A, 4B and 4C).")
        if "4" in used and positive in ("4b", "4c"):
            raise EvaluationInputError(f"--reader-positive {positive.upper()} falls inside category 4, but the reader "
                                       f"column '{col}' does not subdivide 4 into 4A-4C; choose 4A or 5.")


def reader_scores(grades: Sequence[str]) -> np.ndarray:
    """The ordinal scores of a reader's grades (:data:`GRADE_SCORE`)."""
    return np.array([GRADE_SCORE[g] for g in grades], dtype=float)


def _kappa(r1, r2, weights, cats, level) -> Dict[str, Any]:
    k = cohen_kappa(r1, r2, weights=weights, level=level, categories=cats)
    return {"kappa": k.kappa, "se": k.se, "ci_low": k.ci_low, "ci_high": k.ci_high}


def agreement(grades: Dict[str, Sequence[str]], scores: Optional[Dict[str, np.ndarray]] = None,
              call: Optional[ReaderCall] = None, level: float = 0.95) -> Optional[Dict[str, Any]]:
    """Pairwise Cohen's kappa (unweighted, linear-weighted, positive call) and, from three readers on, Fleiss'
    kappa over the ordered grades; None with fewer than two readers.  ``grades`` are BI-RADS categories (with the
    percent scale, the categories of the ratings); ``scores`` the readers' scores (default: the grades' ordinal
    scores), called positive by ``call`` (default: from BI-RADS 4A)."""
    call = call or reader_call()
    if scores is None:
        scores = {c: reader_scores(g) for c, g in grades.items()}
    names = list(grades)
    if len(names) < 2:
        return None
    merged = any("4" in set(gs) for gs in grades.values())
    norm = {c: ["4" if merged and g in SUBDIVIDED else g for g in gs] for c, gs in grades.items()}
    cats = [g for g in GRADES if any(g in set(gs) for gs in norm.values())]
    pairs: List[Dict[str, Any]] = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = norm[a], norm[b]
            ca = [bool(v >= call.cut) for v in scores[a]]
            cb = [bool(v >= call.cut) for v in scores[b]]
            pairs.append({"a": a, "b": b, "n": len(ra),
                          "exact_agreement": float(np.mean([x == y for x, y in zip(ra, rb)])),
                          "kappa": _kappa(ra, rb, None, cats, level),
                          "kappa_linear": _kappa(ra, rb, "linear", cats, level),
                          "kappa_positive_call": _kappa(ca, cb, None, [False, True], level)})
    fleiss = None
    if len(names) >= 3:
        counts = np.zeros((len(norm[names[0]]), max(2, len(cats))))  # one grade only: kappa undefined (NaN)
        index = {g: j for j, g in enumerate(cats)}
        for gs in norm.values():
            for s, g in enumerate(gs):
                counts[s, index[g]] += 1
        f = fleiss_kappa(counts)
        fleiss = {"kappa": f.kappa, "se": f.se, "z": f.z, "p_value": f.p_value, "n_subjects": f.n_subjects,
                  "n_raters": f.n_raters}
    return {"readers": names, "scale": call.scale, "categories": cats, "subdivisions_merged": merged,
            "positive_from": call.positive if call.scale == "birads" else None, "call": call.text, "pairs": pairs,
            "fleiss": fleiss}


def mrmc_unaided_vs_aided(y: np.ndarray, scores: Dict[str, np.ndarray], pairs: Sequence[Sequence[str]],
                          level: float = 0.95) -> Dict[str, Any]:
    """Obuchowski-Rockette MRMC analysis of the readers' AUCs without and with the AI (:mod:`.mrmc`).

    ``pairs`` are (unaided column, aided column) of each reader; every reader graded every case both ways (the
    cases with a missing grade were left out before).  The reader is named by the unaided column."""
    if len(pairs) < 2:
        raise EvaluationInputError("An MRMC analysis of aided reading needs at least two readers, each with an "
                                   "unaided and an aided column (--readers r1,r2 --aided r1_ai,r2_ai).")
    ratings = np.array([[scores[u] for u, _ in pairs], [scores[a] for _, a in pairs]])
    res = obuchowski_rockette(y, ratings, modalities=["unaided", "aided"], readers=[u for u, _ in pairs],
                              level=level)
    out = res.to_dict()
    out["aided_columns"] = {u: a for u, a in pairs}
    out["sample_size"] = next_study_sizes(res)
    return out
