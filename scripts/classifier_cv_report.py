"""Cross-validated AUC of a classifier recipe from the held-out probabilities of its folds: each fold's network
scored only the patients it never trained on (``val_<task>.npz`` of scripts/add_mirror_tta.py, one per fold).

    .venv/bin/python scripts/classifier_cv_report.py --manifest ../shared/data/breast-us/manifest.csv \
        --task malignancy --fold 0=runs/cv/fold0/val_malignancy.npz --fold 1=runs/cv/fold1/val_malignancy.npz \
        --out runs/cv/cv_malignancy.json

Prints and writes per fold the AUC with its DeLong CI and by dataset, the mean and standard deviation over the folds,
and the pooled out-of-fold AUC (every fold's lesions together, each scored by the network that never saw its
patient).  Refuses folds that share a patient.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BreastDLRLib.errors import InputError  # noqa: E402
from BreastDLRLib.evaluation import roc_auc  # noqa: E402
from BreastDLRLib.training.data import read_manifest_csv  # noqa: E402


def auc_doc(y: np.ndarray, p: np.ndarray, ds: np.ndarray) -> dict:
    a = roc_auc(y, p)
    return {"n": int(y.size), "n_positive": int(y.sum()), "auc": round(a.auc, 4),
            "ci95": [round(a.ci_low, 4), round(a.ci_high, 4)],
            "auc_by_dataset": {d: round(roc_auc(y[ds == d], p[ds == d]).auc, 4) for d in sorted(set(ds))
                               if len(set(y[ds == d])) == 2}}


def report(manifest: str, folds: dict) -> dict:
    """``folds``: {fold: npz path with probs, labels, case_id}."""
    cases = {c.case_id: c for c in read_manifest_csv(manifest)}
    per, ys, ps, dss, owner = {}, [], [], [], {}
    for k, path in sorted(folds.items()):
        try:
            z = np.load(path)
            ids, y, p = [str(i) for i in z["case_id"]], z["labels"].astype(int), z["probs"].astype(float)
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"Fold {k}: cannot read held-out probabilities from {path} ({exc}); write them with "
                             "scripts/add_mirror_tta.py --work DIR (DIR/val_<task>.npz).") from exc
        unknown = [i for i in ids if i not in cases]
        if unknown:
            raise InputError(f"{path}: {len(unknown)} cases are not in the manifest (first: {unknown[0]}).")
        for i in ids:
            key = f"{cases[i].dataset}/{cases[i].patient_id}"
            if owner.setdefault(key, k) != k:
                raise InputError(f"Patient {key} is held out in folds {owner[key]} and {k}: not one split.")
        ds = np.array([cases[i].dataset for i in ids])
        per[str(k)] = auc_doc(y, p, ds)
        ys.append(y), ps.append(p), dss.append(ds)
    aucs = [f["auc"] for f in per.values()]
    return {"folds": per, "auc_mean": round(float(np.mean(aucs)), 4),
            "auc_sd": round(float(np.std(aucs, ddof=1)), 4) if len(aucs) > 1 else None,
            "pooled_out_of_fold": auc_doc(np.concatenate(ys), np.concatenate(ps), np.concatenate(dss))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--task", required=True, choices=("malignancy", "risk"))
    ap.add_argument("--fold", action="append", required=True, metavar="K=NPZ")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    try:
        folds = {int(k): v for k, v in (f.split("=", 1) for f in a.fold)}
    except ValueError:
        ap.error("--fold takes K=NPZ, e.g. --fold 0=runs/cv/fold0/val_malignancy.npz")
    try:
        doc = {"task": a.task, **report(a.manifest, folds)}
    except InputError as exc:
        sys.exit(f"classifier_cv_report: {exc}")
    print(json.dumps(doc, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
