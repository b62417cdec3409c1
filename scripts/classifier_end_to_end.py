"""Measure the 2D classifiers end to end on their own held-out patients: `breastdlr predict` on the held-out fold's
images, so the segmenter outlines and crops every lesion as it does for a user (no reader outline).

    .venv/bin/python scripts/classifier_end_to_end.py --manifest ../shared/data/breast-us/manifest.csv \
        --malignancy Resources/Models/breastdlr-malignancy-2d --risk Resources/Models/breastdlr-risk-2d \
        --work runs/e2e

The held-out fold is cut again from the bundles' own split (BreastDLRLib.training.heldout).  Writes
``<work>/heldout_manifest.csv`` (the fold's rows, absolute paths), ``<work>/predictions.csv`` (what `predict`
wrote) and ``<work>/end_to_end.json`` (per task: AUC with its DeLong CI, by dataset, on the images whose
outline the segmenter flagged as uncertain and on the others, and how many images had no lesion found; and how many held-out images the segmenter trained on, which is 0 for a segmenter trained on the
classifiers' split).  The installed fusion and morphology models apply as they do for a user (the malignancy score is
then the fused one where an age is known); ``--image-only`` leaves them out.  `breastdlr evaluate <work>/predictions.csv --truth <work>/heldout_manifest.csv` gives the full report.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BreastDLRLib.batch import predict_manifest  # noqa: E402
from BreastDLRLib.bundles import open_bundle  # noqa: E402
from BreastDLRLib.evaluation import roc_auc  # noqa: E402
from BreastDLRLib.training.heldout import held_out_crops  # noqa: E402

COLUMN = {"malignancy": "probability_malignant", "risk": "probability_high_risk"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--malignancy", default="Resources/Models/breastdlr-malignancy-2d")
    ap.add_argument("--risk", default="Resources/Models/breastdlr-risk-2d")
    ap.add_argument("--segmenter", default=None, help="a segmenter bundle (default: the shipped one)")
    ap.add_argument("--work", default="runs/e2e")
    ap.add_argument("--image-only", action="store_true",
                    help="the image models alone: no installed fusion or morphology model is added (to compare image "
                         "models whose fusion heads were fitted on other scores)")
    ap.add_argument("--segmenter-outlines-as-reader", action="store_true",
                    help="also hand the segmenter's own masks to `predict --outline manifest`, as if a reader had drawn "
                         "them, so that the morphology models score them (what applying them to automatic outlines "
                         "would give); written as predictions_segmenter_outlines.csv and 'segmenter_outlines_as_reader'")
    a = ap.parse_args()
    if a.segmenter_outlines_as_reader and a.image_only:
        ap.error("--segmenter-outlines-as-reader needs the morphology models: leave out --image-only")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    labels = {}
    for task, path in (("malignancy", a.malignancy), ("risk", a.risk)):
        _, y, cases = held_out_crops([open_bundle(path).manifest], a.manifest, task, cache_dir=work)
        labels[task] = {c.case_id: (int(v), c) for v, c in zip(y, cases)}
    rows = {cid: c for task in labels for cid, (_, c) in labels[task].items()}
    base = Path(a.manifest).resolve().parent
    sub = work / "heldout_manifest.csv"
    fields = list(next(iter(rows.values())).row)
    with open(sub, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for c in rows.values():
            r = dict(c.row)
            for k in ("image", "mask"):
                if r.get(k):
                    r[k] = str(base / r[k])
            w.writerow(r)
    seen = segmenter_training_overlap(a.segmenter, a.manifest, rows.values())
    models = [a.malignancy, a.risk] + ([a.segmenter] if a.segmenter else [])
    preds_csv = work / "predictions.csv"
    masks = work / "segmenter_masks" if a.segmenter_outlines_as_reader else None
    predict_manifest(sub, preds_csv, device="cpu", model_paths=models, masks_out=masks,
                     optional_roles=("risk",) if a.image_only else None)
    out = {"image_only": a.image_only, "malignancy_model": open_bundle(a.malignancy).manifest["weights"]["sha256"],
           "risk_model": open_bundle(a.risk).manifest["weights"]["sha256"],
           "segmenter_training_images_among_held_out": seen, "tasks": aucs(labels, preds_csv)}
    if masks is not None:
        as_reader = work / "heldout_manifest_segmenter_outlines.csv"
        with open(sub, newline="", encoding="utf-8") as f, open(as_reader, "w", newline="", encoding="utf-8") as g:
            reader = csv.DictReader(f)
            w = csv.DictWriter(g, fieldnames=reader.fieldnames)
            w.writeheader()
            for r in reader:
                w.writerow({**r, "mask": str((masks / f"{r['case_id']}_mask.png").resolve())})
        seg_csv = work / "predictions_segmenter_outlines.csv"
        predict_manifest(as_reader, seg_csv, device="cpu", model_paths=models, outline="manifest")
        print("segmenter outlines scored as a reader's:", flush=True)
        out["segmenter_outlines_as_reader"] = aucs(labels, seg_csv)
    (work / "end_to_end.json").write_text(json.dumps(out, indent=1) + "\n")


def segmenter_training_overlap(segmenter, manifest, cases) -> int:
    """How many of the held-out images belong to patients the segmenter trained on (0 when the segmenter was trained
    on the classifiers' split, BreastDLRLib.training.splits); a warning says what a higher count means."""
    from BreastDLRLib.bundles import default_bundle
    from BreastDLRLib.training.data import read_manifest_csv
    from BreastDLRLib.training.splits import segmenter_split

    b = open_bundle(segmenter) if segmenter else default_bundle("segmenter")
    cfg = b.manifest["provenance"]["config"]
    tr, _ = segmenter_split(read_manifest_csv(manifest), cfg.get("folds", 5), cfg.get("seed", 0),
                            cfg.get("val_fold", 0), cfg.get("split", "own"))
    trained_on = {f"{c.dataset}/{c.patient_id}" for c in tr}
    cases = list(cases)
    n = sum(f"{c.dataset}/{c.patient_id}" in trained_on for c in cases)
    if n:
        print(f"WARNING: {n} of the {len(cases)} held-out images are of patients the segmenter trained on; the "
              "end-to-end figures are optimistic for them", flush=True)
    return n


def aucs(labels, preds_csv: Path) -> dict:
    """Per task: AUC with its DeLong CI, by dataset, images without a lesion found, rows without a score."""
    with open(preds_csv, newline="", encoding="utf-8") as f:
        preds = {r["case_id"]: r for r in csv.DictReader(f)}
    res = {}
    for task, lab in labels.items():
        ids = [cid for cid in lab if preds.get(cid, {}).get(COLUMN[task]) not in (None, "")]
        y = np.array([lab[cid][0] for cid in ids])
        p = np.array([float(preds[cid][COLUMN[task]]) for cid in ids])
        auc = roc_auc(y, p)
        ds = np.array([lab[cid][1].dataset for cid in ids])
        res[task] = {
            "n": len(ids), "n_positive": int(y.sum()), "auc": auc.auc, "ci95": [auc.ci_low, auc.ci_high],
            "auc_by_dataset": {d: roc_auc(y[ds == d], p[ds == d]).auc for d in sorted(set(ds))
                               if len(set(y[ds == d])) == 2},
            "no_lesion_found": int(sum(preds[cid]["lesion_found"] == "false" for cid in ids)),
            "missing": len(lab) - len(ids)}
        flagged = np.array([preds[cid].get("outline_uncertain") == "true" for cid in ids])
        res[task]["by_outline_check"] = {
            name: {"n": int(m.sum()), "n_positive": int(y[m].sum()),
                   "auc": roc_auc(y[m], p[m]).auc if len(set(y[m])) == 2 else None}
            for name, m in (("outline_uncertain", flagged), ("outline_not_flagged", ~flagged))}
        print(task, json.dumps(res[task]), flush=True)
    return res


if __name__ == "__main__":
    main()
