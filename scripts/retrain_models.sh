#!/usr/bin/env bash
# Retrain every shipped model from the public data (see each MODEL_CARD.md) and refresh Resources/Models.
# About 2.5 hours on a 2-core CPU.  Usage: bash scripts/retrain_models.sh [path/to/breast-us/manifest.csv]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh requirements.txt
manifest="${1:-../shared/data/breast-us/manifest.csv}"
work="${WORK:-runs}"
py=.venv/bin/python
$py scripts/train_segmenter.py --manifest "$manifest" --out Resources/Models/breastdlr-segmenter-2d \
    --work "$work/segmenter" --size 128 --batch-size 16 --lr 0.002 --epochs 16 --patience 5 --threads 2 &
$py scripts/train_classifier.py --manifest "$manifest" --task both --out Resources/Models \
    --work "$work/classifiers" --size 128 --epochs 14 --patience 5 --threads 1
wait
$py scripts/train_fusion.py --manifest "$manifest" --val "$work/classifiers/val_malignancy.npz" \
    --out Resources/Models/breastdlr-fusion-age
$py -c "from BreastDLRLib.bundles import write_index; print(write_index('Resources/Models'))"
