"""Make a lesion classifier bundle an ensemble of members trained on one patient split, and measure it.

    .venv/bin/python scripts/make_ensemble.py --manifest ../shared/data/breast-us/manifest.csv \
        --task malignancy --members Resources/Models/breastdlr-malignancy-2d runs/member2/breastdlr-malignancy-2d \
        --out Resources/Models/breastdlr-malignancy-2d --work runs/ensemble

    .venv/bin/python scripts/make_ensemble.py --manifest ../shared/data/breast-us/manifest.csv \
        --task both --members runs/pair1/models runs/pair2/models --out Resources/Models --work runs/ensemble

Every member must be a single-network bundle written by ``scripts/train_classifier.py`` (or ``breastdlr train``)
with the same architecture, input, patient split (folds, validation fold, split seed) and task.  The held-out
fold of that split is cut again with the product's own crop function, each member and the ensemble (mean of
the members' probabilities, with the left-right mirror averaged in, as the bundle declares) are measured on
it, and DeLong's test compares the ensemble with the first member.  The bundle is written with
:func:`BreastDLRLib.bundles.save_ensemble_bundle` (the first member's weights file is kept byte for byte);
``<work>/val_<task>.npz`` gets the ensemble's held-out probabilities for ``train_fusion.py`` and
``restratification.py``.

``--task both`` takes models folders written by ``train_classifier.py --task both`` (each holding a malignancy
and a risk bundle on one trunk), writes the malignancy ensemble and the risk ensemble into the models folder
``--out``, and stores each member's trunk once (:func:`BreastDLRLib.bundles.share_weights`): the risk ensemble
keeps its members' last layers and takes their trunks from the malignancy ensemble's files.  Do not give the
folder being written as a member: copy the released pair elsewhere first.
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
from BreastDLRLib.bundles import MANIFEST, open_bundle, read_manifest, save_ensemble_bundle, share_weights  # noqa: E402
from BreastDLRLib.evaluation import delong_test, roc_auc  # noqa: E402
from BreastDLRLib.errors import InputError  # noqa: E402
from BreastDLRLib.training.heldout import held_out_crops, probabilities  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--task", required=True, choices=("malignancy", "risk", "both"))
    ap.add_argument("--members", nargs="+", required=True,
                    help="member bundle folders (the first one's file is kept); with --task both, models folders "
                         "each holding a malignancy and a risk bundle")
    ap.add_argument("--out", required=True, help="the ensemble's bundle folder; with --task both, a models folder")
    ap.add_argument("--work", default="runs/ensemble")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    command = (f"python scripts/make_ensemble.py --manifest <breast-us>/manifest.csv --task {a.task} --members "
               f"{' '.join(a.members)} --out {a.out}")
    if a.task != "both":
        build(a.manifest, a.task, [Path(m) for m in a.members], Path(a.out), Path(a.work), command)
        return
    out = Path(a.out)
    if any(Path(m).resolve() == out.resolve() for m in a.members):
        sys.exit("make_ensemble: --out is one of the members' folders; copy the released pair elsewhere first.")
    written = {}
    for task in ("malignancy", "risk"):
        paths = [one_of_role(Path(m), task) for m in a.members]
        written[task] = build(a.manifest, task, paths, out / paths[0].name, Path(a.work), command)
    shared = share_weights(written["malignancy"].path, written["risk"].path)
    print(f"[ensemble] {shared.name} takes its members' trunks from {written['malignancy'].name} "
          f"({shared.manifest['weights']['bytes']} bytes of its own)")


def one_of_role(folder: Path, role: str) -> Path:
    """The bundle of ``role`` in a models folder written by ``train_classifier.py --task both``."""
    found = [sub for sub in sorted(folder.iterdir()) if (sub / MANIFEST).is_file() and read_manifest(sub)["role"] == role]
    if len(found) != 1:
        sys.exit(f"make_ensemble: {folder} holds {len(found)} {role} models; one was expected.")
    return found[0]


def build(manifest_csv: str, task: str, member_paths, out_path: Path, work: Path, command: str):
    """The ensemble of ``member_paths`` for ``task``, measured on their held-out fold and written to ``out_path``."""
    members = [open_bundle(m) for m in member_paths]
    try:
        xv, yv, val_cases = held_out_crops([b.manifest for b in members], manifest_csv, task, cache_dir=work)
    except InputError as exc:
        sys.exit(f"make_ensemble: {exc}")
    per_member, plain = [], []
    for b in members:
        p0, p_tta = probabilities(b.model("cpu"), xv)
        plain.append(p0)
        per_member.append(p_tta)
    p_ens, p_ens_plain = np.mean(per_member, 0), np.mean(plain, 0)
    ds = np.array([c.dataset for c in val_cases])
    auc = roc_auc(yv, p_ens)
    metrics = dict(members[0].manifest["metrics"])
    for k in ("auc", "auc_ci95", "auc_by_dataset", "auc_tta_hflip", "bf16_vs_fp32_max_abs_diff", "best_epoch",
              "epochs_run"):
        metrics.pop(k, None)
    metrics.update({
        "auc": auc.auc, "auc_ci95": [auc.ci_low, auc.ci_high], "auc_without_tta": roc_auc(yv, p_ens_plain).auc,
        "auc_by_dataset": {d: roc_auc(yv[ds == d], p_ens[ds == d]).auc for d in sorted(set(ds))
                           if len(set(yv[ds == d])) == 2},
        "members": [{"name": b.name, "weights_sha256": b.manifest["weights"]["sha256"],
                     "seed": b.manifest["provenance"]["config"]["seed"],
                     "box_views": b.manifest["provenance"]["config"].get("box_views", 0),
                     "auc": roc_auc(yv, p).auc, "auc_tta_hflip": roc_auc(yv, q).auc,
                     "best_epoch": b.manifest["metrics"].get("best_epoch"),
                     "epochs_run": b.manifest["metrics"].get("epochs_run")}
                    for b, p, q in zip(members, plain, per_member)],
        "delong_ensemble_vs_first_member": delong_test(yv, p_ens, per_member[0]).p_value,   # both with the mirror
    })
    first = members[0].manifest
    manifest = {k: v for k, v in first.items()
                if k not in ("architecture", "arguments", "weights", "format", "uses_weights_of")}
    manifest["version"] = __version__
    manifest["input"] = {**first["input"], "test_time_augmentation": ["hflip"]}
    manifest["metrics"] = metrics
    manifest["provenance"] = {**first["provenance"], "ensembled": dt.date.today().isoformat(),
                              "ensemble_command": command,
                              "member_configs": [b.manifest["provenance"]["config"] for b in members]}
    card = ensemble_card(members, manifest, task, len(yv))
    out = save_ensemble_bundle(out_path, [b.path for b in members], manifest, card)
    np.savez(work / f"val_{task}.npz", probs=p_ens, labels=yv, case_id=np.array([c.case_id for c in val_cases]))
    print(json.dumps({"bundle": str(out.path), **{k: metrics[k] for k in
                      ("auc", "auc_ci95", "auc_without_tta", "auc_by_dataset", "members",
                       "delong_ensemble_vs_first_member")}}, indent=1))
    return out


def ensemble_card(members, manifest: dict, task: str, n_val: int) -> str:
    """The first member's card with the ensemble's description and metrics in front."""
    m = manifest["metrics"]
    first_card = (members[0].path / members[0].manifest.get("model_card", "MODEL_CARD.md")).read_text(encoding="utf-8")
    body = first_card.split("\n", 1)[1] if first_card.startswith("# ") else first_card
    rows = "\n".join(f"| {k + 1} | seed {mm['seed']}" + (f", {mm['box_views']} box views" if mm.get("box_views") else "")
                     + f" | {mm['auc']:.3f} | {mm['auc_tta_hflip']:.3f} | "
                     f"{mm['best_epoch']} of {mm['epochs_run']} |" for k, mm in enumerate(m["members"]))
    commands = "\n".join(f"{k + 1}. `{b.manifest['provenance'].get('command', '(not recorded)')}`" for k, b in enumerate(members))
    by_ds = ", ".join(f"{d} {v:.3f}" for d, v in m["auc_by_dataset"].items())
    goal = "met" if m["auc"] >= 0.9 else "NOT met"
    return f"""# Model card: {manifest['name']} (ensemble of {len(members)})

