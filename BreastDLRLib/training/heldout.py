"""A classifier bundle's own held-out fold, cut again: for measuring it after training (ensembles, test-time
augmentation) on exactly the patients its training never saw.

The bundle's manifest says what it needs: the crops (``input``: size, margin, margin_of) and the patient split
(``provenance.config``: folds, validation fold, split seed, task, joint tasks).  The cases and folds are those
of :func:`BreastDLRLib.training.classifier.train_classifier`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from .classifier import build_crops, classifier_folds, label_of, predict_probs, tasks_of
from .data import Case, read_manifest_csv, split_seed_of


def split_of(manifest: Dict[str, Any]) -> Dict[str, Any]:
    """What a bundle's held-out fold depends on: its crops and its patient split."""
    cfg, inp = manifest["provenance"]["config"], manifest["input"]
    return {"folds": cfg["folds"], "val_fold": cfg["val_fold"], "split_seed": split_seed_of(cfg),
            "size": int(inp["size"][0]), "margin": float(inp["margin"]), "margin_of": inp.get("margin_of", "shorter"),
            "task": cfg.get("task"), "joint": tuple(manifest["metrics"].get("multitask") or ())}


def held_out_crops(manifests: Sequence[Dict[str, Any]], data_manifest: str | Path, task: str,
                   cache_dir: Optional[Path] = None) -> Tuple[np.ndarray, np.ndarray, List[Case]]:
    """(crops uint8 (N, H, W), labels (N,), cases) of the held-out fold shared by every bundle manifest given."""
    splits = [split_of(m) for m in manifests]
    if any(s != splits[0] for s in splits):
        raise InputError(f"The models were not trained on one split, input and task: {splits}")
    sp = splits[0]
    if sp["task"] != task:
        raise InputError(f"The models are {sp['task']} models, not {task}.")
    run_task = "both" if set(sp["joint"]) == {"malignancy", "risk"} else task
    cases = [c for c in read_manifest_csv(data_manifest) if any(label_of(c, t) is not None for t in tasks_of(run_task))]
    cache = None if cache_dir is None else Path(cache_dir) / f"crops_{run_task}_{sp['size']}_{sp['margin_of']}.npz"
    x, y, cases = build_crops(cases, run_task, sp["size"], sp["margin"], sp["margin_of"], cache=cache)
    folds = classifier_folds(cases, tasks_of(run_task), sp["folds"], sp["split_seed"])
    va = np.where(folds == sp["val_fold"])[0]
    col = tasks_of(run_task).index(task)
    va = va[y[va, col] >= 0]
    expected = manifests[0]["metrics"].get("val_crops")
    if expected is not None and expected != len(va):
        raise InputError(f"{len(va)} held-out crops here, {expected} when the model was trained: the data or the "
                         "split differ.")
    return x[va], y[va, col], [cases[i] for i in va]


def probabilities(net, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(plain, with the mirror averaged in) positive-class probabilities of one network, fp32."""
    plain = predict_probs(net, x, bf16=False)[:, 0]
    mirrored = predict_probs(net, np.ascontiguousarray(x[:, :, ::-1]), bf16=False)[:, 0]
    return plain, (plain + mirrored) / 2
