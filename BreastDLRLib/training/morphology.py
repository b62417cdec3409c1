"""Morphology models: the image model's score fused with handcrafted lesion features of a reader's outline.

Two stages, so that neither sees a score it was trained on:

1. a logistic regression on the standardised :data:`BreastDLRLib.morphology.FEATURES` of the outlines, fitted
   on the image model's *training* patients (the features are handcrafted, so a lesion's features are no better
   for having been in the image model's training);
2. a logistic regression on [logit of the image model's probability, stage-1 score], fitted on the image model's
   *held-out* fold, where its probabilities are out-of-sample.  Its cross-validated AUC (folds grouped by
   patient) is what the model card reports.

The two stages are linear, so they fold exactly into one :class:`BreastDLRLib.clinical.LinearFusionHead` on
[image logit, features], stored as JSON.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..clinical import LinearFusionHead
from ..errors import BreastDLRError
from ..morphology import FEATURE_NAMES, feature_vector, lesion_features
from .data import Case


def outline_features(cases: Sequence[Case], cache: Optional[Path] = None,
                     log: Callable[[str], None] = print) -> Dict[str, np.ndarray]:
    """{case_id: feature vector} of every case whose mask gives a usable outline, read as ``analyze`` reads them.

    Cached as JSON keyed by case id (with the feature names, so a cache of other features is not reused).
    """
    from ..io import read_mask, read_volume

    if cache is not None and cache.is_file():
        z = json.loads(cache.read_text("utf-8"))
        if z.get("features") == list(FEATURE_NAMES):
            have = {k: np.asarray(v, dtype=np.float64) for k, v in z["values"].items()}
            if all(c.case_id in have or c.case_id in z.get("skipped", {}) for c in cases if c.mask is not None):
                return have
    out: Dict[str, np.ndarray] = {}
    skipped: Dict[str, str] = {}
    for c in cases:
        if c.mask is None or not c.mask.is_file():
            continue
        try:
            sp = c.row.get("pixel_spacing_mm") or None
            vol = read_volume(c.image, spacing=float(sp) if sp else None)
            mask = read_mask(c.mask, vol)
            out[c.case_id] = feature_vector(lesion_features(vol.array[0], mask[0] > 0))
        except BreastDLRError as exc:
            skipped[c.case_id] = str(exc)
    if skipped:
        log(f"[morphology] {len(skipped)} case(s) without a usable outline, e.g. {next(iter(skipped))}: "
            f"{next(iter(skipped.values()))}")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"features": list(FEATURE_NAMES), "values": {k: v.tolist() for k, v in out.items()},
                                     "skipped": skipped}), encoding="utf-8")
    return out


@dataclass
class MorphologyFit:
    head: LinearFusionHead           # on [image logit, features]
    oof: np.ndarray                  # cross-validated fused probabilities of the held-out cases
    features_only: np.ndarray        # stage-1 scores of the held-out cases (features alone)
    stage2: Tuple[float, float, float]   # weight of the image logit, of the feature score, intercept


def fit_morphology_head(x_train: np.ndarray, y_train: np.ndarray, image_logit: np.ndarray, x_held: np.ndarray,
                        y_held: np.ndarray, groups: Sequence[str], C: float = 1.0, folds: int = 5,
                        seed: int = 0) -> MorphologyFit:
    """Stage 1 on (x_train, y_train), stage 2 on the held-out cases; returns the folded head and the
    held-out cases' cross-validated (patient-grouped) fused probabilities."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold

    stage1 = LinearFusionHead(C=C).fit(x_train, y_train)
    s1 = stage1.decision_function(x_held)
    S = np.c_[image_logit, s1]
    oof = np.zeros(len(y_held))
    for tr, te in StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(S, y_held, list(groups)):
        oof[te] = LogisticRegression(C=1.0).fit(S[tr], y_held[tr]).predict_proba(S[te])[:, 1]
    st2 = LogisticRegression(C=1.0).fit(S, y_held)
    a, b = (float(v) for v in st2.coef_[0])
    c = float(st2.intercept_[0])
    head = LinearFusionHead(C=C)
    head.classes_ = np.array([0, 1])
    head.n_features_in_ = 1 + x_train.shape[1]
    head.mean_ = np.r_[0.0, stage1.mean_]
    head.scale_ = np.r_[1.0, stage1.scale_]
    head.coef_ = np.r_[a, b * stage1.coef_[0]][None]
    head.intercept_ = np.array([b * float(stage1.intercept_[0]) + c])
    return MorphologyFit(head, oof, s1, (a, b, c))


def train_rows(cases: Sequence[Case], feats: Dict[str, np.ndarray], label: Callable[[Case], Optional[int]],
               exclude_patients: set) -> Tuple[np.ndarray, np.ndarray, List[Case]]:
    """Features and labels of the labelled cases of patients not in ``exclude_patients``."""
    kept = [c for c in cases if c.case_id in feats and label(c) is not None
            and f"{c.dataset}/{c.patient_id}" not in exclude_patients]
    return (np.array([feats[c.case_id] for c in kept]), np.array([label(c) for c in kept], dtype=int), kept)
