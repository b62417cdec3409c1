#!/usr/bin/env bash
# Retrain every shipped model from the public data (see each MODEL_CARD.md) and refresh Resources/Models.
# About 3.5 hours on a 2-core CPU without native bf16 (measured with 2 threads alone: the segmenter 38 min, each of
# the SEEDS pairs of BM and LH 22 min after it, the ResNet50 pair for the ABVS model 62 min; on a CPU with native
# bf16 less).  Two jobs at a time, one thread each.  SEEDS (default "0 1 2") are the members of the BM/LH ensemble.
# DEVICE (default "cpu", as the shipped models were trained) goes to the segmenter's and the 2D classifiers' --device:
# "auto" or "cuda" trains them on a CUDA GPU (not bit-identical to the CPU runs; each bundle's metrics.trained_on says
# where it trained). The ABVS model trains on the CPU.
# Usage: bash scripts/retrain_models.sh [path/to/breast-us/manifest.csv]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh requirements.txt
manifest="${1:-../shared/data/breast-us/manifest.csv}"
work="${WORK:-runs}"
py=.venv/bin/python
device="${DEVICE:-cpu}"
seeds="${SEEDS:-0 1 2}"   # the BM/LH pairs that become one ensemble
# two trainings side by side, one thread each: more threads than cores makes OpenMP spin and runs 5-10x slower
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
# The segmenter first (real images, then synthetic 2D images and ABVS slices added), then BM and LH from its
# encoder; side by side, the ResNet50 pair of the earlier recipe, which only initialises the ABVS three-plane model.
( $py scripts/train_segmenter.py --manifest "$manifest" --out "$work/segmenter-real" --work "$work/segmenter" --threads 1 --device "$device"
  $py scripts/make_mixed_manifest.py --manifest "$manifest" --out "$work/mix"
  $py scripts/train_segmenter.py --manifest "$work/mix/manifest.csv" --init "$work/segmenter-real" --epochs 7 --lr 0.0005 \
      --out Resources/Models/breastdlr-segmenter-2d --work "$work/segmix" --threads 1 --device "$device" \
      --card-command "bash scripts/retrain_models.sh (segmenter part: real images, then synthetic 2D images and ABVS slices added)"
  # The segmenter's folds are the classifiers' (BreastDLRLib.training.splits), so its encoder never saw BM's and LH's
  # held-out patients, and the end-to-end check below runs on patients no model trained on.
  # BM and LH: one EfficientNet-b0 trunk started from the segmenter's encoder, two heads (the bundles declare the
  # mirror test-time augmentation); LH's bundle keeps only its last layer and takes the trunk from BM's weights file.
  # One such pair per seed, all on the same patient split (--split-seed 0); they become one ensemble below.
  for seed in $seeds; do
    $py scripts/train_classifier.py --manifest "$manifest" --task both --seed "$seed" --split-seed 0 --epochs 22 \
        --patience 30 --backbone efficientnet-b0 --init-encoder Resources/Models/breastdlr-segmenter-2d \
        --out "$work/pair-seed$seed" --work "$work/classifiers-seed$seed" --threads 1 --device "$device"
  done ) &
$py scripts/train_classifier.py --manifest "$manifest" --task both --seed 0 --epochs 22 --patience 30 \
    --out "$work/resnet50" --work "$work/resnet50-work" --threads 1 --device "$device"
wait
# the segmenter on its held-out patients at full resolution; its manifest then declares the mirror on single images
$py scripts/segmenter_heldout.py --manifest "$manifest" --out "$work/segmenter-heldout.json" --declare
# BM and LH as ensembles of the seed pairs (mean of the members' probabilities, each with its mirror); the held-out
# probabilities (--work) feed the fusion head, the morphology heads and the 4A table
members=(); for seed in $seeds; do members+=("$work/pair-seed$seed"); done
$py scripts/make_ensemble.py --manifest "$manifest" --task both --members "${members[@]}" --out Resources/Models \
    --work "$work/tta"
$py scripts/train_abvs.py --init "$work/resnet50/breastdlr-malignancy-2d" --out Resources/Models/breastdlr-abvs-threeplane --epochs 8
$py scripts/train_fusion.py --manifest "$manifest" --val "$work/tta/val_malignancy.npz" \
    --out Resources/Models/breastdlr-fusion-age
morphology() {   # image score + handcrafted features of the reader's outline (seconds)
  for task in malignancy risk; do
    $py scripts/train_morphology.py --manifest "$manifest" --task "$task" --val "$work/tta/val_$task.npz" \
        --image-model "Resources/Models/breastdlr-$task-2d" --out "Resources/Models/breastdlr-morphology-$task" \
        --work "$work/morphology" "$@"
  done
}
morphology
# what the morphology heads would do on the segmenter's outlines, quoted in their cards (the fit is deterministic)
$py scripts/morphology_on_segmenter_outlines.py --manifest "$manifest" --work "$work/tta" --out "$work/morphology-on-segmenter.json"
morphology --segmenter-check "$work/morphology-on-segmenter.json"
$py scripts/restratification.py --manifest "$manifest" --work "$work/tta" --fusion Resources/Models/breastdlr-fusion-age \
    --risk-model Resources/Models/breastdlr-risk-2d
$py scripts/restratification.py --manifest "$manifest" --work "$work/tta" --morphology "$work/morphology"
$py scripts/classifier_end_to_end.py --manifest "$manifest" --work "$work/e2e"
$py -c "from BreastDLRLib.bundles import write_index; print(write_index('Resources/Models'))"