**Intended use.** {manifest['intended_use']}

**What it is.** An ensemble (`EnsembleNet`) of {len(members)} networks of the same design, trained separately (other
seeds or other augmentation, see the table) on the same patient split; its probability is the mean of the members' probabilities, each averaged
over the crop and its left-right mirror (test-time augmentation, declared in the manifest and applied by `analyze` and
`predict`). Grad-CAM averages the members' maps. The member design is described below.

**Metrics (held-out patients of the data at hand: {n_val} crops of the validation fold none of the members saw).**
AUC {m['auc']:.3f} (95 % CI {m['auc_ci95'][0]:.3f}-{m['auc_ci95'][1]:.3f}, DeLong); without the mirror
{m['auc_without_tta']:.3f}; by dataset {by_ds}. DeLong's test against the first member alone (both with the mirror): p = {m['delong_ensemble_vs_first_member']:.3f}.
The project's quality goal (AUC >= 0.90 on unseen patients) is {goal} on this fold; the fold is one of five, and the
held-back patients of the datasets have not been measured here.

| member | training | AUC | AUC with mirror | best epoch |
|---|---|---|---|---|
{rows}

**Rebuild.** Train each member with its own command (each in its own output folder):

{commands}

then `{manifest['provenance']['ensemble_command']}` (see scripts/retrain_models.sh).

## The members (card of the first member)
{body}"""


if __name__ == "__main__":
    main()
