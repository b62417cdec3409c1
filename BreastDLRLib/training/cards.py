"""Manifests and model cards for the bundles that training writes."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Dict, Tuple

from .. import __version__

INTENDED_USE = ("Research use only. Not a medical device; not for diagnosis or treatment decisions. "
                "Outputs must be reviewed by a qualified radiologist.")
DATA_CITATION = (
    "BUS-BRA (Gomez-Flores et al., Med Phys 51(4):3110-3123, 2024, doi:10.5281/zenodo.7730709); "
    "BrEaST-Lesions-USG (Pawlowska et al., Sci Data 11:148, 2024, TCIA doi:10.7937/9WKK-Q141, CC BY 4.0); "
    "BUSI (Al-Dhabyani et al., Data in Brief 28:104863, 2020, CC0)"
)


def _init_text(init: str | None) -> str:
    """How the network a segmenter was fine-tuned from was trained, from that bundle's manifest (when readable)."""
    if not init:
        return ""
    try:
        prev = json.loads((Path(init) / "manifest.json").read_text(encoding="utf-8"))
        pc, pm = prev["provenance"]["config"], prev["metrics"]
        dice = pm.get("dice_mean_real_lesion_images_fp32", pm["dice_mean_lesion_images_fp32"])
        return (f"; fine-tuned from a network trained {pc['epochs']} epochs (lr {pc['lr']:g}) on "
                f"{prev['provenance']['n_train_images']} images of the same split (validation Dice on real images "
                f"{dice:.3f}; `{Path(init).name}`)")
    except (OSError, KeyError, TypeError, ValueError):
        return f"; fine-tuned from {init}"


