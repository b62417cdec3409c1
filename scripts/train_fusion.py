"""Fit the shipped clinical fusion head (image score + age, Bong et al. 2023 style logistic score fusion).

Inputs: the out-of-sample malignancy probabilities of the validation fold, as the product computes them (with the
mirror test-time augmentation), written by add_mirror_tta.py (``val_malignancy.npz``) and the manifest's ``age`` column (known for BrEaST-Lesions-USG only; elsewhere the
head sees age as missing through an indicator column).  Reports 5-fold cross-validated AUCs of the fused
score and of the image score alone on the same cases, with DeLong's test.

    .venv/bin/python scripts/train_fusion.py --manifest ../shared/data/breast-us/manifest.csv \
        --val runs/classifiers-work/val_malignancy.npz --out Resources/Models/breastdlr-fusion-age
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
from BreastDLRLib.bundles import save_head_bundle  # noqa: E402
from BreastDLRLib.clinical import ClinicalSchema, ScoreFusionHead, head_to_dict  # noqa: E402
from BreastDLRLib.evaluation import binary_metrics, delong_test, roc_auc, rule_out_threshold  # noqa: E402
from BreastDLRLib.training.cards import DATA_CITATION, INTENDED_USE  # noqa: E402
from BreastDLRLib.training.data import read_manifest_csv  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--val", required=True, help="val_malignancy.npz from train_classifier.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--sensitivity", type=float, default=0.95,
                    help="the cross-validated sensitivity the head's threshold must keep (rule-out point; default 0.95)")
    a = ap.parse_args()
    z = np.load(a.val, allow_pickle=False)
    by_id = {c.case_id: c for c in read_manifest_csv(a.manifest)}
    ages = [by_id[str(i)].row.get("age", "") for i in z["case_id"]]
    known = [float(x) for x in ages if x]
    variables = [{"name": "age", "type": "number", "unit": "years", "valid_range": [10, 100], "missing": "indicator",
                  "median": float(np.median(known)), "description": "Patient age at the examination."}]
    schema = ClinicalSchema(variables)
    p = np.clip(z["probs"].astype(float), 1e-6, 1 - 1e-6)
    y = z["labels"].astype(int)
    X = np.array([np.r_[np.log(pi / (1 - pi)), schema.encode(schema.parse_values({"age": ag or None}))[0]]
                  for pi, ag in zip(p, ages)])
    from sklearn.model_selection import StratifiedGroupKFold

    groups = [by_id[str(i)].patient_id for i in z["case_id"]]      # a patient's views stay in one fold
    oof = np.zeros(len(y))
    for tr, te in StratifiedGroupKFold(5, shuffle=True, random_state=0).split(X, y, groups):
        oof[te] = ScoreFusionHead(method="logistic", C=1.0).fit(X[tr], y[tr]).predict_proba(X[te])[:, 1]
    with_age = np.array([bool(x) for x in ages])
    res = {"cases": int(len(y)), "cases_with_age": int(with_age.sum()),
           "cv_auc_fused": roc_auc(y, oof).auc, "auc_image_only": roc_auc(y, p).auc,
           "delong_fused_vs_image": delong_test(y, oof, p).p_value}
    if len(set(y[with_age])) == 2:
        res["cv_auc_fused_with_age"] = roc_auc(y[with_age], oof[with_age]).auc
        res["auc_image_only_with_age"] = roc_auc(y[with_age], p[with_age]).auc
    threshold = rule_out_threshold(y, oof, a.sensitivity)
    bm = binary_metrics(y, oof >= threshold)
    res["rule_out"] = {"target_sensitivity": a.sensitivity, "threshold": threshold,
                       "cv_sensitivity": [bm.sensitivity.value, bm.sensitivity.low, bm.sensitivity.high],
                       "cv_specificity": [bm.specificity.value, bm.specificity.low, bm.specificity.high],
                       "cv_npv": [bm.npv.value, bm.npv.low, bm.npv.high],
                       "note": "chosen on the out-of-fold fused probabilities of these cases (Wilson 95 % CIs)"}
    head = ScoreFusionHead(method="logistic", C=1.0).fit(X, y)
    manifest = {
        "name": "breastdlr-fusion-age", "version": __version__, "role": "fusion", "default": True,
        "task": "P(malignant) from the image model's score and the patient's age",
        "architecture": "ScoreFusionHead", "arguments": {"method": "logistic", "C": 1.0},
        "input": {"features": ["logit of the malignancy model's probability"] + schema.feature_names,
                  "image_model": "breastdlr-malignancy-2d"},
        "labels": ["benign", "malignant"], "thresholds": {"probability": threshold},
        "clinical_variables": [schema.variables[0].to_dict()],
        "provenance": {"data": DATA_CITATION, "fitted_on": "validation fold of breastdlr-malignancy-2d (out-of-sample image scores)",
                       "trained": dt.date.today().isoformat(),
                       "command": "python scripts/train_fusion.py --manifest <breast-us>/manifest.csv --val <work>/tta/val_malignancy.npz --out Resources/Models/breastdlr-fusion-age (val_malignancy.npz from scripts/add_mirror_tta.py)"},
        "metrics": res, "licence": "Apache-2.0", "intended_use": INTENDED_USE,
    }
    card = f"""# Model card: breastdlr-fusion-age

