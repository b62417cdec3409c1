"""Retrain the shipped 2D lesion classifiers (malignancy "BM", BI-RADS risk "LH") from a manifest.

    .venv/bin/python scripts/train_classifier.py --manifest ../shared/data/breast-us/manifest.csv \
        --task both --out Resources/Models

``--task both`` trains one shared trunk with two heads and writes one bundle per task under --out; the risk
bundle then keeps only its own last layer and takes the trunk from the malignancy bundle's weights file (pinned by
its sha256: BreastDLRLib.bundles.share_weights), so the trunk is stored once.  ``--task malignancy`` or ``risk``
writes a single bundle at --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BreastDLRLib.training.options import add_config_arguments, config_from_arguments  # noqa: E402

from BreastDLRLib.bundles import save_bundle, share_weights  # noqa: E402
from BreastDLRLib.training.cards import classifier_manifest_and_card  # noqa: E402
from BreastDLRLib.training.classifier import ClassifierConfig, train_classifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=None)
    add_config_arguments(ap, ClassifierConfig)
    a = ap.parse_args()
    cfg = config_from_arguments(a, ClassifierConfig)
    work = a.work or str(Path(a.out).with_name(Path(a.out).name + "-work"))
    res = train_classifier(a.manifest, cfg, work, log=lambda m: print(m, flush=True))
    import numpy as np

    out_dir = Path(a.out)
    written = {}
    for task, r in res["tasks"].items():
        one = {**r, "config": {**res["config"], "task": task}, "arguments": res["arguments"]}
        manifest, card = classifier_manifest_and_card(one, a.manifest)
        dest = out_dir if len(res["tasks"]) == 1 else out_dir / manifest["name"]
        b = save_bundle(dest, r["model"], manifest, card, half=True)
        np.savez(Path(work) / f"val_{task}.npz", probs=r["val_probs"], labels=r["labels"][r["val_index"]],
                 case_id=np.array([res["cases"][i].case_id for i in r["val_index"]]))
        print(json.dumps(r["metrics"], indent=1))
        print(f"[train] {task} bundle written to {b.path}")
        written[task] = b.path
    if len(written) == 2:
        b = share_weights(written["malignancy"], written["risk"])
        print(f"[train] {b.name} takes its trunk from {b.manifest['uses_weights_of']} "
              f"({b.manifest['weights']['bytes']} bytes of its own)")


if __name__ == "__main__":
    main()
