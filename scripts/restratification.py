"""The BI-RADS 4A re-stratification on held-out validation predictions (downgraded / kept / upgraded, and the
cancers among each), from the val_*.npz files train_classifier.py writes.

    .venv/bin/python scripts/restratification.py --manifest ../shared/data/breast-us/manifest.csv --work runs/classifiers
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

from BreastDLRLib.recommend import recommend  # noqa: E402


def table(grades, manifest_rows, p_mal, p_risk):
    actions, cancers, n = Counter(), Counter(), 0
    for cid, pm in p_mal.items():
        row = manifest_rows[cid]
        if row["birads"].lower() not in grades or cid not in p_risk:
            continue
        n += 1
        action = recommend("4a", p_risk[cid], pm).action
        actions[action] += 1
        cancers[action] += row["label"] == "malignant"
    return {"lesions": n, "actions": dict(actions), "cancers_by_action": dict(cancers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--work", required=True, help="folder with val_malignancy.npz and val_risk.npz")
    a = ap.parse_args()
    load = lambda n: (lambda z: {str(c): float(p) for c, p in zip(z["case_id"], z["probs"])})(np.load(Path(a.work) / n))
    p_mal, p_risk = load("val_malignancy.npz"), load("val_risk.npz")
    with open(a.manifest, newline="", encoding="utf-8") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    print(json.dumps({"birads_4a": table({"4a"}, rows, p_mal, p_risk),
                      "birads_4_or_4a_as_if_4a": table({"4", "4a"}, rows, p_mal, p_risk)}, indent=1))


if __name__ == "__main__":
    main()
