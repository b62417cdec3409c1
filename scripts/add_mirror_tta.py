"""Declare the left-right mirror test-time augmentation in a trained classifier bundle, measured on its own
held-out fold (the weights are not touched).

    .venv/bin/python scripts/add_mirror_tta.py --manifest ../shared/data/breast-us/manifest.csv \
        --task malignancy --bundle Resources/Models/breastdlr-malignancy-2d --work runs/tta

The held-out fold is cut again from the bundle's own split (BreastDLRLib.training.heldout); the AUC without the
mirror must reproduce the one in the manifest (same patients, same crops), else nothing is written.  The manifest
then declares ``input.test_time_augmentation: ["hflip"]`` (``analyze`` and ``predict`` average each crop with its
mirror), ``metrics.auc`` becomes the AUC with the mirror (``auc_without_tta`` keeps the old figure) and the card
says so.  ``<work>/val_<task>.npz`` gets the held-out probabilities for train_fusion.py and restratification.py.
Bundles written by ``breastdlr train`` today declare the mirror already: for them only the npz is written.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BreastDLRLib.bundles import MANIFEST, open_bundle  # noqa: E402
from BreastDLRLib.errors import InputError  # noqa: E402
from BreastDLRLib.evaluation import delong_test, roc_auc  # noqa: E402
from BreastDLRLib.training.heldout import held_out_crops, probabilities  # noqa: E402


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--task", required=True, choices=("malignancy", "risk"))
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--work", default="runs/tta")
    a = ap.parse_args()
    b = open_bundle(a.bundle)
    if b.manifest["architecture"] == "EnsembleNet":
        sys.exit("add_mirror_tta: an ensemble made by make_ensemble.py declares the mirror already")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        xv, yv, cases = held_out_crops([b.manifest], a.manifest, a.task, cache_dir=work)
    except InputError as exc:
        sys.exit(f"add_mirror_tta: {exc}")
    plain, tta = probabilities(b.model("cpu"), xv)
    m = b.manifest["metrics"]
    before = roc_auc(yv, plain).auc
    declared = m.get("auc_without_tta", m["auc"])
    # the manifest's figure was measured on the fp32 network before its weights were stored in fp16, which moves an
    # AUC by about 1e-4; other patients or crops move it by far more
    if abs(before - declared) > 1e-3:
        sys.exit(f"add_mirror_tta: the held-out AUC without the mirror is {before:.4f} here but "
                 f"{declared:.4f} in the manifest: not the same patients or crops; nothing written")
    auc = roc_auc(yv, tta)
    np.savez(work / f"val_{a.task}.npz", probs=tta, labels=yv, case_id=np.array([c.case_id for c in cases]))
    if "hflip" in b.manifest["input"].get("test_time_augmentation", ()):
        print(json.dumps({"bundle": str(b.path), "already_declared": True, "auc": auc.auc,
                          "auc_without_tta": before}, indent=1))
        return
    ds = np.array([c.dataset for c in cases])
    metrics = dict(m, auc=auc.auc, auc_ci95=[auc.ci_low, auc.ci_high], auc_without_tta=before,
                   auc_by_dataset={d: roc_auc(yv[ds == d], tta[ds == d]).auc for d in sorted(set(ds))
                                   if len(set(yv[ds == d])) == 2},
                   auc_by_dataset_without_tta=m.get("auc_by_dataset"),
                   delong_tta_vs_without=delong_test(yv, tta, plain).p_value)
    manifest = dict(b.manifest, metrics=metrics, input={**b.manifest["input"], "test_time_augmentation": ["hflip"]})
    manifest["provenance"] = dict(manifest["provenance"], test_time_augmentation_added=dt.date.today().isoformat())
    card_path = b.path / b.manifest.get("model_card", "MODEL_CARD.md")
    card = card_path.read_text(encoding="utf-8")
    by_ds = ", ".join(f"{k} {v:.3f}" for k, v in metrics["auc_by_dataset"].items())
    note = (f"\n**Test-time augmentation (added {dt.date.today().isoformat()}).** `analyze` and `predict` average each "
            f"crop's probability with that of its left-right mirror (declared in the manifest). On the same "
            f"{len(yv)} held-out crops: AUC {auc.auc:.3f} (95 % CI {auc.ci_low:.3f}-{auc.ci_high:.3f}, DeLong) against "
            f"{before:.3f} without the mirror (DeLong p = {metrics['delong_tta_vs_without']:.3f}); by dataset {by_ds}. "
            f"The figures below are without the mirror.\n")
    marker = "\n**Task.**"
    card = card.replace(marker, note + marker, 1) if marker in card else card + note
    _write(b.path / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    _write(card_path, card)
    print(json.dumps({"bundle": str(b.path), "auc": auc.auc, "auc_ci95": [auc.ci_low, auc.ci_high],
                      "auc_without_tta": before, "auc_by_dataset": metrics["auc_by_dataset"],
                      "delong_tta_vs_without": metrics["delong_tta_vs_without"]}, indent=1))


if __name__ == "__main__":
    main()
