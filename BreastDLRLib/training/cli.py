"""``breastdlr train``: train the lesion segmenter or a lesion classifier from a manifest into a model bundle.

By default one patient-level fold (``--val-fold``, 0 of ``--folds``) is held out for validation and model
selection.  ``--cv`` trains every fold in turn and writes ``cv_metrics.json`` (per-fold and pooled out-of-fold
metrics) into the bundle folder; the bundle's weights are then those of the fold-0 model.  Checkpoints live in
a work folder (``--work``, default ``<out>-work``); ``--resume`` continues from them, otherwise the old
training files there are deleted first.  Heavy modules (torch) are imported only when a command runs.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shlex
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from .data import Case, read_manifest_csv, split_seed_of
from .splits import segmenter_folds
from .splits import parse_folds, segmenter_split as segmenter_split_of

TASKS = ("segmenter", "malignancy", "risk")
PRESET_NAMES = ("lu2025", "liu2025", "yang2024", "cpu")          # the keys of classifier.PRESETS (checked by a test)
SCORE_COLUMN = {"malignancy": "probability_malignant", "risk": "probability_high_risk"}
DATASET_CITATIONS = {  # dataset column value -> citation (the three datasets of the breast-us manifest)
    "busbra": "BUS-BRA (Gomez-Flores et al., Med Phys 51(4):3110-3123, 2024, doi:10.5281/zenodo.7730709)",
    "breastlesions": "BrEaST-Lesions-USG (Pawlowska et al., Sci Data 11:148, 2024, TCIA doi:10.7937/9WKK-Q141, CC BY 4.0)",
    "busi": "BUSI (Al-Dhabyani et al., Data in Brief 28:104863, 2020, CC0)",
}
TRAINING_FILES = ("checkpoint*.pt", "best*.pt", "history*.json", "crops_*.npz", "fold_result.json", "train_config.json")
IGNORED_ON_RESUME = ("threads", "max_minutes", "device")      # settings that may change between a run and its resumption
Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------- parser
def register(sub) -> None:
    """Add ``train`` to the ``breastdlr`` sub-commands."""
    t = sub.add_parser(
        "train", help="train a segmenter or lesion classifier from a manifest into a model bundle",
        description="Train on a manifest (the breast-us format) with a patient-level split and write a model "
                    "bundle. Research use only.")
    t.add_argument("task", choices=TASKS, help="segmenter (lesion masks), malignancy (benign/malignant) or "
                                                "risk (BI-RADS 2-3 vs 4-5)")
    t.add_argument("--manifest", required=True, help="manifest CSV (paths relative to its folder)")
    t.add_argument("--out", required=True, help="bundle folder to write (replaced if it exists)")
    t.add_argument("--preset", choices=PRESET_NAMES, default=None,
                   help="classifiers: optimiser, learning rate, batch size and epochs of a paper (lu2025, "
                        "liu2025; yang2024 also trains a VGG11 and fits an SVM on its features) or the "
                        "CPU-friendly default (cpu)")
    t.add_argument("--epochs", type=int, help="number of epochs (default: the preset's; segmenter 14)")
    t.add_argument("--batch-size", type=int, help="images per step (default: the preset's; segmenter 16)")
    t.add_argument("--lr", type=float, help="peak learning rate (default: the preset's; segmenter 2e-3)")
    t.add_argument("--folds", type=int, default=5, help="number of patient-level folds (default 5)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--val-fold", type=int, default=0, help="the fold held out for validation (default 0)")
    g.add_argument("--cv", action="store_true", help="train every fold; cv_metrics.json in the bundle; "
                                                     "the bundle's weights are the fold-0 model")
    t.add_argument("--seed", type=int, default=0, help="seed of the split, the weights and the augmentation")
    t.add_argument("--split-seed", type=int, default=None,
                   help="classifiers: seed of the patient split alone (default: --seed); members of an ensemble "
                        "are trained with other --seed values and one --split-seed (scripts/make_ensemble.py)")
    t.add_argument("--size", type=int, help="input size in pixels (default: 128 for the segmenter and the classifiers)")
    t.add_argument("--backbone", choices=("resnet50", "resnet18", "vgg11_bn", "efficientnet-b0"), default=None,
                   help="classifiers: the trunk (default: the preset's; resnet50, vgg11_bn for yang2024; "
                        "efficientnet-b0 with --init-encoder)")
    t.add_argument("--init-encoder", metavar="SEGMENTER", default=None,
                   help="classifiers: start an efficientnet-b0 trunk from the encoder of this segmenter bundle, "
                        "which must have been trained on the same patient split (same --folds, --val-fold and seed)")
    t.add_argument("--box-views", type=int, default=None,
                   help="classifiers: extra training crops per lesion around randomly perturbed lesion boxes, one "
                        "drawn per epoch with the exact crop (default 0); validation stays on exact crops")
    t.add_argument("--box-jitter", type=float, default=None,
                   help="classifiers: how far each box edge may move, as a fraction of the box's side (default 0.2)")
    t.add_argument("--max-minutes", type=float, help="time budget (for --cv shared between the folds)")
    t.add_argument("--max-cases", type=int, help="use at most this many training images (quick trials)")
    t.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where it trains (default auto: a CUDA GPU where torch sees one, else the CPU)")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoints in the work folder")
    t.add_argument("--work", help="work folder for checkpoints (default: <out>-work)")
    t.set_defaults(func=cmd_train)


def cmd_train(a: argparse.Namespace) -> int:
    log: Log = lambda m: print(m, flush=True)  # noqa: E731
    cfg = make_config(a)
    summary = train_bundle(a.task, a.manifest, a.out, cfg, cv=a.cv, work=a.work, resume=a.resume, log=log)
    print(json.dumps(summary, indent=1))
    return 0


def make_config(a: argparse.Namespace):
    """The training function's config from the command line (options the task does not have are refused)."""
    for name, value in (("--folds", a.folds), ("--epochs", a.epochs), ("--batch-size", a.batch_size),
                        ("--size", a.size), ("--max-cases", a.max_cases)):
        if value is not None and value < (2 if name == "--folds" else 1):
            raise InputError(f"{name} must be at least {2 if name == '--folds' else 1}, got {value}.")
    if a.lr is not None and not a.lr > 0:
        raise InputError(f"--lr must be a positive learning rate, got {a.lr}.")
    if a.max_minutes is not None and not a.max_minutes > 0:
        raise InputError(f"--max-minutes must be positive, got {a.max_minutes}.")
    if not 0 <= a.val_fold < a.folds:
        raise InputError(f"--val-fold must be between 0 and {a.folds - 1} (there are {a.folds} folds), got {a.val_fold}.")
    if a.task == "segmenter":
        from .segmenter import SegmenterConfig

        extra = [n for n, v in (("--preset", a.preset), ("--backbone", a.backbone), ("--split-seed", a.split_seed),
                                ("--box-views", a.box_views), ("--box-jitter", a.box_jitter),
                                ("--init-encoder", a.init_encoder)) if v is not None]
        if extra:
            verb = "apply" if len(extra) > 1 else "applies"
            raise InputError(f"{' and '.join(extra)} {verb} to the malignancy and risk classifiers only; the "
                             "segmenter takes --epochs, --batch-size and --lr.")
        base = SegmenterConfig()
        return SegmenterConfig(size=a.size or base.size, epochs=a.epochs or base.epochs,
                               batch_size=a.batch_size or base.batch_size, lr=a.lr or base.lr, folds=a.folds,
                               val_fold=a.val_fold, seed=a.seed, max_train_cases=a.max_cases, threads=a.threads,
                               max_minutes=a.max_minutes, device=a.device)
    from .classifier import ClassifierConfig, PRESETS

    if a.box_views is not None and a.box_views < 0:
        raise InputError(f"--box-views must be 0 or more, got {a.box_views}.")
    if a.box_jitter is not None and not 0 <= a.box_jitter < 0.5:
        raise InputError(f"--box-jitter must be at least 0 and below 0.5 (a fraction of the box's side), got {a.box_jitter}.")
    if a.init_encoder:
        if a.backbone not in (None, "efficientnet-b0"):
            raise InputError(f"--init-encoder starts an efficientnet-b0 trunk (the segmenter's encoder), not a "
                             f"{a.backbone}; leave out --backbone or give efficientnet-b0.")
        if a.cv:
            raise InputError("--init-encoder with --cv: one segmenter has trained on the images of every fold but "
                             "its own held-out one, so the other folds would be measured on patients its encoder "
                             "has seen; train one segmenter per fold and run each fold with --val-fold.")
    preset = a.preset or "cpu"
    base = ClassifierConfig()
    default_backbone = "efficientnet-b0" if a.init_encoder else PRESETS[preset].get("backbone", "resnet50")
    return ClassifierConfig(task=a.task, backbone=a.backbone or default_backbone, init_encoder=a.init_encoder or "",
                            size=a.size or base.size,
                            preset=preset, epochs=a.epochs or PRESETS[preset]["epochs"],
                            batch_size=a.batch_size or PRESETS[preset]["batch_size"], lr=a.lr or PRESETS[preset]["lr"],
                            folds=a.folds, val_fold=a.val_fold, seed=a.seed, split_seed=a.split_seed,
                            max_minutes=a.max_minutes,
                            max_cases=a.max_cases, threads=a.threads, device=a.device,
                            box_views=base.box_views if a.box_views is None else a.box_views,
                            box_jitter=base.box_jitter if a.box_jitter is None else a.box_jitter)


