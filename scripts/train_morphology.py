"""Fit a shipped morphology model: the image model's score fused with handcrafted features of a reader's outline.

Stage 1 (features alone) is fitted on the image model's training patients, stage 2 (image logit + stage-1 score) on
its held-out fold, whose out-of-sample probabilities (with the mirror, as the product computes them) come from
add_mirror_tta.py.  See BreastDLRLib/training/morphology.py.

    .venv/bin/python scripts/train_morphology.py --manifest ../shared/data/breast-us/manifest.csv --task malignancy \
        --val runs/tta/val_malignancy.npz --image-model Resources/Models/breastdlr-malignancy-2d \
        --out Resources/Models/breastdlr-morphology-malignancy --work runs/morphology
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BreastDLRLib import __version__  # noqa: E402
from BreastDLRLib.bundles import open_bundle, save_head_bundle  # noqa: E402
from BreastDLRLib.clinical import head_to_dict  # noqa: E402
from BreastDLRLib.errors import InputError  # noqa: E402
from BreastDLRLib.evaluation import binary_metrics, delong_test, roc_auc, rule_out_threshold  # noqa: E402
from BreastDLRLib.morphology import FEATURES  # noqa: E402
from BreastDLRLib.training.cards import DATA_CITATION, INTENDED_USE  # noqa: E402
from BreastDLRLib.training.classifier import label_of  # noqa: E402
from BreastDLRLib.training.data import read_manifest_csv  # noqa: E402
from BreastDLRLib.morphology import logit  # noqa: E402
from BreastDLRLib.training.morphology import fit_morphology_head, outline_features, train_rows  # noqa: E402

KEYS = {"malignancy": ("malignancy", ["benign", "malignant"], "P(malignant)"),
        "risk": ("high_risk", ["BI-RADS 2-3", "BI-RADS 4-5"], "P(BI-RADS 4-5)")}


def auc_ci(y, s):
    r = roc_auc(y, s)
    return [r.auc, r.ci_low, r.ci_high]


def features_only_cv(cases, feats, task: str, C: float, k: int = 5, seed: int = 0):
    """Stage 1 alone (features only) in patient-level stratified k-fold CV over every labelled outline: more
    lesions behind one figure than the held-out fold alone."""
    from BreastDLRLib.clinical import LinearFusionHead
    from BreastDLRLib.training.classifier import classifier_folds

    kept = [c for c in cases if c.case_id in feats and label_of(c, task) is not None]
    x = np.array([feats[c.case_id] for c in kept])
    y = np.array([label_of(c, task) for c in kept])
    folds = classifier_folds(kept, (task,), k, seed)
    oof = np.zeros(len(y))
    for f in range(k):
        te = folds == f
        oof[te] = LinearFusionHead(C=C).fit(x[~te], y[~te]).decision_function(x[te])
    ds = np.array([c.dataset for c in kept])
    return {"lesions": int(len(y)), "patients": len({f"{c.dataset}/{c.patient_id}" for c in kept}),
            "auc": auc_ci(y, oof),
            "by_dataset": {d: roc_auc(y[ds == d], oof[ds == d]).auc for d in sorted(set(ds)) if len(set(y[ds == d])) == 2}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--task", choices=("malignancy", "risk"), required=True)
    ap.add_argument("--val", required=True, help="val_<task>.npz from add_mirror_tta.py (held-out probabilities)")
    ap.add_argument("--image-model", required=True, help="the image model bundle those probabilities came from")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="runs/morphology", help="feature cache folder")
    ap.add_argument("--C", type=float, default=1.0, help="L2 strength of stage 1 (inverse)")
    ap.add_argument("--sensitivity", type=float, default=0.95,
                    help="malignancy: the cross-validated sensitivity the threshold must keep (rule-out point)")
    ap.add_argument("--segmenter-check", default=None,
                    help="JSON of scripts/morphology_on_segmenter_outlines.py --out, measured with this same fit: "
                         "quoted in the card (why the model is not applied to the segmenter's outlines)")
    a = ap.parse_args()
    key, labels, what = KEYS[a.task]
    image_model = open_bundle(a.image_model)
    cases = read_manifest_csv(a.manifest)
    by_id = {c.case_id: c for c in cases}
    feats = outline_features(cases, cache=Path(a.work) / "features.json")
    z = np.load(a.val, allow_pickle=False)
    held = [by_id[str(i)] for i in z["case_id"]]
    if any(int(label_of(c, a.task)) != int(y) for c, y in zip(held, z["labels"])):
        raise InputError(f"{a.val} does not carry this manifest's {a.task} labels.")
    held_patients = {f"{c.dataset}/{c.patient_id}" for c in held}
    x_tr, y_tr, tr_cases = train_rows(cases, feats, lambda c: label_of(c, a.task), held_patients)
    use = np.array([c.case_id in feats for c in held])
    held = [c for c, u in zip(held, use) if u]
    p_img = z["probs"].astype(np.float64)[use]
    y = z["labels"].astype(int)[use]
    x_held = np.array([feats[c.case_id] for c in held])
    fit = fit_morphology_head(x_tr, y_tr, logit(p_img), x_held, y, [f"{c.dataset}/{c.patient_id}" for c in held], C=a.C)
    ds = np.array([c.dataset for c in held])
    cv5 = features_only_cv(cases, feats, a.task, a.C)
    res = {
        "train_cases": int(len(y_tr)), "train_patients": len({f"{c.dataset}/{c.patient_id}" for c in tr_cases}),
        "held_out_cases": int(len(y)), "held_out_patients": len({f"{c.dataset}/{c.patient_id}" for c in held}),
        "held_out_without_outline": int((~use).sum()),
        "cv_auc_fused": auc_ci(y, fit.oof), "auc_image_only": auc_ci(y, p_img), "auc_features_only": auc_ci(y, fit.features_only),
        "delong_fused_vs_image": delong_test(y, fit.oof, p_img).p_value,
        "by_dataset": {d: {"cases": int((ds == d).sum()), "cv_auc_fused": roc_auc(y[ds == d], fit.oof[ds == d]).auc,
                           "auc_image_only": roc_auc(y[ds == d], p_img[ds == d]).auc}
                       for d in sorted(set(ds)) if len(set(y[ds == d])) == 2},
        "stage2": {"image_logit": fit.stage2[0], "feature_score": fit.stage2[1], "intercept": fit.stage2[2]},
        "features_only_5fold_cv": cv5,
    }
    if a.task == "malignancy":
        threshold = rule_out_threshold(y, fit.oof, a.sensitivity)
        bm = binary_metrics(y, fit.oof >= threshold)
        res["rule_out"] = {"target_sensitivity": a.sensitivity, "threshold": threshold,
                           "cv_sensitivity": [bm.sensitivity.value, bm.sensitivity.low, bm.sensitivity.high],
                           "cv_specificity": [bm.specificity.value, bm.specificity.low, bm.specificity.high],
                           "cv_npv": [bm.npv.value, bm.npv.low, bm.npv.high],
                           "note": "chosen on the out-of-fold fused probabilities of these cases (Wilson 95 % CIs)"}
    else:
        threshold = 0.5
    command = (f"python scripts/train_morphology.py --manifest <breast-us>/manifest.csv --task {a.task} "
               f"--val <work>/tta/val_{a.task}.npz --image-model Resources/Models/{image_model.name} "
               f"--out Resources/Models/{Path(a.out).name} (val_{a.task}.npz from scripts/add_mirror_tta.py)")
    name = Path(a.out).name
    seg_check = None
    if a.segmenter_check:
        seg_check = json.loads(Path(a.segmenter_check).read_text(encoding="utf-8")).get(a.task)
        res["segmenter_outlines"] = seg_check
    manifest = {
        "name": name, "version": __version__, "role": f"morphology-{a.task}", "default": True,
        "task": f"{what} from the image model's score and handcrafted features of a reader's lesion outline",
        "architecture": "LinearFusionHead", "arguments": {"C": a.C},
        "input": {"features": ["logit of the image model's probability"] + [n for n, _ in FEATURES],
                  "image_model": image_model.name, "outline": "reader", "dimensions": 2},
        "labels": labels, "thresholds": {"probability": threshold},
        "provenance": {"data": DATA_CITATION, "trained": dt.date.today().isoformat(), "command": command,
                       "fitted_on": f"stage 1: the outlines (manifest masks) of {image_model.name}'s training patients; "
                                    f"stage 2: its held-out fold (out-of-sample image scores)"},
        "metrics": res, "licence": "Apache-2.0", "intended_use": INTENDED_USE,
    }
    f = res
    ro = res.get("rule_out")
    rule = "" if ro is None else f"""
