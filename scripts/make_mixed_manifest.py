"""Write a manifest that adds synthetic 2D images (BreastDLRLib.synthetic) to a real one, for the segmenter's
fine-tuning: the synthetic ABVS volumes have hypoechoic fat layers that a model trained on real images alone
takes for lesions.

    .venv/bin/python scripts/make_mixed_manifest.py --manifest ../shared/data/breast-us/manifest.csv --out runs/mix
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BreastDLRLib.synthetic import make_dataset_2d  # noqa: E402


def volume_slices(folder: Path, n_volumes: int, per_volume: int, seed: int) -> list:
    """Transverse slices (with their masks) of synthetic ABVS volumes, one patient per volume."""
    import numpy as np

    from BreastDLRLib.synthetic import make_volume, write_png

    rows = []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for v in range(n_volumes):
        case = make_volume(seed=seed * 1000 + v, shape_kji=(48, 160, 224), spacing=(0.2, 0.2, 0.5))
        for k in sorted(rng.choice(case.image.shape[0], per_volume, replace=False)):
            cid = f"abvs{v:03d}_k{k:02d}"
            write_png(case.image.array[k], folder / "images" / f"{cid}.png")
            write_png((case.mask.array[k] > 0).astype(np.uint8) * 255, folder / "masks" / f"{cid}_mask.png")
            rows.append({"dataset": "synthetic", "case_id": cid, "patient_id": f"abvs{v:03d}",
                         "image": f"synthetic-abvs/images/{cid}.png", "mask": f"synthetic-abvs/masks/{cid}_mask.png",
                         "label": "malignant" if any(l.kind == "malignant" for l in case.lesions) else
                         ("benign" if case.lesions else "normal")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--volumes", type=int, default=60, help="synthetic ABVS volumes to take transverse slices from")
    ap.add_argument("--slices-per-volume", type=int, default=10)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    real_dir = Path(a.manifest).resolve().parent
    with open(a.manifest, newline="", encoding="utf-8") as f:
        real = list(csv.DictReader(f))
    for top in sorted({Path(r["image"]).parts[0] for r in real}):  # link the real image folders
        link = out / top
        if not link.exists():
            os.symlink(real_dir / top, link)
    syn_manifest = make_dataset_2d(a.n, a.seed, out / "synthetic", shape=(256, 320), spacing_mm=0.15)
    with open(syn_manifest, newline="", encoding="utf-8") as f:
        syn = list(csv.DictReader(f))
    for r in syn:
        r["image"] = f"synthetic/{r['image']}"
        r["mask"] = f"synthetic/{r['mask']}" if r["mask"] else ""
    syn += volume_slices(out / "synthetic-abvs", a.volumes, a.slices_per_volume, a.seed)
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(real[0]), extrasaction="ignore")
        w.writeheader()
        w.writerows(real + syn)
    print(out / "manifest.csv")


if __name__ == "__main__":
    main()
