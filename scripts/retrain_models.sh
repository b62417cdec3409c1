#!/usr/bin/env bash
# Retrain every shipped model from the public data (see each MODEL_CARD.md) and refresh Resources/Models.
# About 1.5 hours on a 2-core CPU (measured: segmenter 35 + 15 min, classifiers 35 min, ABVS 8 min;
# two jobs at a time).  Usage: bash scripts/retrain_models.sh [path/to/breast-us/manifest.csv]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh requirements.txt
manifest="${1:-../shared/data/breast-us/manifest.csv}"
work="${WORK:-runs}"
py=.venv/bin/python
# two trainings side by side, one thread each: more threads than cores makes OpenMP spin and runs 5-10x slower
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
( $py scripts/train_segmenter.py --manifest "$manifest" --out "$work/segmenter-real" --work "$work/segmenter" --threads 1
  $py scripts/make_mixed_manifest.py --manifest "$manifest" --out "$work/mix"
  $py scripts/train_segmenter.py --manifest "$work/mix/manifest.csv" --init "$work/segmenter-real" --epochs 7 --lr 0.0005 \
      --out Resources/Models/breastdlr-segmenter-2d --work "$work/segmix" --threads 1 ) &
$py scripts/train_classifier.py --manifest "$manifest" --task both --out Resources/Models --work "$work/classifiers" --threads 1
wait
$py scripts/train_abvs.py --init Resources/Models/breastdlr-malignancy-2d --out Resources/Models/breastdlr-abvs-threeplane --epochs 8
$py scripts/train_fusion.py --manifest "$manifest" --val "$work/classifiers/val_malignancy.npz" \
    --out Resources/Models/breastdlr-fusion-age
$py -c "from BreastDLRLib.bundles import write_index; print(write_index('Resources/Models'))"
