"""Write the bundled demo samples into Resources/Samples/ (deterministic; rerun gives identical arrays).

* ``synthetic_abvs.nrrd`` + ``synthetic_abvs_label.nrrd`` + ``synthetic_abvs.json``: ABVS-like volume, array
  (k, j, i) = (96, 160, 224) at spacing (si, sj, sk) = (0.2, 0.2, 0.5) mm, one benign-like and one
  malignant-like lesion, gzip-compressed NRRD.
* ``synthetic_image.png`` + ``synthetic_image_mask.png`` (0/255) + ``synthetic_image.json``: a 2D image of
  320 x 400 pixels at 0.1 mm with one malignant-like lesion (PNG has no spacing: it is in the JSON).

If the folder holds a ``samples.json`` (the Slicer Sample Data list), its SHA-256 checksums are refreshed
with ``BreastDLRSlicerLib.samples.update_samples_json``.

Usage: ``python scripts/make_samples.py [output_folder]``
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from BreastDLRLib import synthetic  # noqa: E402

VOLUME_SEED = 2056  # chosen for a clear oval benign lesion and a spiculated, shadowing malignant one
IMAGE_SEED = 2057
MAX_BYTES = 5 * 1024 * 1024


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    vol = synthetic.make_volume(VOLUME_SEED, shape_kji=(96, 160, 224), spacing=(0.2, 0.2, 0.5),
                                kinds=("benign", "malignant"))
    paths = synthetic.write_case(vol, out, "synthetic_abvs")
    size = paths["image"].stat().st_size
    if size >= MAX_BYTES:
        raise SystemExit(f"{paths['image']} is {size} bytes; the bundled sample must stay under {MAX_BYTES}")

    img = synthetic.make_image(IMAGE_SEED, shape=(320, 400), spacing_mm=0.1, kinds=("malignant",))
    synthetic.write_png(img.image.array[0], out / "synthetic_image.png")
    synthetic.write_png((img.mask.array[0] > 0).astype(np.uint8) * 255, out / "synthetic_image_mask.png")
    truth = synthetic.case_truth(img)
    truth["pixel_spacing_mm"] = list(img.image.spacing[:2])
    (out / "synthetic_image.json").write_text(json.dumps(truth, indent=1))
    if (out / "samples.json").is_file():
        sys.path.insert(0, str(REPO / "BreastDLR"))
        from BreastDLRSlicerLib.samples import update_samples_json

        print(f"refreshed checksums in {update_samples_json(out)}")
    for p in sorted(out.glob("synthetic_*")):
        print(f"{p.relative_to(out.parent)}  {p.stat().st_size:>9d} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "Resources" / "Samples")
