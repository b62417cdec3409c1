"""Why the morphology models score reader outlines only: their AUC on the shipped segmenter's outlines.

On the image models' held-out fold (val_<task>.npz from add_mirror_tta.py), each lesion is outlined by the shipped
segmenter (largest lesion found) and scored by the morphology head with those outlines, against the image model
alone.  Figures go into the morphology models' cards.

    .venv/bin/python scripts/morphology_on_segmenter_outlines.py --manifest ../shared/data/breast-us/manifest.csv \
        --work runs/tta
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BreastDLRLib.bundles import default_bundle  # noqa: E402
from BreastDLRLib.errors import BreastDLRError  # noqa: E402
from BreastDLRLib.evaluation import roc_auc  # noqa: E402
from BreastDLRLib.io import read_volume  # noqa: E402
from BreastDLRLib.morphology import feature_vector, head_inputs, lesion_features  # noqa: E402
from BreastDLRLib.pipeline import Pipeline  # noqa: E402
from BreastDLRLib.training.data import read_manifest_csv  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--work", default="runs/tta", help="folder of val_malignancy.npz and val_risk.npz")
    ap.add_argument("--out", default=None, help="JSON file for the figures (train_morphology.py --segmenter-check)")
    a = ap.parse_args()
    by_id = {c.case_id: c for c in read_manifest_csv(a.manifest)}
    pipe = Pipeline.from_paths(device="cpu")
    out = {}
    for task in ("malignancy", "risk"):
        z = np.load(Path(a.work) / f"val_{task}.npz", allow_pickle=False)
        head = default_bundle(f"morphology-{task}").model()
        ys, image, fused = [], [], []
        for cid, y, p in zip(z["case_id"], z["labels"], z["probs"]):
            c = by_id[str(cid)]
            sp = c.row.get("pixel_spacing_mm") or None
            vol = read_volume(c.image, spacing=float(sp) if sp else None)
            seg = pipe.segment(vol)
            if not seg.lesions:
                continue
            try:
                f = feature_vector(lesion_features(vol.array[0], seg.lesions[0].lesion.full_mask(vol.shape)[0]))
            except BreastDLRError:
                continue
            ys.append(int(y)), image.append(float(p)), fused.append(float(head.predict_proba(head_inputs([p], f))[0, 1]))
        ys, image, fused = np.array(ys), np.array(image), np.array(fused)
        out[task] = {"lesions": int(len(ys)), "auc_image_only": roc_auc(ys, image).auc,
                     "auc_morphology_on_segmenter_outlines": roc_auc(ys, fused).auc}
        print(task, json.dumps(out[task]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