# ---------------------------------------------------------------------------------------------- driver
def train_bundle(task: str, manifest: str | Path, out: str | Path, cfg, *, cv: bool = False,
                 work: Optional[str | Path] = None, resume: bool = False, log: Log = print) -> Dict[str, Any]:
    """Train ``task`` (one held-out fold, or every fold with ``cv``) and write the bundle at ``out``.

    Returns a summary: bundle path, held-out metrics of the bundle's model and, with ``cv``, the
    cross-validation summary (also in ``<out>/cv_metrics.json``).
    """
    if task not in TASKS:
        raise InputError(f"Unknown task '{task}'; choose one of {', '.join(TASKS)}.")
    manifest, out = Path(manifest), Path(out)
    cases = read_manifest_csv(manifest)
    folds = list(range(cfg.folds)) if cv else [cfg.val_fold]
    check_trainable(task, cases, cfg, folds)
    work = Path(work) if work else out.with_name(out.name + "-work")
    fold_dirs = {k: (work / f"fold-{k}") if cv else work for k in folds}
    identity = run_identity(task, manifest, cfg, cv)
    prepare_work(work, fold_dirs.values(), identity, resume, log)
    results: Dict[int, Dict[str, Any]] = {}
    models: Dict[int, Any] = {}
    t0 = time.time()
    for n, k in enumerate(folds):
        fcfg = replace(cfg, val_fold=k)
        if cfg.max_minutes:
            left = cfg.max_minutes - (time.time() - t0) / 60
            fcfg = replace(fcfg, max_minutes=max(left / (len(folds) - n), 0.01))
        if cv:
            log(f"[cv] fold {k + 1}/{len(folds)}")
        share_crop_cache(task, cfg, fold_dirs, k)
        res, model = run_fold(task, manifest, fcfg, fold_dirs[k], resume, log)
        results[k] = res
        if k == folds[0]:
            models[k] = model
        if cv:
            spent = (time.time() - t0) / 60
            log(f"[cv] fold {k + 1}/{len(folds)} done; {spent:.1f} min so far, about "
                f"{spent / (n + 1) * (len(folds) - n - 1):.0f} min left")
    cv_doc = cv_summary(task, results, cases) if cv else None
    bundle = write_bundle(task, manifest, out, cases, results, folds[0], models[folds[0]], cv_doc)
    return {"bundle": str(bundle.path), "task": task, "validation_fold": folds[0],
            "metrics": results[folds[0]]["metrics"],
            "cv": None if cv_doc is None else cv_doc["summary"], "work": str(work)}


