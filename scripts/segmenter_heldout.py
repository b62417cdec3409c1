"""Measure a segmenter bundle on its own held-out patients at full resolution, as `segment`, `analyze` and `predict`
run it (threshold, connected components and the bundle's minimum lesion size), with and without the left-right
mirror test-time augmentation.

    .venv/bin/python scripts/segmenter_heldout.py --manifest ../shared/data/breast-us/manifest.csv \
        --bundle Resources/Models/breastdlr-segmenter-2d --out runs/segmenter-heldout.json

The held-out fold is the one the bundle's training left out (its manifest's ``provenance.config``: folds,
validation fold, seed), cut again from the data manifest's real images.  Prints and writes JSON: per setting, the
mean and median Dice on images with a lesion (overall and by dataset) and how many normal images got a finding.
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
from BreastDLRLib.io import read_mask, read_volume  # noqa: E402
from BreastDLRLib.pipeline import Pipeline  # noqa: E402
from BreastDLRLib.training.data import read_manifest_csv  # noqa: E402
from BreastDLRLib.training.segmenter import split_images  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--bundle", default="Resources/Models/breastdlr-segmenter-2d")
    ap.add_argument("--out", default=None, help="JSON file for the figures")
    ap.add_argument("--max-cases", type=int, default=None)
    a = ap.parse_args()
    bundle = open_bundle(a.bundle)
    cfg = bundle.manifest["provenance"]["config"]
    _, cases = split_images(read_manifest_csv(a.manifest), cfg.get("folds", 5), cfg.get("seed", 0), cfg.get("val_fold", 0))
    cases = cases[: a.max_cases]
    pipe = Pipeline({"segmenter": bundle}, device="cpu")
    seg = pipe.segmenter
    results = {}
    for setting, hflip in (("plain", False), ("hflip", True)):
        seg.hflip_single_images = hflip
        dices, normals, by_ds = [], [], {}
        t0 = time.time()
        for c in cases:
            sp = c.row.get("pixel_spacing_mm") or None
            vol = read_volume(c.image, spacing=float(sp) if sp else None)
            pred = pipe.segment(vol).labels.array > 0
            truth = (read_mask(c.mask, like=vol) > 0) if c.mask is not None and c.mask.is_file() else np.zeros_like(pred)
            if truth.any():
                d = dice(pred, truth)
                dices.append(d)
                by_ds.setdefault(c.dataset, []).append(d)
            else:
                normals.append(bool(pred.any()))
        results[setting] = {"lesion_images": len(dices), "dice_mean": float(np.mean(dices)),
                            "dice_median": float(np.median(dices)),
                            "dice_mean_by_dataset": {k: float(np.mean(v)) for k, v in sorted(by_ds.items())},
                            "normal_images": len(normals), "normal_images_with_a_finding": int(sum(normals)),
                            "seconds": round(time.time() - t0, 1)}
        print(setting, json.dumps(results[setting]), flush=True)
    doc = {"bundle": bundle.name, "weights_sha256": bundle.manifest["weights"]["sha256"],
           "held_out": "the bundle's own validation fold (real images), full resolution, as segment/analyze/predict",
           "results": results}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