def segmenter_manifest_and_card(res: Dict[str, Any], manifest_path: str | Path,
                                command: str | None = None) -> Tuple[Dict[str, Any], str]:
    """The bundle manifest and model card of a trained segmenter; ``command`` is the retrain command they quote
    (default: ``scripts/train_segmenter.py`` on the data's manifest)."""
    cfg, m = res["config"], res["metrics"]
    real_mean = m.get("dice_mean_real_lesion_images_fp32", m["dice_mean_lesion_images_fp32"])
    real_median = m.get("dice_median_real_lesion_images_fp32", m["dice_median_lesion_images_fp32"])
    bf16_ok = m["bf16_vs_fp32_mask_dice_mean"] >= 0.98
    manifest = {
        "name": "breastdlr-segmenter-2d",
        "version": __version__,
        "role": "segmenter",
        "default": True,
        "task": "lesion segmentation of breast ultrasound, slice by slice",
        "architecture": "Unet",
        "arguments": {k: v for k, v in res["arguments"].items() if k != "architecture"},
        "input": {"size": [cfg["size"], cfg["size"]], "channels": 1, "normalisation": "zscore",
                  "spacing_mm": None, "resample": "each slice resized to size x size, logits resized back"},
        "labels": ["background", "lesion"],
        "thresholds": {"probability": 0.5, "min_lesion_mm3": 20.0, "min_lesion_extent_mm": 2.0, "min_lesion_mm2": 7.0,
                       "min_lesion_fraction": 0.002, "uncertain_outline_below": 0.9},
        "inference": {"bf16_cpu": bf16_ok, "bf16_tolerance": "mean mask Dice bf16 vs fp32 >= 0.98 on validation"},
        "clinical_variables": [],
        "provenance": {"data": DATA_CITATION, "manifest": Path(manifest_path).name, "n_train_images": res["n_train"],
                       "trained": _dt.date.today().isoformat(), "config": cfg,
                       "command": command or ("python scripts/train_segmenter.py --manifest <breast-us>/manifest.csv "
                                              "--out Resources/Models/breastdlr-segmenter-2d")},
        "metrics": m,
        "licence": "Apache-2.0 (weights); training data under their own licences (see provenance)",
        "intended_use": INTENDED_USE,
    }
    card = f"""# Model card: breastdlr-segmenter-2d

**Intended use.** {INTENDED_USE}

**What it is.** A UNet with an EfficientNet-b0 encoder (segmentation-models-pytorch, {res['arguments']}),
trained from scratch (no ImageNet weights) on CPU on 2D breast ultrasound images resized to {cfg['size']}x{cfg['size']},
per-image z-score normalisation, Dice + BCE loss, Adam with a one-cycle schedule, MONAI augmentation (left-right flip,
small affine, gamma and gain). Applied slice by slice along a volume's acquisition axis. Weights stored in float16.

**Data.** {res['n_train']} training images ({json.dumps(res.get('train_datasets', {}))}) from {DATA_CITATION}{
' and synthetic images of BreastDLRLib.synthetic (so that the hypoechoic fat layers of the synthetic ABVS volumes are not taken for lesions)' if 'synthetic' in res.get('train_datasets', {}) else ''}{
_init_text(cfg.get('init'))}, {cfg['epochs']} epochs at peak lr {cfg['lr']:g}. Patient-level split: one fold of a {cfg.get('folds', 5)}-fold stratified
group split held out ({m['val_images']} images, {m['val_patients']} patients); no patient is on both sides.{
" The folds are the classifiers' (`--task both`, same seed): every patient the malignancy and risk models hold out is held out here too, so an end-to-end measurement on their held-out fold never meets an image the segmenter trained on." if cfg.get('split', 'own') == 'shared' else ''}

**Metrics (held-out patients of the data at hand).**
- mean Dice on {'real ' if 'dice_mean_real_lesion_images_fp32' in m else ''}images with a lesion: {real_mean:.3f} (median {real_median:.3f}){
f"; with the synthetic validation images too: {m['dice_mean_lesion_images_fp32']:.3f}" if 'dice_mean_real_lesion_images_fp32' in m else ''}
- by dataset: {json.dumps({k: round(v, 3) for k, v in m['dice_by_dataset'].items()})}
- bf16 autocast vs fp32 masks: mean Dice agreement {m['bf16_vs_fp32_mask_dice_mean']:.4f} (min {m['bf16_vs_fp32_mask_dice_min']:.4f});
  bf16 on CPU is {'enabled' if bf16_ok else 'disabled'} by default.
- best epoch {m['best_epoch']} of {m['epochs_run']} run.

**Post-processing.** Threshold 0.5, 3D connected components, components smaller than 20 mm³ (volumes) or 7 mm²
(2D images) dropped as specks. In volumes, components thinner than 2 mm along any axis are dropped too (a sheet on
one to three 0.5 mm slices; with slices 2 mm thick or more one slice suffices): on ten synthetic ABVS volumes
(160 x 256 x 256, seeds 100-109) this left all 16 lesions found and cut the false findings from 48 to 20.

**Outline check (2D images).** A lesion whose mean probability inside the outline is below 0.90 is flagged
`outline_uncertain`, with a note asking the reader to check the outline. Chosen on the held-out fold 0 with this
segmenter and checked on fold 1 with a segmenter trained with fold 1 held out: it flags 15 % and 11 % of the images;
72 % and 75 % of the flagged outlines have a bounding box overlapping the reader's by less than 0.7 (IoU), against
22 % and 24 % of all. The malignancy model's AUC end to end is 0.909 and 0.912 on the unflagged images, 0.851 and
0.825 on the flagged; the risk model's 0.872 and 0.871, against 0.786 and 0.745.

**Limits.** Trained on handheld 2D images only; on ABVS/ABUS volumes it runs slice by slice on transverse slices
and has not been validated on real 3D breast volumes (none were available). Calipers and text overlays in the
training images (BUSI) may be segmented. Not measured on external sites; the project's quality goal (Dice >= 0.80
on unseen patients) is {'met' if real_mean >= 0.8 else 'NOT yet met'} on this validation fold (not yet measured on the held-back
patients). It may outline something on normal (lesion-free) images (how many of the held-out normal images get a
finding at full resolution is measured by `scripts/segmenter_heldout.py`): a finding on a normal-looking image
needs a reader's judgement.

**Retrain.** `{manifest['provenance']['command']}` ({'this fine-tune: ' if cfg.get('init') else ''}about {sum(h['seconds'] for h in res['history']) / 60:.0f} min on a 2-core CPU{', after the network it started from' if cfg.get('init') else ''}).
"""
    return manifest, card


