"""Measure a segmenter bundle on its own held-out patients at full resolution, as `segment`, `analyze` and `predict`
run it (threshold, connected components and the bundle's minimum lesion size), with and without the left-right
mirror test-time augmentation.

    .venv/bin/python scripts/segmenter_heldout.py --manifest ../shared/data/breast-us/manifest.csv \
        --bundle Resources/Models/breastdlr-segmenter-2d --out runs/segmenter-heldout.json

The held-out fold is the one the bundle's training left out (its manifest's ``provenance.config``: folds,
validation fold, seed), cut again from the data manifest's real images.  Prints and writes JSON: per setting, the
mean and median Dice on images with a lesion (overall and by dataset) and how many normal images got a finding.

``--declare`` then writes the result into the bundle (the weights are not touched): its manifest declares the
mirror on single images (``input.test_time_augmentation: ["hflip"]``) and keeps the figures as
``metrics.full_resolution_heldout``, and its card gets (or has replaced) a "Test-time augmentation" section.
scripts/retrain_models.sh does this for the shipped segmenter.
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
from BreastDLRLib.training.splits import segmenter_split  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--bundle", default="Resources/Models/breastdlr-segmenter-2d")
    ap.add_argument("--out", default=None, help="JSON file for the figures")
    ap.add_argument("--max-cases", type=int, default=None)
    ap.add_argument("--declare", action="store_true",
                    help="declare the mirror in the bundle and write the figures into its manifest and card")
    a = ap.parse_args()
    bundle = open_bundle(a.bundle)
    cfg = bundle.manifest["provenance"]["config"]
    # bundles trained before the shared split have no "split" in their config: their own split
    _, cases = segmenter_split(read_manifest_csv(a.manifest), cfg.get("folds", 5), cfg.get("seed", 0),
                               cfg.get("val_fold", 0), cfg.get("split", "own"))
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
    if a.declare:
        if a.max_cases:
            sys.exit("segmenter_heldout: --declare needs the whole held-out fold (no --max-cases)")
        declare_mirror(bundle, results)


TTA_HEADING = "**Test-time augmentation (single images).**"


def declare_mirror(bundle, results: dict) -> None:
    """The bundle's manifest declares the mirror on single images, with the figures; its card says so."""
    from BreastDLRLib.bundles import MANIFEST

    p, h = results["plain"], results["hflip"]
    figures = {
        "measured_with": "scripts/segmenter_heldout.py (threshold, components and size filter as segment/analyze/predict)",
        "lesion_images": h["lesion_images"],
        "dice_mean_without_tta": round(p["dice_mean"], 4), "dice_median_without_tta": round(p["dice_median"], 4),
        "dice_mean_hflip": round(h["dice_mean"], 4), "dice_median_hflip": round(h["dice_median"], 4),
        "dice_mean_by_dataset_hflip": {k: round(v, 4) for k, v in h["dice_mean_by_dataset"].items()},
        "normal_images": h["normal_images"],
        "normal_images_with_a_finding_without_tta": p["normal_images_with_a_finding"],
        "normal_images_with_a_finding_hflip": h["normal_images_with_a_finding"]}
    m = dict(bundle.manifest)
    m["input"] = {**m["input"], "test_time_augmentation": ["hflip"],
                  "test_time_augmentation_applies_to": "single images (a volume of one slice); volumes run one pass per slice"}
    m["metrics"] = {**m["metrics"], "full_resolution_heldout": figures}
    by_ds = ", ".join(f'"{k}": {v:.3f}' for k, v in figures["dice_mean_by_dataset_hflip"].items())
    section = (f"{TTA_HEADING} The manifest declares the left-right mirror\n"
               "(`input.test_time_augmentation: [\"hflip\"]`): on a single image the logits are averaged with those of its mirror\n"
               "(one more network call); volumes keep one pass per slice. At full resolution, with the post-processing\n"
               f"below, on the {h['lesion_images']} held-out real images with a lesion (`scripts/segmenter_heldout.py`): mean Dice\n"
               f"{p['dice_mean']:.3f} without the mirror, **{h['dice_mean']:.3f}** with it (median {p['dice_median']:.3f} → "
               f"{h['dice_median']:.3f}; by dataset\n{{{by_ds}}}). Normal images with a finding: "
               f"{p['normal_images_with_a_finding']} of {p['normal_images']} without,\n"
               f"{h['normal_images_with_a_finding']} of {h['normal_images']} with it.\n\n")
    card_path = bundle.path / bundle.manifest.get("model_card", "MODEL_CARD.md")
    card = card_path.read_text(encoding="utf-8")
    if TTA_HEADING in card:      # replace the earlier section (up to the next bold heading)
        start = card.index(TTA_HEADING)
        end = card.find("\n**", start + len(TTA_HEADING))
        card = card[:start] + section + (card[end + 1:] if end >= 0 else "")
    else:
        marker = "**Post-processing.**"
        card = card.replace(marker, section + marker, 1) if marker in card else card + "\n" + section
    _write(bundle.path / MANIFEST, json.dumps(m, indent=2) + "\n")
    _write(card_path, card)
    print(f"[declare] {bundle.path}: mirror declared, Dice {p['dice_mean']:.3f} -> {h['dice_mean']:.3f}", flush=True)


def _write(path: Path, text: str) -> None:
    from BreastDLRLib.io.writers import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    path.chmod(0o644)


if __name__ == "__main__":
    main()