**Threshold: a rule-out point.** A lesion counts as benign (for the BI-RADS 4A rule and in the findings) only when
its probability is below {threshold:.3f}, the largest threshold that kept the cross-validated sensitivity at or
above {a.sensitivity:.0%}: sensitivity {ro['cv_sensitivity'][0]:.3f} (95 % CI {ro['cv_sensitivity'][1]:.3f}-{ro['cv_sensitivity'][2]:.3f}),
specificity {ro['cv_specificity'][0]:.3f} ({ro['cv_specificity'][1]:.3f}-{ro['cv_specificity'][2]:.3f}), NPV {ro['cv_npv'][0]:.3f}
({ro['cv_npv'][1]:.3f}-{ro['cv_npv'][2]:.3f}). It was chosen on the cases it is reported on: expect it to be
optimistic, and tune it on your own data.
"""
    lost = [f"{d} ({v['cases']} lesions: {v['cv_auc_fused']:.3f} against {v['auc_image_only']:.3f})"
            for d, v in res["by_dataset"].items() if v["cv_auc_fused"] < v["auc_image_only"]]
    worse = "" if not lost else (" The fused score was below the image model's alone on " + ", ".join(lost) + ".")
    feature_list = "\n".join(f"- `{n}`: {d}" for n, d in FEATURES)
    seg_text = ("Not measured on the segmenter's outlines for this fit (scripts/morphology_on_segmenter_outlines.py)."
                if not seg_check else
                f"Measured on the held-out fold with the shipped segmenter's outlines instead "
                f"(scripts/morphology_on_segmenter_outlines.py, {seg_check['lesions']} lesions with a lesion found): AUC "
                f"{seg_check['auc_morphology_on_segmenter_outlines']:.3f}, against {seg_check['auc_image_only']:.3f} "
                "for the image model alone on the datasets' own outlines. The head was fitted on reader outlines and is "
                "not applied to the segmenter's.")
    card = f"""# Model card: {name}