**Intended use.** {INTENDED_USE}

**What it is.** A logistic score-fusion head (Bong et al. 2023) on [logit of the malignancy model's probability, age,
age-missing indicator]. Age is the only clinical variable the public data gives (BrEaST-Lesions-USG); elsewhere it is
missing and the indicator column carries that. Stored as JSON arrays (no pickle).

**Data.** The {res['cases']} validation-fold lesions of breastdlr-malignancy-2d (their image scores are out-of-sample:
the malignancy model's probability with the left-right mirror averaged in, as `analyze` and `predict` compute it),
{res['cases_with_age']} with a known age. {DATA_CITATION}.

**Metrics (5-fold cross-validation on those cases, grouped by patient).** fused AUC {res['cv_auc_fused']:.3f} vs image-only {res['auc_image_only']:.3f}
(DeLong p = {res['delong_fused_vs_image']:.3f}){'' if 'cv_auc_fused_with_age' not in res else f"; on the cases with age: fused {res['cv_auc_fused_with_age']:.3f} vs image-only {res['auc_image_only_with_age']:.3f}"}.

**Threshold: a rule-out point.** A lesion counts as benign for the BI-RADS 4A rule (and in the findings) only when
its fused probability is below {threshold:.3f}, the largest threshold that kept the cross-validated sensitivity at or
above {a.sensitivity:.0%}: sensitivity {res['rule_out']['cv_sensitivity'][0]:.3f} (95 % CI {res['rule_out']['cv_sensitivity'][1]:.3f}-{res['rule_out']['cv_sensitivity'][2]:.3f}), specificity
{res['rule_out']['cv_specificity'][0]:.3f} ({res['rule_out']['cv_specificity'][1]:.3f}-{res['rule_out']['cv_specificity'][2]:.3f}), NPV {res['rule_out']['cv_npv'][0]:.3f} ({res['rule_out']['cv_npv'][1]:.3f}-{res['rule_out']['cv_npv'][2]:.3f}) on these cases. A downgrade to BI-RADS 3 has to miss
very few cancers; 0.5 missed far too many (see the README). The threshold was chosen on the same cases it is
reported on: expect it to be optimistic, and tune it on your own data.

**Limits.** Very few cases carry age; the age effect is weakly estimated. Refit it on your own population.

**Retrain.** `{manifest['provenance']['command']}`
"""
    b = save_head_bundle(a.out, head_to_dict(head), manifest, card)
    print(json.dumps(res, indent=1))
    print(f"[fusion] bundle written to {b.path}")


if __name__ == "__main__":
    main()
