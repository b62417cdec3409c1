"""Retrain the shipped lesion segmenter from ../shared/data/breast-us (documented in its model card).

    .venv/bin/python scripts/train_segmenter.py --manifest ../shared/data/breast-us/manifest.csv \
        --out Resources/Models/breastdlr-segmenter-2d --epochs 30
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BreastDLRLib.training.options import add_config_arguments, config_from_arguments  # noqa: E402

from BreastDLRLib.training.segmenter import SegmenterConfig, train_segmenter  # noqa: E402
from BreastDLRLib.training.cards import segmenter_manifest_and_card  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=None)
    ap.add_argument("--card-command", default=None,
                    help="the retrain command the card quotes (default: this script on the data's manifest)")
    add_config_arguments(ap, SegmenterConfig)
    a = ap.parse_args()
    cfg = config_from_arguments(a, SegmenterConfig)
    res = train_segmenter(a.manifest, a.out, cfg, work_dir=a.work, log=lambda m: print(m, flush=True))
    manifest, card = segmenter_manifest_and_card(res, a.manifest, a.card_command)
    from BreastDLRLib.bundles import save_bundle

    b = save_bundle(a.out, res["model"], manifest, card, half=True)
    print(json.dumps(res["metrics"], indent=1))
    print(f"[train] bundle written to {b.path}")


if __name__ == "__main__":
    main()
