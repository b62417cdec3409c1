"""Train the shipped ABVS three-plane model on synthetic volumes, branches initialised from the 2D malignancy model.

    .venv/bin/python scripts/train_abvs.py --init Resources/Models/breastdlr-malignancy-2d \
        --out Resources/Models/breastdlr-abvs-threeplane
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BreastDLRLib import __version__  # noqa: E402
from BreastDLRLib.bundles import load_weights, open_bundle, save_bundle  # noqa: E402
from BreastDLRLib.training.abvs import SYNTHETIC_SOURCE, AbvsConfig, train_abvs  # noqa: E402
from BreastDLRLib.training.cards import INTENDED_USE  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="the 2D malignancy bundle whose trunk initialises every plane")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-volumes", type=int, default=AbvsConfig.n_volumes)
    ap.add_argument("--epochs", type=int, default=AbvsConfig.epochs)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    init = open_bundle(a.init)
    args, state = init.manifest["arguments"], load_weights(init)
    if init.manifest["architecture"] == "EnsembleNet":   # an ensemble: its first member initialises the branches
        args = args["member_arguments"]
        state = {k[len("members.0."):]: v for k, v in state.items() if k.startswith("members.0.")}
    cfg = AbvsConfig(n_volumes=a.n_volumes, epochs=a.epochs, seed=a.seed, size=int(init.input["size"][0]),
                     backbone=args["backbone"])
    res = train_abvs(cfg, state, log=lambda m: print(m, flush=True))
    m = res["metrics"]
    cmd = f"python scripts/train_abvs.py --init Resources/Models/{init.name} --out Resources/Models/breastdlr-abvs-threeplane"
    manifest = {
        "name": "breastdlr-abvs-threeplane", "version": __version__, "role": "abvs-malignancy", "default": True,
        "task": "benign vs malignant from transverse, sagittal and coronal planes of an ABVS volume",
        "architecture": "ThreePlaneFusion", "arguments": {"backbone": cfg.backbone, "num_classes": 2, "dropout": 0.5,
                                                       "shared_trunk": cfg.shared_trunk},
        "input": {"size": [cfg.size, cfg.size], "channels": 3, "normalisation": "minmax",
                  "planes": ["transverse", "sagittal", "coronal"], "margin": cfg.margin, "margin_of": cfg.margin_of,
                  "frames": cfg.frames},
        "labels": ["benign", "malignant"], "thresholds": {"probability": 0.5}, "clinical_variables": [],
        "provenance": {"data": SYNTHETIC_SOURCE, "initialised_from": f"{init.name} {init.version} (sha256 {init.manifest['weights']['sha256']})",
                       "trained": dt.date.today().isoformat(), "config": res["config"], "command": cmd},
        "metrics": m, "licence": "Apache-2.0", "intended_use": INTENDED_USE,
    }
    card = f"""# Model card: breastdlr-abvs-threeplane

**Intended use.** {INTENDED_USE} This model has never seen a real breast volume.

**What it is.** ThreePlaneFusion (Liu et al. 2025): a {cfg.backbone} branch per plane (transverse, sagittal, coronal){
"; the three branches share one set of trunk weights (Liu et al. train three separate trunks; sharing keeps the bundle at a third of the size, and `shared_trunk=False` gives the paper's form)" if cfg.shared_trunk else ""};
transverse and sagittal features added, the sum concatenated with the coronal features, a fully connected layer halving
the fused width, two outputs; per-frame probabilities ({cfg.frames} frames around the lesion centre) averaged per lesion.
Every branch was initialised from the 2D malignancy model `{init.name}` (trained on real 2D breast ultrasound), the transfer
Lu et al. 2025 made from BUSI. Trained with SGD (momentum {cfg.momentum}, lr {cfg.lr}, batch {cfg.batch_size}; Liu 2025 used
batch 64) and bf16 autocast, {cfg.epochs} epochs, the best validation AUC kept. Weights stored in float16.

**Data.** {res['n_train']} training lesions from {cfg.n_volumes} synthetic ABVS-like volumes ({SYNTHETIC_SOURCE};
see docs/synthetic.md): benign-like lesions are oval, circumscribed and parallel, malignant-like ones irregular, spiculated,
not parallel, with shadowing. Volumes are split into training and validation (no volume on both sides).

**Metrics (synthetic validation volumes only).** AUC {m['auc_synthetic']:.3f} (95 % CI {m['auc_synthetic_ci95'][0]:.3f}-{m['auc_synthetic_ci95'][1]:.3f}),
accuracy {m['accuracy_synthetic']:.3f} on {m['val_lesions']} lesions of {m['val_volumes']} volumes. These figures say the
code path works; they say nothing about real patients.

**Limits.** No real ABVS/ABUS volume was available. Retrain on real volumes before any use: `breastdlr` reads them
(NRRD/NIfTI/DICOM series with true spacing) and the same crop code serves training and inference.

**Retrain.** `{cmd}`
"""
    b = save_bundle(a.out, res["model"], manifest, card, half=True)
    print(json.dumps(m, indent=1))
    print(f"[abvs] bundle written to {b.path}")


if __name__ == "__main__":
    main()