def run_identity(task: str, manifest: Path, cfg, cv: bool) -> Dict[str, Any]:
    """What a resumed run must share with the run it resumes (data, task and settings)."""
    conf = {k: v for k, v in asdict(cfg).items() if k not in IGNORED_ON_RESUME and k != "val_fold"}
    if not cv:
        conf["val_fold"] = cfg.val_fold
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    return {"task": task, "cv": cv, "manifest_sha256": digest, "config": conf}


def prepare_work(work: Path, fold_dirs, identity: Dict[str, Any], resume: bool, log: Log) -> None:
    """Check that a resumed work folder belongs to the same run; otherwise clear its training files."""
    stamp = work / "train_config.json"
    if resume and stamp.is_file():
        old = json.loads(stamp.read_text(encoding="utf-8"))
        if old != identity:
            diff = sorted(k for k in set(old.get("config", {})) | set(identity["config"])
                          if old.get("config", {}).get(k) != identity["config"].get(k))
            what = ", ".join(diff) or ", ".join(k for k in ("task", "cv", "manifest_sha256") if old.get(k) != identity[k])
            raise InputError(f"The work folder {work} holds a run with other data or settings (differing: {what}); "
                             "run without --resume to start afresh, or with the same settings to continue.")
        log(f"[train] resuming from {work}")
    elif resume:
        log(f"[train] nothing to resume in {work}; starting afresh")
    if not resume or not stamp.is_file():
        for d in [work, *sorted(work.glob("fold-*"))]:
            clear_training_files(d)
    for d in fold_dirs:
        d.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(identity, indent=1), encoding="utf-8")


