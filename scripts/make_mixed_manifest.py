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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=2026)
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
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(real[0]), extrasaction="ignore")
        w.writeheader()
        w.writerows(real + syn)
    print(out / "manifest.csv")


if __name__ == "__main__":
    main()