**Intended use.** {INTENDED_USE}

**What it is.** {what} of a 2D ultrasound lesion from (1) the probability of `{image_model.name}` and (2) {len(FEATURES)}
handcrafted features of the lesion's outline (shape, orientation, margin, echo pattern, posterior features: the
radiomics half of deep-learning radiomics). A logistic regression on the standardised features (stage 1) and one on
[image logit, stage-1 score] (stage 2), folded into one linear head stored as JSON (no pickle).

**Only for outlines a reader drew or confirmed.** `analyze --outline MASK`, `predict --outline manifest`, and the
Slicer module with a lesion segment selected apply it; on the segmenter's own outlines it is not applied, because
they are smoother than a reader's and move the shape features. {seg_text}

**Data.** Stage 1: {f['train_cases']} lesions of {f['train_patients']} patients, the training patients of
`{image_model.name}`, with their dataset masks as outlines. Stage 2: the {f['held_out_cases']} lesions of
{f['held_out_patients']} patients of its held-out fold ({f['held_out_without_outline']} without a usable outline left out).
{DATA_CITATION}.

**Metrics (held-out fold; stage 2 cross-validated in 5 folds grouped by patient; DeLong 95 % CIs).**
- fused: AUC {f['cv_auc_fused'][0]:.3f} ({f['cv_auc_fused'][1]:.3f}-{f['cv_auc_fused'][2]:.3f})
- image model alone: {f['auc_image_only'][0]:.3f} ({f['auc_image_only'][1]:.3f}-{f['auc_image_only'][2]:.3f}); DeLong p = {f['delong_fused_vs_image']:.2g}
- features alone (stage 1, fitted on other patients): {f['auc_features_only'][0]:.3f} ({f['auc_features_only'][1]:.3f}-{f['auc_features_only'][2]:.3f})
- features alone in patient-level 5-fold CV over all {cv5['lesions']} outlined lesions ({cv5['patients']} patients): {cv5['auc'][0]:.3f} ({cv5['auc'][1]:.3f}-{cv5['auc'][2]:.3f}); {', '.join(f"{d} {v:.3f}" for d, v in cv5['by_dataset'].items())}
- by dataset (fused / image alone): {'; '.join(f"{d} {v['cv_auc_fused']:.3f} / {v['auc_image_only']:.3f} (n={v['cases']})" for d, v in f['by_dataset'].items())}
{rule}
**Features.**
{feature_list}

**Limits.** The outlines are the datasets' own masks, drawn by each dataset's annotators; another reader's
outlines, another scanner or a population with other lesions will move these figures. Fitted on one held-out fold
of {f['held_out_cases']} lesions. 2D images only.{worse}

**Retrain.** `{command}`
"""
    b = save_head_bundle(a.out, head_to_dict(fit.head), manifest, card)
    oof = Path(a.work) / f"oof_{a.task}.npz"      # for scripts/restratification.py --morphology
    np.savez(oof, case_id=np.array([c.case_id for c in held]), probs=fit.oof, labels=y)
    print(f"[morphology] cross-validated held-out probabilities in {oof}")
    print(json.dumps(res, indent=1))
    print(f"[morphology] bundle written to {b.path}")


if __name__ == "__main__":
    main()