def clear_training_files(folder: Path) -> None:
    """Delete the files a training run leaves in ``folder`` (and the folder if that empties it)."""
    if not folder.is_dir():
        return
    for pattern in TRAINING_FILES:
        for f in folder.glob(pattern):
            f.unlink()
    if folder.name.startswith("fold-") and not any(folder.iterdir()):
        folder.rmdir()


def share_crop_cache(task: str, cfg, fold_dirs: Dict[int, Path], k: int) -> None:
    """Classifier crops do not depend on the fold: copy the first fold's cache instead of cutting them again."""
    if task == "segmenter":
        return
    from .classifier import crop_cache_name

    name = crop_cache_name(cfg)
    target = fold_dirs[k] / name
    for d in fold_dirs.values():
        if d != fold_dirs[k] and (d / name).is_file() and not target.is_file():
            shutil.copy2(d / name, target)
            return


# ---------------------------------------------------------------------------------------------- one fold
def run_fold(task: str, manifest: Path, cfg, work: Path, resume: bool, log: Log) -> Tuple[Dict[str, Any], Any]:
    """Train one fold (or reuse its finished result with ``resume``); returns (result, model)."""
    done = work / "fold_result.json"
    if resume and done.is_file():
        res = json.loads(done.read_text(encoding="utf-8"))
        log(f"[train] fold {cfg.val_fold} already finished; reusing its result")
        return res, rebuild_model(task, res["arguments"], work)
    if task == "segmenter":
        from .segmenter import train_segmenter

        raw = train_segmenter(manifest, work, cfg, work_dir=work, log=log)
        res = segmenter_fold_result(raw, manifest, cfg)
    else:
        from .classifier import train_classifier

        raw = single_task(train_classifier(manifest, cfg, work, log=log), task)
        res = classifier_fold_result(raw)
    done.write_text(json.dumps(_plain(res)), encoding="utf-8")
    return json.loads(done.read_text(encoding="utf-8")), raw["model"]


def rebuild_model(task: str, arguments: Dict[str, Any], work: Path):
    """The best weights of a finished fold, in the network they belong to."""
    import torch

    if task == "segmenter":
        from ..networks.segmenter import build_segmenter

        model, best = build_segmenter(**arguments), work / "best.pt"
    else:
        from ..networks.classifiers import build_classifier

        model, best = build_classifier("EmbeddingNet", **arguments), work / f"best_{task}.pt"
    model.load_state_dict(torch.load(best, weights_only=True))
    return model.eval()


def single_task(raw: Dict[str, Any], task: str) -> Dict[str, Any]:
    """``train_classifier``'s result for ``task`` in one flat dict (it nests results per task under "tasks")."""
    if "tasks" not in raw:
        return raw
    return {**raw["tasks"][task], "history": raw["history"], "config": {**raw["config"], "task": task},
            "cases": raw["cases"], "arguments": raw["arguments"]}


