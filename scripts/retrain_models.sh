#!/usr/bin/env bash
# Retrain every shipped model from the public data (see each MODEL_CARD.md) and refresh Resources/Models.
# About 3 hours on a 2-core CPU without native bf16 (measured 2026-11-30: a classifier member 14 epochs in about
# 70 min with 2 threads; on a CPU with native bf16 about half).  Two jobs at a time, one thread each.
# Usage: bash scripts/retrain_models.sh [path/to/breast-us/manifest.csv]
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
# the two classifier ensembles: two members (BM and LH heads on one trunk each), one patient split (seed 0)
for seed in 0 1; do
  $py scripts/train_classifier.py --manifest "$manifest" --task both --seed "$seed" --split-seed 0 --epochs 14 \
      --out "$work/members/seed$seed" --work "$work/members/seed$seed-work" --threads 1
done
wait
for task in malignancy risk; do
  $py scripts/make_ensemble.py --manifest "$manifest" --task "$task" --work "$work/ensemble" \
      --members "$work/members/seed0/breastdlr-$task-2d" "$work/members/seed1/breastdlr-$task-2d" \
      --out "Resources/Models/breastdlr-$task-2d"
done
$py scripts/train_abvs.py --init Resources/Models/breastdlr-malignancy-2d --out Resources/Models/breastdlr-abvs-threeplane --epochs 8
$py scripts/train_fusion.py --manifest "$manifest" --val "$work/ensemble/val_malignancy.npz" \
    --out Resources/Models/breastdlr-fusion-age
$py scripts/restratification.py --manifest "$manifest" --work "$work/ensemble"
$py -c "from BreastDLRLib.bundles import write_index; print(write_index('Resources/Models'))"
