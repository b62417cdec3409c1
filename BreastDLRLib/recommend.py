"""Two-stage re-stratification of BI-RADS 4A lesions (Lu et al. 2025).

For a lesion a radiologist graded BI-RADS 4A, two model scores are read together:

* low risk (P(high risk) < risk threshold) AND benign (P(malignant) < malignancy threshold) → downgrade to 3;
* high risk (P(high risk) >= risk threshold) AND malignant (P(malignant) >= malignancy threshold) → upgrade to 4B;
* otherwise (the scores disagree) → keep 4A.

Any other grade, no grade, or a missing score gives "not applicable" with the reason.  A score equal to
its threshold counts as high risk / malignant.  Research use only.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from .errors import ClinicalInputError

NOTE = "Research use only; not a substitute for clinical judgement."
BIRADS_CATEGORIES = ("0", "1", "2", "3", "4", "4a", "4b", "4c", "5", "6")
_BIRADS_RE = re.compile(r"^\s*(?:bi\s*-?\s*rads)?\s*(?:category|cat\.?)?\s*[:=]?\s*([0-6])\s*([abc])?\s*$", re.IGNORECASE)


def decision_scores(probabilities: Mapping[str, Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """(P(malignant), P(high risk)) as a lesion's decision uses them, from its ``probabilities``: the morphology
    models' (a reader's outline), else the clinical fusion model's (malignancy), else the image models'."""
    p = probabilities
    mal = next((p[k] for k in ("malignancy_morphology", "malignancy_fused", "malignancy") if p.get(k) is not None), None)
    risk = next((p[k] for k in ("high_risk_morphology", "high_risk") if p.get(k) is not None), None)
    return mal, risk


def normalise_birads(s: Optional[str]) -> Optional[str]:
    """"4A", "4a", "BI-RADS 4A", "birads: 4 a" → "4a"; "" or None → None.  Raises
    :class:`ClinicalInputError` for anything that is not a BI-RADS category."""
    if s is None:
        return None
    text = str(s).strip()
    if not text:
        return None
    m = _BIRADS_RE.match(text)
    category = None if m is None else m.group(1) + (m.group(2) or "").lower()
    if category not in BIRADS_CATEGORIES:
        raise ClinicalInputError(
            f"BI-RADS {text!r} is not a BI-RADS category; use 0, 1, 2, 3, 4a, 4b, 4c, 5 or 6 (for example 4a)."
        )
    return category


def birads_label(category: Optional[str]) -> str:
    """"4a" → "BI-RADS 4A" for display."""
    return "no BI-RADS grade" if category is None else f"BI-RADS {category.upper()}"


def _show(p: float, t: float) -> tuple:
    """p and t with enough decimals (2 to 6) that a p different from t never prints equal to it."""
    for d in range(2, 7):
        ps, ts = f"{p:.{d}f}", f"{t:.{d}f}"
        if p == t or ps != ts:
            break
    return ps, ts


def _check_probability(name: str, p: Optional[float]) -> Optional[float]:
    if p is None:
        return None
    if isinstance(p, bool):
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    p = float(p)
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return p


@dataclass
class Recommendation:
    """Outcome of :func:`recommend`.  ``birads_out`` is None when the rule does not apply."""

    birads_in: Optional[str]
    birads_out: Optional[str]
    action: str  # "downgrade" | "keep" | "upgrade" | "not applicable"
    rule: str
    text: str
    p_high_risk: Optional[float]
    p_malignant: Optional[float]
    risk_threshold: float
    malignancy_threshold: float
    note: str = NOTE

    def to_dict(self) -> Dict[str, Any]:
        """The ``recommendation`` entry of findings.json."""
        return {"birads_in": self.birads_in, "birads_out": self.birads_out, "action": self.action,
                "rule": self.rule, "text": self.text}


def recommend(
    birads: Optional[str],
    p_high_risk: Optional[float],
    p_malignant: Optional[float],
    risk_threshold: float = 0.5,
    malignancy_threshold: float = 0.5,
) -> Recommendation:
    """Apply the 4A re-stratification rule; see the module docstring."""
    risk_threshold = _check_probability("risk_threshold", risk_threshold)  # type: ignore[assignment]
    malignancy_threshold = _check_probability("malignancy_threshold", malignancy_threshold)  # type: ignore[assignment]
    p_high_risk = _check_probability("p_high_risk", p_high_risk)
    p_malignant = _check_probability("p_malignant", p_malignant)
    grade = normalise_birads(birads)

    def result(out: Optional[str], action: str, rule: str, text: str) -> Recommendation:
        return Recommendation(grade, out, action, rule, f"{text} {NOTE}", p_high_risk, p_malignant,
                              float(risk_threshold), float(malignancy_threshold))

    if grade != "4a":
        reason = ("no BI-RADS grade was given" if grade is None
                  else f"the lesion is graded {birads_label(grade)}")
        rule = f"not applicable: {reason}; the rule re-stratifies BI-RADS 4A lesions only"
        return result(None, "not applicable", rule, f"No re-stratification: {reason}; the rule applies to BI-RADS 4A lesions only.")
    missing = [n for n, p in (("high-risk probability", p_high_risk), ("malignancy probability", p_malignant)) if p is None]
    if missing:
        reason = " and ".join(missing) + (" is" if len(missing) == 1 else " are") + " missing"
        rule = f"not applicable: {reason}; the rule needs both scores"
        return result(None, "not applicable", rule, f"No re-stratification of this BI-RADS 4A lesion: {reason}; the rule needs both scores.")

    high = p_high_risk >= risk_threshold  # type: ignore[operator]
    malignant = p_malignant >= malignancy_threshold  # type: ignore[operator]
    pr, tr = _show(p_high_risk, risk_threshold)  # type: ignore[arg-type]
    pm, tm = _show(p_malignant, malignancy_threshold)  # type: ignore[arg-type]
    scores = (
        f"high-risk probability {pr} (threshold {tr}: {'high risk' if high else 'low risk'}); "
        f"malignancy probability {pm} (threshold {tm}: {'malignant' if malignant else 'benign'})"
    )
    if not high and not malignant:
        out, action, rule = "3", "downgrade", "4A with low risk and benign → downgrade to BI-RADS 3"
    elif high and malignant:
        out, action, rule = "4b", "upgrade", "4A with high risk and malignant → upgrade to BI-RADS 4B"
    else:
        out, action, rule = "4a", "keep", "4A with disagreeing scores → keep BI-RADS 4A"
    text = f"BI-RADS 4A lesion: {scores}. Rule applied: {rule}. Suggested category: {birads_label(out)} ({action})."
    return result(out, action, rule, text)
