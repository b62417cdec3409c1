"""Evaluation statistics for research use: ROC/AUC with DeLong or bootstrap CIs, the paired DeLong
test, binary metrics with binomial CIs, Youden threshold, McNemar, Cohen's and Fleiss' kappa,
decision-curve net benefit and calibration (numpy/scipy only; see :mod:`.stats`), and the Obuchowski-Rockette
multi-reader multi-case analysis (:mod:`.mrmc`)."""
from __future__ import annotations

from .mrmc import MRMCResult, obuchowski_rockette  # noqa: F401
from .stats import (  # noqa: F401
    AUCResult,
    BinaryMetrics,
    CalibrationResult,
    DeLongTestResult,
    Estimate,
    EvaluationInputError,
    FleissKappaResult,
    KappaResult,
    McNemarResult,
    NetBenefitResult,
    RocCurve,
    YoudenResult,
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
    rule_out_threshold,
    youden_threshold,
)

__all__ = [
    "AUCResult", "BinaryMetrics", "CalibrationResult", "DeLongTestResult", "Estimate", "EvaluationInputError",
    "FleissKappaResult", "KappaResult", "MRMCResult", "McNemarResult", "NetBenefitResult", "RocCurve", "YoudenResult",
    "binary_metrics", "calibration_curve", "cohen_kappa", "delong_placements", "delong_test", "fleiss_kappa",
    "mcnemar", "net_benefit", "obuchowski_rockette", "proportion_ci", "roc_auc", "roc_curve", "youden_threshold",
]
