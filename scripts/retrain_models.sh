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
# two trainings side by side, one thread each: more threads than cores makes OpenMP spin and runs 5-10x slower
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
$py scripts/train_segmenter.py --manifest "$manifest" --out Resources/Models/breastdlr-segmenter-2d \
    --work "$work/segmenter" --size 128 --batch-size 16 --lr 0.002 --epochs 14 --patience 5 --threads 1 &
$py scripts/train_classifier.py --manifest "$manifest" --task both --out Resources/Models \
    --work "$work/classifiers" --size 128 --epochs 14 --patience 5 --threads 1
wait
$py scripts/train_fusion.py --manifest "$manifest" --val "$work/classifiers/val_malignancy.npz" \
    --out Resources/Models/breastdlr-fusion-age
$py -c "from BreastDLRLib.bundles import write_index; print(write_index('Resources/Models'))"