TASKS = {
    "malignancy": ("breastdlr-malignancy-2d", "malignancy", "benign vs malignant (pathology)", ["benign", "malignant"]),
    "risk": ("breastdlr-risk-2d", "risk", "BI-RADS 2-3 (low risk) vs 4-5 (high risk)", ["low risk", "high risk"]),
}


TRUNK_NAMES = {"resnet18": "ResNet18", "resnet34": "ResNet34", "resnet50": "ResNet50", "resnet101": "ResNet101",
               "vgg11_bn": "VGG11 (with batch normalisation)", "vgg11": "VGG11", "efficientnet-b0": "EfficientNet-b0"}


def retrain_options(cfg: Dict[str, Any]) -> str:
    """The options of a run that differ from ``ClassifierConfig``'s defaults, as command-line flags (so that a
    card's retrain command reproduces the run)."""
    from dataclasses import fields

    from .classifier import ClassifierConfig

    skip = {"task", "threads", "max_minutes", "bf16"}      # how, not what, is trained
    out = []
    for f in fields(ClassifierConfig):
        v = cfg.get(f.name, f.default)
        if f.name in skip or v == f.default or v is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        out.append(f"{flag} {v}")
    return "".join(" " + o for o in out)


def classifier_manifest_and_card(res: Dict[str, Any], manifest_path: str | Path) -> Tuple[Dict[str, Any], str]:
    cfg, m = res["config"], res["metrics"]
    backbone = res["arguments"].get("backbone", "resnet50")
    trunk = TRUNK_NAMES.get(backbone, backbone)
    svm = m.get("svm_head")
    article = "an" if trunk[:1] in "AEIOU" else "a"
    design = (f"Yang et al. 2024 (CLDLR): deep features of {article}" if svm else f"EmbeddingNet (Lu et al. 2025): {article}")
    head_text = (f"A linear support vector machine (C={svm['C']}, {svm['n_support']} support vectors, standardised "
                 f"embeddings, {svm['calibration']}) was then fitted on the embeddings of the training crops and "
                 "written exactly into the last layer, so the probability is the SVM's calibrated one "
                 f"(validation AUC of the network's own layer before the SVM: {m['auc_before_svm']:.3f}).\n"
                 if svm else "")
    name, role, task_text, labels = TASKS[cfg["task"]]
    joint = m.get("multitask")
    cmd = ("python scripts/train_classifier.py --manifest <breast-us>/manifest.csv --task both --out Resources/Models"
           if joint else f"python scripts/train_classifier.py --manifest <breast-us>/manifest.csv --task {cfg['task']} "
           f"--out Resources/Models/{name}") + retrain_options(cfg)
    manifest = {
        "name": name, "version": __version__, "role": role, "default": True,
        "task": task_text, "architecture": "EmbeddingNet", "arguments": res["arguments"],
        "input": {"size": [cfg["size"], cfg["size"]], "channels": 3, "normalisation": "minmax",
                  "planes": ["transverse"], "margin": cfg["margin"], "margin_of": cfg.get("margin_of", "longer"),
                  "frames": 1, "test_time_augmentation": ["hflip"],
                  "crop": f"square around the lesion's bounding box, margin x its {cfg.get('margin_of', 'longer')} side on each side, isotropic"},
        "labels": labels, "thresholds": {"probability": 0.5},
        "clinical_variables": [],
        "provenance": {"data": DATA_CITATION, "manifest": Path(manifest_path).name, "n_train_crops": res["n_train"],
                       "trained": _dt.date.today().isoformat(), "config": cfg, "command": cmd,
                       "label_source": "pathology" if cfg["task"] == "malignancy" else "BI-RADS category given by the radiologists (BUS-BRA, BrEaST)"},
        "metrics": m, "licence": "Apache-2.0 (weights); training data under their own licences (see provenance)",
        "intended_use": INTENDED_USE,
    }
    by_ds = json.dumps({k: round(v, 3) for k, v in m["auc_by_dataset"].items()})
    diff = m.get("bf16_vs_fp32_max_abs_diff")
    bf16_text = ("bf16 not measured (trained on a CPU without native bf16, in fp32)" if diff is None else
                 f"bf16 vs fp32 probabilities differ by at most {diff:.4f}")
    views_text = (f"Each lesion was seen as its exact crop and as {cfg['box_views']} crops around perturbed lesion boxes "
                  f"(each box edge moved by up to {cfg.get('box_jitter', 0.2)} of the box's side), one of them drawn per "
                  "epoch, so that the network meets crops like those cut around the segmenter's boxes; validation "
                  "used the exact crops.\n" if cfg.get("box_views") else "")
    init_text = (f"Fine-tuned from the trained bundle(s) `{cfg['init']}` (the trunk from the first, each task's "
                 "last layer from its own), on the same patient split.\n" if cfg.get("init") else "")
    from ..networks.classifiers import EFFICIENTNETS

    source = "segmentation-models-pytorch encoder" if backbone in EFFICIENTNETS else "torchvision"
    if cfg.get("init_encoder"):
        origin = (f"{source}, `weights=None`, no ImageNet weights; started from the encoder of the lesion segmenter "
                  f"`{Path(cfg['init_encoder']).name}`, which was trained on the same patient split and so never saw "
                  "the validation patients")
    else:
        origin = f"{source}, `weights=None`, trained from scratch, no\nImageNet weights"
    card = f"""# Model card: {name}

**Intended use.** {INTENDED_USE}

**Task.** {task_text}, from one 2D ultrasound crop around a lesion ({'the malignancy model "BM"' if role == 'malignancy' else 'the BI-RADS risk model "LH"'} of the two-stage assessment of Lu et al. 2025).

**What it is.** {design} {trunk} trunk ({origin}) whose classifier is fc → 128 (the image embedding) → 2. Input: the transverse crop cut by
`BreastDLRLib.planes.crop_planes` around the lesion's bounding box (margin {cfg['margin']} of its {cfg.get('margin_of', 'longer')} side on each side),
isotropic, {cfg['size']}x{cfg['size']} pixels (smaller than the papers' 224 so that it trains on a 2-core CPU), min-max normalised.
{"Trained jointly with the " + " and ".join(joint) + " heads on one shared trunk and embedding (two outputs per task), " if joint else ""}Training: preset `{cfg['preset']}`, class-balanced cross-entropy, MONAI augmentation (flip, affine, gamma, gain),
{'bf16 autocast' if cfg.get('bf16', True) else 'fp32'}, best validation AUC kept. Weights stored in float16.
{head_text}{views_text}{init_text}
**Data.** {res['n_train']} training crops from {DATA_CITATION}. Patient-level split: one fold of a
{cfg['folds']}-fold stratified group split held out ({m['val_crops']} crops, {m['val_patients']} patients, {m['val_positives']} positive).

**Metrics (held-out patients of the data at hand).** AUC {m['auc']:.3f} (95 % CI {m['auc_ci95'][0]:.3f}-{m['auc_ci95'][1]:.3f}, DeLong);
by dataset {by_ds}; with the left-right mirror averaged in (the test-time augmentation the bundle declares and
`analyze`/`predict` apply) AUC {m.get('auc_tta_hflip', float('nan')):.3f}; {bf16_text}.
Best epoch {m['best_epoch']} of {m['epochs_run']}.

**Limits.** Trained {'(after the segmenter)' if cfg.get('init_encoder') else 'from scratch'} on about two thousand images; the project's quality goal (AUC >= 0.90 on
unseen patients) is {'met' if m['auc'] >= 0.9 else 'NOT met'} on this validation fold. Not calibrated for any
population; the threshold 0.5 is not tuned to a clinical operating point. Not validated on ABVS volumes (used there
on transverse slices only when no three-plane model is installed).

**Retrain.** `{cmd}`
"""
    return manifest, card