def classifier_fold_result(raw: Dict[str, Any]) -> Dict[str, Any]:
    """Numbers of a trained classifier fold (JSON-ready), with its patient split verified."""
    cases: List[Case] = raw["cases"]
    va = set(int(i) for i in raw["val_index"])
    val_cases = [cases[i] for i in sorted(va)]
    train_cases = [c for i, c in enumerate(cases) if i not in va]
    assert_patient_split(train_cases, val_cases, raw["config"]["val_fold"])
    order = sorted(va)
    probs = dict(zip(map(int, raw["val_index"]), map(float, raw["val_probs"])))
    return {"metrics": raw["metrics"], "history": raw["history"], "config": raw["config"],
            "arguments": raw["arguments"], "n_train": int(raw["n_train"]),
            "n_train_patients": len({c.patient_id for c in train_cases}),
            "val_case_ids": [cases[i].case_id for i in order], "val_labels": [int(raw["labels"][i]) for i in order],
            "val_probs": [probs[i] for i in order], "val_datasets": [cases[i].dataset for i in order]}


def segmenter_split(manifest: Path, cfg) -> Tuple[List[Case], List[Case]]:
    """The training and validation images of ``train_segmenter`` for ``cfg`` (same filter, folds and caps)."""
    tr, va = segmenter_split_of(read_manifest_csv(manifest), cfg.folds, cfg.seed, cfg.val_fold, cfg.split,
                                train_folds=parse_folds(cfg.train_folds, cfg.folds, cfg.val_fold))
    if cfg.max_train_cases:
        tr, va = tr[: cfg.max_train_cases], va[: max(8, cfg.max_train_cases // 4)]
    return tr, va


def segmenter_fold_result(raw: Dict[str, Any], manifest: Path, cfg) -> Dict[str, Any]:
    """Numbers of a trained segmenter fold: per-image validation Dice of its best model (fp32)."""
    from .segmenter import dice_scores, load_arrays, predict_masks

    tr, va = segmenter_split(manifest, cfg)
    if len(va) != raw["metrics"]["val_images"] or len(tr) != raw["n_train"]:
        raise RuntimeError("the validation images could not be matched to the segmenter's split")
    assert_patient_split(tr, va, cfg.val_fold)
    x, y = load_arrays(va, cfg.size)
    dice = dice_scores(predict_masks(raw["model"], x, cfg.size, False), y)
    metrics = dict(raw["metrics"])
    metrics["validation"] = f"one patient-level fold of {cfg.folds} (stratified by dataset and pathology)"
    return {"metrics": metrics, "history": raw["history"], "config": raw["config"], "arguments": raw["arguments"],
            "n_train": int(raw["n_train"]), "n_train_patients": len({c.patient_id for c in tr}),
            "val_case_ids": [c.case_id for c in va], "val_dice": [float(d) for d in dice],
            "val_has_lesion": [bool(m.any()) for m in y], "val_datasets": [c.dataset for c in va]}


def assert_patient_split(train: Sequence[Case], val: Sequence[Case], fold: int) -> None:
    """Refuse a split with a patient on both sides (raised even under ``python -O``)."""
    both = {c.patient_id for c in train} & {c.patient_id for c in val}
    if both:
        raise RuntimeError(f"fold {fold}: {len(both)} patient(s) on both sides of the split")


# ---------------------------------------------------------------------------------------------- checks
def check_trainable(task: str, cases: List[Case], cfg, val_folds: Sequence[int]) -> None:
    """Clear errors, before any training, for data that cannot train ``task`` with ``cfg``'s folds."""
    if task == "segmenter":
        usable = [c for c in cases if c.label in ("benign", "malignant", "normal")]
        if not any(c.mask is not None and c.mask.is_file() for c in usable):
            raise InputError("No image of the manifest has a lesion mask file; the segmenter needs masks "
                             "(the 'mask' column) and a label of benign, malignant or normal.")
        groups = {f"{c.dataset}/{c.patient_id}" for c in usable}
        if len(groups) < cfg.folds:
            raise InputError(f"The manifest has {len(groups)} patients, fewer than the {cfg.folds} folds; use --folds "
                             f"{max(2, len(groups))} or more data.")
        usable, folds = segmenter_folds(cases, cfg.folds, cfg.seed, cfg.split)
        for k in val_folds:
            if not any(f == k and c.label != "normal" and c.mask is not None and c.mask.is_file()
                       for c, f in zip(usable, folds)):
                raise InputError(f"With {cfg.folds} folds, fold {k} would hold out no image with a lesion, so the "
                                 "segmenter could not be validated; use fewer folds (--folds) or more data.")
        return
    from .classifier import classifier_folds, label_of

    usable = [c for c in cases if label_of(c, task) is not None and c.mask is not None and c.mask.is_file()]
    if cfg.max_cases:
        usable = usable[: cfg.max_cases]
    column = "label (benign/malignant)" if task == "malignancy" else "birads (2, 3, 4, 4a-4c, 5)"
    labels = np.array([label_of(c, task) for c in usable])
    if labels.size == 0 or labels.min() == labels.max():
        raise InputError(f"The {task} classifier needs images of both classes in the column {column}, each with a "
                         f"lesion mask; the manifest has {int(labels.sum())} positive and {int((labels == 0).sum())} "
                         "negative usable images.")
    folds = classifier_folds(usable, (task,), cfg.folds, split_seed_of(cfg))
    for k in val_folds:
        if len(set(labels[folds == k].tolist())) < 2:
            raise InputError(f"With {cfg.folds} folds, fold {k} would hold out no image of one class; use fewer "
                             "folds (--folds) or more data.")


# ---------------------------------------------------------------------------------------------- CV summary
def cv_summary(task: str, results: Dict[int, Dict[str, Any]], cases: Sequence[Case]) -> Dict[str, Any]:
    """Per-fold and pooled out-of-fold metrics; verifies that no patient's images lie in two folds."""
    patient = {c.case_id: c.patient_id for c in cases}
    fold_of_patient: Dict[str, int] = {}
    seen: set = set()
    for k, r in results.items():
        for cid in r["val_case_ids"]:
            if cid in seen:
                raise RuntimeError(f"image {cid} is in the validation set of two folds")
            seen.add(cid)
            p = patient[cid]
            if fold_of_patient.setdefault(p, k) != k:
                raise RuntimeError("a patient's images were validated in two different folds")
    folds = []
    for k in sorted(results):
        r = results[k]
        entry = {"fold": k, "n_val": len(r["val_case_ids"]), "n_val_patients": len({patient[c] for c in r["val_case_ids"]}),
                 "n_train": r["n_train"], "n_train_patients": r["n_train_patients"],
                 "best_epoch": r["metrics"]["best_epoch"], "epochs_run": r["metrics"]["epochs_run"],
                 "val_case_ids": r["val_case_ids"]}
        if task == "segmenter":
            d, les = np.array(r["val_dice"]), np.array(r["val_has_lesion"], dtype=bool)
            entry["dice_mean_lesion_images"] = float(d[les].mean()) if les.any() else None
        else:
            entry.update(auc=r["metrics"]["auc"], auc_ci95=r["metrics"]["auc_ci95"],
                         n_val_positive=int(sum(r["val_labels"])))
        folds.append(entry)
    some = next(iter(results.values()))["config"]
    cap = some.get("max_cases") or some.get("max_train_cases")
    summary: Dict[str, Any] = {"folds": len(folds), "patient_overlap": 0, "n_val_images": len(seen),
                               "max_cases": cap, "final_model": "the bundle's weights are the fold-0 model"}
    if task == "segmenter":
        summary.update(_dice_summary(folds, results))
    else:
        summary.update(_auc_summary(folds, results))
    return {"format": "breastdlr-cv/1", "task": task, "summary": summary, "per_fold": folds}


def _mean_sd(values: Sequence[Optional[float]]) -> Dict[str, Any]:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    return {"mean": float(v.mean()) if v.size else None, "sd": float(v.std(ddof=1)) if v.size > 1 else None,
            "n_folds": int(v.size)}


def _dice_summary(folds, results) -> Dict[str, Any]:
    d = np.concatenate([np.array(r["val_dice"]) for r in results.values()])
    les = np.concatenate([np.array(r["val_has_lesion"], dtype=bool) for r in results.values()])
    ds = np.concatenate([np.array(r["val_datasets"], dtype=object) for r in results.values()])
    by_ds = {str(name): float(d[les & (ds == name)].mean()) for name in sorted(set(ds.tolist())) if (les & (ds == name)).any()}
    return {"dice_mean_lesion_images": _mean_sd([f["dice_mean_lesion_images"] for f in folds]),
            "pooled_out_of_fold": {"dice_mean_lesion_images": float(d[les].mean()) if les.any() else None,
                                   "dice_median_lesion_images": float(np.median(d[les])) if les.any() else None,
                                   "n_lesion_images": int(les.sum()), "n_images": int(d.size),
                                   "dice_mean_by_dataset": by_ds}}


def _auc_summary(folds, results) -> Dict[str, Any]:
    from ..evaluation import EvaluationInputError, roc_auc

    y = np.concatenate([np.array(r["val_labels"], dtype=int) for r in results.values()])
    p = np.concatenate([np.array(r["val_probs"], dtype=float) for r in results.values()])
    pooled: Dict[str, Any] = {"n": int(y.size), "n_positive": int(y.sum())}
    try:
        a = roc_auc(y, p)
        pooled.update(auc=a.auc, auc_ci95=[a.ci_low, a.ci_high], ci_method="DeLong")
    except EvaluationInputError:
        pooled.update(auc=None, auc_ci95=[None, None], ci_method="DeLong")
    return {"auc": _mean_sd([f["auc"] for f in folds]), "pooled_out_of_fold": pooled}


# ---------------------------------------------------------------------------------------------- bundle
def write_bundle(task: str, manifest: Path, out: Path, cases: Sequence[Case], results: Dict[int, Dict[str, Any]],
                 final_fold: int, model, cv_doc: Optional[Dict[str, Any]]):
    """Save the bundle (fp16 weights, manifest and card from :mod:`.cards`) and its validation predictions.

    Besides the bundle's files the folder gets ``validation_predictions.csv`` (classifiers: the held-out
    fold's probabilities, in the PREDICTIONS.csv columns) and with ``--cv`` ``cv_metrics.json`` and
    ``cv_predictions.csv`` (every fold's held-out probabilities).
    """
    from ..bundles import save_bundle
    from .cards import classifier_manifest_and_card, segmenter_manifest_and_card

    res = results[final_fold]
    build = segmenter_manifest_and_card if task == "segmenter" else classifier_manifest_and_card
    man, card = build(res, manifest)
    command = command_line(task, manifest, out, res["config"], cv_doc is not None)
    data = describe_data(manifest, cases)
    card = adapt_card(card, res, data, man["provenance"]["command"], command, cv_doc)
    man["default"] = False   # a researcher's model: pass it with --model; the shipped models stay the defaults
    man["provenance"] = dict(man["provenance"], data=data, command=command,
                             split=f"patient-level stratified group {res['config']['folds']}-fold, seed "
                                   f"{split_seed_of(res['config'])}, validation fold {final_fold}")
    man["metrics"] = _plain(man["metrics"], nan_to_none=True)
    if cv_doc is not None:
        man["metrics"]["cross_validation"] = _plain(cv_doc["summary"], nan_to_none=True)
    bundle = save_bundle(out, model, man, card, half=True)
    extra: Dict[str, str] = {}
    if task != "segmenter":
        extra["validation_predictions.csv"] = predictions_csv(task, {final_fold: res})
    if cv_doc is not None:
        extra["cv_metrics.json"] = json.dumps(_plain(cv_doc, nan_to_none=True), indent=1, allow_nan=False) + "\n"
        if task != "segmenter":
            extra["cv_predictions.csv"] = predictions_csv(task, results)
    for name, text in extra.items():
        (bundle.path / name).write_text(text, encoding="utf-8")
    return bundle


def predictions_csv(task: str, results: Dict[int, Dict[str, Any]]) -> str:
    """Held-out probabilities as CSV text with the columns of ``breastdlr predict`` (+ ``fold``)."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", SCORE_COLUMN[task], "fold", "error"])
    for k in sorted(results):
        for cid, p in zip(results[k]["val_case_ids"], results[k]["val_probs"]):
            w.writerow([cid, f"{p:.6f}", k, ""])
    return buf.getvalue()


def command_line(task: str, manifest: Path, out: Path, config: Dict[str, Any], cv: bool) -> str:
    """The ``breastdlr train`` command that reproduces this run (file names only, no local paths)."""
    args = ["breastdlr", "train", task, "--manifest", manifest.name, "--out", out.name]
    if task != "segmenter":
        args += ["--preset", config["preset"], "--backbone", config["backbone"]]
        if config.get("init_encoder"):
            args += ["--init-encoder", Path(config["init_encoder"]).name]
    args += ["--epochs", config["epochs"], "--batch-size", config["batch_size"], "--lr", config["lr"],
             "--size", config["size"], "--folds", config["folds"], "--seed", config["seed"]]
    if config.get("split_seed") is not None:
        args += ["--split-seed", config["split_seed"]]
    args += ["--cv"] if cv else ["--val-fold", config["val_fold"]]
    if config.get("box_views"):
        args += ["--box-views", config["box_views"], "--box-jitter", config.get("box_jitter", 0.2)]
    cap = config.get("max_cases") or config.get("max_train_cases")
    if cap:
        args += ["--max-cases", cap]
    return shlex.join(str(x) for x in args)


def describe_data(manifest: Path, cases: Sequence[Case]) -> str:
    """The manifest's images per dataset, with the citations of the datasets BreastDLR knows."""
    counts: Dict[str, int] = {}
    for c in cases:
        counts[c.dataset or "unnamed"] = counts.get(c.dataset or "unnamed", 0) + 1
    listing = ", ".join(f"{name} ({n} images)" for name, n in sorted(counts.items()))
    cites = [DATASET_CITATIONS[d] for d in sorted(counts) if d in DATASET_CITATIONS]
    unknown = [d for d in sorted(counts) if d not in DATASET_CITATIONS]
    text = f"{manifest.name}: {listing}"
    if cites:
        text += "; sources: " + "; ".join(cites)
    if unknown:
        text += f"; {', '.join(unknown)}: not a dataset BreastDLR knows (cite its source)"
    return text


def adapt_card(card: str, res: Dict[str, Any], data: str, old_command: str, command: str,
               cv_doc: Optional[Dict[str, Any]]) -> str:
    """The card of :mod:`.cards` made true for this run (data, command, folds, backbone) plus a run section."""
    from .cards import DATA_CITATION

    cfg = res["config"]
    card = card.replace(DATA_CITATION, data).replace(old_command, command)
    card = card.replace("one fold of a 5-fold", f"one fold of a {cfg['folds']}-fold")
    if cfg.get("backbone"):
        card = card.replace("about two thousand images", f"{res['n_train']} images")
    lines = ["", "## Training run (`breastdlr train`)", "",
             f"- Command: `{command}`", f"- Data: {data}",
             f"- Split: patient-level stratified group {cfg['folds']}-fold (seed {split_seed_of(cfg)}); validation fold "
             f"{cfg['val_fold']}; no patient has images on both sides.",
             f"- Training images: {res['n_train']} ({res['n_train_patients']} patients); validation images: "
             f"{len(res['val_case_ids'])}."]
    if cv_doc is not None:
        s = cv_doc["summary"]
        if "auc" in s:
            m, pooled = s["auc"], s["pooled_out_of_fold"]
            lines.append(f"- Cross-validation ({s['folds']} folds): AUC {_fmt(m['mean'])} +/- {_fmt(m['sd'])} (mean +/- sd "
                         f"over folds); pooled out-of-fold AUC {_fmt(pooled['auc'])} (95 % CI {_fmt(pooled['auc_ci95'][0])}"
                         f"-{_fmt(pooled['auc_ci95'][1])}, DeLong; {pooled['n']} images).")
        else:
            m, pooled = s["dice_mean_lesion_images"], s["pooled_out_of_fold"]
            lines.append(f"- Cross-validation ({s['folds']} folds): mean Dice on lesion images {_fmt(m['mean'])} +/- "
                         f"{_fmt(m['sd'])} (mean +/- sd over folds); pooled out-of-fold "
                         f"{_fmt(pooled['dice_mean_lesion_images'])} "
                         f"({pooled['n_lesion_images']} images).")
        lines.append("- The weights of this bundle are the fold-0 model; the other folds' models only measure "
                     "the variability (see cv_metrics.json).")
    return card.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _plain(obj: Any, nan_to_none: bool = False) -> Any:
    """Plain JSON types (numpy scalars and arrays converted); NaN/inf become None when asked."""
    if isinstance(obj, dict):
        return {str(k): _plain(v, nan_to_none) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v, nan_to_none) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if nan_to_none and not np.isfinite(v) else v
    if isinstance(obj, (np.str_, str)):
        return str(obj)
    return obj
