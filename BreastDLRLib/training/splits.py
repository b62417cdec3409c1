"""One patient split for every model trained on a manifest.

``predict`` runs the segmenter before the classifiers, so an end-to-end measurement on the classifiers' held-out
patients is only honest when the segmenter never trained on those patients either.  The segmenter's folds are
therefore the classifiers' folds (``--task both``: the patients of every image with a pathology or a BI-RADS
label and a usable lesion mask, as :func:`BreastDLRLib.training.classifier.build_crops` keeps them); only
patients the classifiers never see (normal images, images without a mask) are dealt into folds on their own.

``split="own"`` is the segmenter's earlier split (its own stratified group k-fold over its images), kept so that
bundles trained with it are re-measured on their own held-out patients.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import BreastDLRError, InputError
from .data import Case, patient_folds

SEGMENTER_LABELS = ("benign", "malignant", "normal")
SPLITS = ("shared", "own")


def has_lesion_mask(case: Case) -> bool:
    """Whether ``case`` has a mask file with a lesion in it, read as the classifiers' crops read it."""
    from ..io import read_mask, read_volume

    if case.mask is None or not case.mask.is_file():
        return False
    try:
        sp = case.row.get("pixel_spacing_mm") or None
        vol = read_volume(case.image, spacing=float(sp) if sp else None)
        return bool(read_mask(case.mask, like=vol).any())
    except BreastDLRError:
        return False


def classifier_patient_folds(cases: Sequence[Case], k: int, seed: int) -> Dict[str, int]:
    """{``dataset/patient``: fold} of the classifiers' split (``--task both``, ``k`` folds, split seed ``seed``)."""
    from .classifier import classifier_folds, tasks_of

    usable = [c for c in cases if (c.malignant is not None or c.high_risk is not None) and has_lesion_mask(c)]
    if not usable:
        return {}
    folds = classifier_folds(usable, tasks_of("both"), k, seed)
    return {f"{c.dataset}/{c.patient_id}": int(f) for c, f in zip(usable, folds)}


def segmenter_folds(cases: Sequence[Case], k: int, seed: int, split: str = "shared") -> Tuple[List[Case], np.ndarray]:
    """(the segmenter's images, fold per image): every benign, malignant or normal image of ``cases``."""
    if split not in SPLITS:
        raise InputError(f"Unknown split {split!r}; use one of: {', '.join(SPLITS)}.")
    images = [c for c in cases if c.label in SEGMENTER_LABELS]
    if split == "own":
        return images, patient_folds(images, k, seed)
    known = classifier_patient_folds(cases, k, seed)
    folds = np.array([known.get(f"{c.dataset}/{c.patient_id}", -1) for c in images], dtype=int)
    rest = np.where(folds < 0)[0]
    if rest.size:
        folds[rest] = patient_folds([images[i] for i in rest], k, seed)
    return images, folds


def parse_folds(text: str, k: int, val_fold: int) -> Optional[Tuple[int, ...]]:
    """``"1,2"`` -> (1, 2): training folds given explicitly (None for ``""``: every fold but ``val_fold``)."""
    if not str(text or "").strip():
        return None
    try:
        folds = tuple(sorted({int(f) for f in str(text).split(",") if f.strip()}))
    except ValueError:
        raise InputError(f"Training folds must be fold numbers separated by commas, not {text!r}.") from None
    if not folds or any(not 0 <= f < k for f in folds) or val_fold in folds:
        raise InputError(f"Training folds {text!r} must lie in 0..{k - 1} and leave out the validation fold {val_fold}.")
    return folds


def segmenter_split(cases: Sequence[Case], k: int, seed: int, val_fold: int,
                    split: str = "shared", train_folds: Optional[Sequence[int]] = None) -> Tuple[List[Case], List[Case]]:
    """The segmenter's (training, validation) images; ``train_folds`` restricts training to those folds."""
    images, folds = segmenter_folds(cases, k, seed, split)
    train = [c for c, f in zip(images, folds) if f != val_fold and (train_folds is None or f in train_folds)]
    return train, [c for c, f in zip(images, folds) if f == val_fold]
