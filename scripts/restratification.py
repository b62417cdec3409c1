"""The BI-RADS 4A re-stratification on held-out validation predictions (downgraded / kept / upgraded, and the
cancers among each), from the val_*.npz files train_classifier.py writes.

    .venv/bin/python scripts/restratification.py --manifest ../shared/data/breast-us/manifest.csv --work runs/classifiers \
        [--fusion Resources/Models/breastdlr-fusion-age]

With ``--fusion`` the malignancy score is the clinical fusion head's (image score + age from the manifest), as
``analyze`` and ``predict`` use it when that head is installed; the thresholds are the bundles' own.

With ``--morphology WORK`` both scores are the morphology models' (image score + the reader's outline, as
``analyze --outline`` and ``predict --outline manifest`` use them), cross-validated on the held-out fold
(``oof_*.npz`` from train_morphology.py), against the shipped morphology bundles' thresholds.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BreastDLRLib.bundles import open_bundle  # noqa: E402
from BreastDLRLib.recommend import recommend  # noqa: E402


def table(grades, manifest_rows, p_mal, p_risk, t_mal=0.5, t_risk=0.5):
    actions, cancers, n = Counter(), Counter(), 0
    for cid, pm in p_mal.items():
        row = manifest_rows[cid]
        if row["birads"].lower() not in grades or cid not in p_risk:
            continue
        n += 1
        action = recommend("4a", p_risk[cid], pm, risk_threshold=t_risk, malignancy_threshold=t_mal).action
        actions[action] += 1
        cancers[action] += row["label"] == "malignant"
    return {"lesions": n, "actions": dict(actions), "cancers_by_action": dict(cancers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--work", required=True, help="folder with val_malignancy.npz and val_risk.npz")
    ap.add_argument("--fusion", help="a clinical fusion bundle to apply to the malignancy scores")
    ap.add_argument("--risk-model", default=None, help="the risk bundle whose threshold to use (default: 0.5)")
    ap.add_argument("--morphology", metavar="WORK", help="folder with oof_malignancy.npz and oof_risk.npz")
    a = ap.parse_args()
    if a.morphology and a.fusion:
        ap.error("--morphology and --fusion are two different scores; give one")
    load_from = lambda path: (lambda z: {str(c): float(p) for c, p in zip(z["case_id"], z["probs"])})(np.load(path))
    load = lambda n: load_from(Path(a.work) / n)
    p_mal, p_risk = load("val_malignancy.npz"), load("val_risk.npz")
    with open(a.manifest, newline="", encoding="utf-8") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    t_mal = t_risk = 0.5
    if a.fusion:
        from BreastDLRLib.clinical import ClinicalSchema
        from BreastDLRLib.pipeline import fused_probability

        head = open_bundle(a.fusion)
        schema = ClinicalSchema(head.clinical_variables)
        p_mal = {cid: fused_probability(head, schema, schema.parse_values(
                     {v: rows[cid].get(v) or None for v in schema.names}), p) for cid, p in p_mal.items()}
        t_mal = float(head.thresholds.get("probability", 0.5))
    if a.risk_model:
        t_risk = float(open_bundle(a.risk_model).thresholds.get("probability", 0.5))
    if a.morphology:
        from BreastDLRLib.bundles import default_bundle

        w = Path(a.morphology)
        p_mal = {**p_mal, **load_from(w / "oof_malignancy.npz")}
        p_risk = {**p_risk, **load_from(w / "oof_risk.npz")}
        t_mal = float(default_bundle("morphology-malignancy").thresholds["probability"])
        t_risk = float(default_bundle("morphology-risk").thresholds["probability"])
    print(json.dumps({"malignancy_score": "clinical fusion" if a.fusion else "morphology (reader outline)"
                      if a.morphology else "image model",
                      "thresholds": {"malignancy": t_mal, "high_risk": t_risk},
                      "birads_4a": table({"4a"}, rows, p_mal, p_risk, t_mal, t_risk),
                      "birads_4_or_4a_as_if_4a": table({"4", "4a"}, rows, p_mal, p_risk, t_mal, t_risk)}, indent=1))


if __name__ == "__main__":
    main()
