"""Training crops around out-of-fold segmenter outlines, for `train_classifier.py --segmenter-views FILE`.

End to end, BM and LH see crops around the segmenter's outline, not the reader's; on held-out patients the
segmenter boxes about one lesion in four poorly, and the benign ones among them score high.  This script cuts, for
every training lesion of the classifiers' split, the crop `predict` would cut: the largest finding of a segmenter
that never trained on that patient (the whole image when it finds nothing), with the classifier bundle's crop
settings.  The segmenters are trained with `train_segmenter.py --val-fold V --train-folds F` on training folds only
(never the classifiers' validation fold), e.g. one on folds 1,2 and one on folds 3,4:

    .venv/bin/python scripts/segmenter_views.py --manifest ../shared/data/breast-us/manifest.csv \
        --segmenters runs/oof/segA runs/oof/segB --out runs/oof/views.npz

Each lesion goes to a segmenter whose training folds leave out the lesion's fold; a lesion no segmenter is out of
fold for is an error, so no view comes from a segmenter that saw the patient.  Writes an .npz (no pickle) of
``case_id``, ``x`` (N, 1, size, size; uint8), ``found`` (a finding was made), ``iou`` (its box against the box
of the reader's whole mask; 0 when nothing was found), the crop settings and the segmenters' paths, and prints how
the boxes compare with the reader's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BreastDLRLib.bundles import open_bundle  # noqa: E402
from BreastDLRLib.errors import BreastDLRError  # noqa: E402
from BreastDLRLib.io import read_mask, read_volume  # noqa: E402
from BreastDLRLib.pipeline import Pipeline  # noqa: E402
from BreastDLRLib.planes import crop_planes  # noqa: E402
from BreastDLRLib.training.classifier import classifier_folds, label_of, tasks_of  # noqa: E402
from BreastDLRLib.training.data import read_manifest_csv  # noqa: E402
from BreastDLRLib.training.splits import has_lesion_mask, parse_folds  # noqa: E402


def box_iou(a, b) -> float:
    """IoU of two (k, j, i) boxes given as [(lo, hi), ...] (hi exclusive)."""
    a, b = np.asarray(a), np.asarray(b)
    inter = np.prod(np.clip(np.minimum(a[:, 1], b[:, 1]) - np.maximum(a[:, 0], b[:, 0]), 0, None))
    union = np.prod(a[:, 1] - a[:, 0]) + np.prod(b[:, 1] - b[:, 0]) - inter
    return float(inter / union) if union > 0 else 0.0


def training_folds(bundle) -> tuple:
    """(training folds, validation fold, k, seed) of a segmenter bundle trained with ``--train-folds``."""
    cfg = bundle.manifest.get("provenance", {}).get("config", {})
    k, val = int(cfg.get("folds", 5)), int(cfg.get("val_fold", 0))
    folds = parse_folds(cfg.get("train_folds", ""), k, val)
    if folds is None:
        sys.exit(f"segmenter_views: {bundle.name} was trained on every fold but {val}; train the segmenters with "
                 "--train-folds so that each leaves out the patients it outlines")
    return folds, val, k, int(cfg.get("seed", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--segmenters", nargs="+", required=True, help="segmenter bundles trained with --train-folds")
    ap.add_argument("--out", required=True)
    ap.add_argument("--val-fold", type=int, default=0, help="the classifiers' validation fold (never outlined)")
    ap.add_argument("--split-seed", type=int, default=0, help="the classifiers' split seed")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--margin", type=float, default=0.3)
    ap.add_argument("--margin-of", default="longer")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    segs = []
    for path in a.segmenters:
        b = open_bundle(path)
        folds, val, k, seed = training_folds(b)
        if a.val_fold in folds:
            sys.exit(f"segmenter_views: {b.name} trained on fold {a.val_fold}, the classifiers' validation fold")
        if k != 5 or seed != a.split_seed:
            sys.exit(f"segmenter_views: {b.name} has {k} folds with seed {seed}; the classifiers' split is 5 folds, "
                     f"seed {a.split_seed}")
        segs.append((b, set(folds), Pipeline({"segmenter": b})))
        print(f"[views] {b.name} ({path}): trained on folds {sorted(folds)}", flush=True)

    tasks = tasks_of("both")
    cases = [c for c in read_manifest_csv(a.manifest) if any(label_of(c, t) is not None for t in tasks)]
    cases = [c for c in cases if has_lesion_mask(c)]
    folds = classifier_folds(cases, tasks, 5, a.split_seed)
    ids, xs, found, ious = [], [], [], []
    t0 = time.time()
    todo = [(c, int(f)) for c, f in zip(cases, folds) if f != a.val_fold]
    for n, (case, fold) in enumerate(todo):
        pick = [s for s in segs if fold not in s[1]]
        if not pick:
            sys.exit(f"segmenter_views: no segmenter left fold {fold} out (case {case.case_id})")
        pipe = pick[0][2]
        try:
            sp = case.row.get("pixel_spacing_mm") or None
            vol = read_volume(case.image, spacing=float(sp) if sp else None)
            seg = pipe.segment(vol)
            lr = seg.lesions[0] if seg.lesions else pipe.whole_image_lesion(vol)
            les = lr.lesion
            crop = crop_planes(vol, les.bbox_kji, les.centre_kji, size=a.size, margin=a.margin, margin_of=a.margin_of,
                               mask=les.mask, planes=("transverse",))["transverse"][0].image
            truth = read_mask(case.mask, like=vol) > 0
            kk, jj, ii = np.nonzero(truth)
            reader = [(kk.min(), kk.max() + 1), (jj.min(), jj.max() + 1), (ii.min(), ii.max() + 1)]
        except BreastDLRError as exc:
            print(f"[views] {case.case_id}: left out ({exc})", flush=True)
            continue
        ids.append(case.case_id)
        xs.append((np.clip(crop, 0, 1) * 255).astype(np.uint8)[None])
        found.append(bool(seg.lesions))
        ious.append(box_iou(les.bbox_kji, reader) if seg.lesions else 0.0)
        if n % 200 == 0:
            print(f"[views] {n}/{len(todo)} ({time.time() - t0:.0f} s)", flush=True)
    iou = np.array(ious)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, case_id=np.array(ids), x=np.stack(xs), found=np.array(found), iou=iou,
                        size=a.size, margin=a.margin, margin_of=a.margin_of, segmenters=np.array(a.segmenters))
    summary = {"lesions": len(ids), "no_finding": int((~np.array(found)).sum()),
               "box_iou_median": float(np.median(iou)), "box_iou_ge_0.7": float((iou >= 0.7).mean()),
               "seconds": round(time.time() - t0)}
    print(json.dumps(summary), flush=True)
    print(f"[views] written to {out}", flush=True)


if __name__ == "__main__":
    main()
