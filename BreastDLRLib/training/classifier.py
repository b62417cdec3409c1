"""Train the 2D lesion classifiers (malignancy "BM", BI-RADS risk "LH") on lesion crops from a manifest.

Crops are cut by the product's own :func:`BreastDLRLib.planes.crop_planes` around the ground-truth lesion's
bounding box (the same function cuts them around predicted lesions at inference).  Patient-level stratified
k-fold split, MONAI augmentation, class-balanced cross-entropy, the paper's optimiser as a preset, best
validation AUC kept, checkpoints every epoch and resume, early stopping, fixed seeds.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..networks.classifiers import build_classifier
from ..progress import step_bar
from .augment import ultrasound_augmenter
from .devices import device_of, training_device
from .data import Case, patient_folds, read_manifest_csv, split_seed_of

PRESETS: Dict[str, Dict] = {
    # Lu et al. 2025: Adam, batch 16, up to 100 epochs, the best validation AUC kept
    "lu2025": {"optimizer": "adam", "lr": 1e-4, "batch_size": 16, "epochs": 100},
    # Liu et al. 2025 (ABVS three-plane): SGD with momentum, lr 1e-3, batch 64
    "liu2025": {"optimizer": "sgd", "lr": 1e-3, "batch_size": 64, "epochs": 100, "momentum": 0.9},
    # Yang et al. 2024 (CLDLR): VGG11 deep features, then a support vector machine on them.  The VGG11 (with batch
    # norm, trained from scratch: no ImageNet weights here) is trained end to end first; a linear SVM is then fitted
    # on its 128-d embeddings of the training crops and folded into the last layer (see fit_svm_head).
    "yang2024": {"optimizer": "sgd", "lr": 1e-2, "batch_size": 32, "epochs": 30, "momentum": 0.9,
                 "backbone": "vgg11_bn", "head": "svm"},
    # CPU-friendly default used for the shipped models (documented in their cards)
    "cpu": {"optimizer": "adamw", "lr": 1e-3, "batch_size": 32, "epochs": 14},
}


@dataclass
class ClassifierConfig:
    task: str = "malignancy"            # "malignancy" (benign/malignant) or "risk" (BI-RADS 2-3 vs 4-5)
    backbone: str = ""                  # "": the preset's (resnet50, vgg11_bn for yang2024)
    size: int = 128
    margin: float = 0.3
    margin_of: str = "longer"           # the shipped 2D models were trained this way (see planes.crop_planes)
    preset: str = "cpu"
    epochs: int = 0                     # 0: the preset's
    batch_size: int = 0
    lr: float = 0.0
    weight_decay: float = 1e-4
    folds: int = 5
    val_fold: int = 0
    seed: int = 0                       # initial weights and augmentation (and the split, unless split_seed is set)
    split_seed: Optional[int] = None    # the patient split's seed, to train ensemble members on one split
    patience: int = 5
    max_minutes: Optional[float] = None
    max_cases: Optional[int] = None
    threads: int = 0
    bf16: bool = True
    box_views: int = 0                  # extra training crops per lesion around jittered boxes (see jittered_boxes)
    box_jitter: float = 0.2             # how far each box edge may move, as a fraction of the box's side
    init: str = ""                      # start from trained bundles (comma-separated, one per task) instead of scratch
    init_encoder: str = ""              # start an efficientnet-b0 trunk from a trained segmenter bundle's encoder
    segmenter_views: str = ""           # .npz of training crops cut around out-of-fold segmenter outlines (see
                                        # scripts/segmenter_views.py): one more view per lesion, drawn like box views
    device: str = "auto"                # "auto": a CUDA GPU where torch sees one, else the CPU; or "cpu" / "cuda"


TASK_NAMES = ("malignancy", "risk")


def tasks_of(task: str) -> Tuple[str, ...]:
    """``"both"`` trains malignancy and risk heads on one shared trunk (half the CPU of two runs)."""
    if task == "both":
        return TASK_NAMES
    if task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; use malignancy, risk or both")
    return (task,)


def preset_backbone(cfg: ClassifierConfig) -> str:
    """The trunk of a run: the config's, else its preset's, else ResNet50."""
    return cfg.backbone or PRESETS[cfg.preset].get("backbone", "resnet50")


def classifier_folds(cases: List[Case], tasks: Tuple[str, ...], k: int, split_seed: int) -> np.ndarray:
    """The classifiers' patient-level folds: stratified by pathology when malignancy is among the tasks, else by
    BI-RADS (the one split every training run, check and re-measurement uses)."""
    return patient_folds(cases, k, split_seed, stratify="label" if "malignancy" in tasks else "birads")


def label_of(case: Case, task: str) -> Optional[int]:
    return case.malignant if task == "malignancy" else case.high_risk


def jittered_boxes(bbox_kji, shape_kji, n: int, jitter: float, rng: np.random.Generator) -> List[np.ndarray]:
    """``n`` perturbed copies of a 2D lesion box: each in-plane edge moves by up to ``jitter`` × the box's side on
    that axis (uniform), clipped to the image and never empty.  They stand for the segmenter's boxes, which are
    seldom the reader's to the pixel, so that a classifier trained on them meets such crops before inference does."""
    b = np.asarray(bbox_kji, dtype=float).reshape(3, 2)
    out = []
    for _ in range(n):
        j = b.copy()
        for ax in (1, 2):
            side = b[ax, 1] - b[ax, 0]
            lo, hi = b[ax] + rng.uniform(-jitter, jitter, 2) * side
            lo, hi = int(np.clip(np.floor(lo + 0.5), 0, shape_kji[ax] - 1)), int(np.clip(np.floor(hi + 0.5), 1, shape_kji[ax]))
            j[ax] = (lo, max(hi, lo + 1))
        out.append(j.astype(int))
    return out


def lesion_crops(case: Case, size: int, margin: float, margin_of: str = "longer", box_views: int = 0,
                 box_jitter: float = 0.2, seed: int = 0) -> Optional[np.ndarray]:
    """Transverse crops (1 + box_views, size, size; float32 in [0, 1]) around the largest ground-truth lesion: the
    exact box first, then ``box_views`` jittered boxes (:func:`jittered_boxes`, seeded by ``seed`` and the case);
    None without a usable mask."""
    import zlib

    from ..io import read_mask, read_volume
    from ..lesions import lesions_from_labels
    from ..planes import crop_planes

    sp = case.row.get("pixel_spacing_mm") or None
    vol = read_volume(case.image, spacing=float(sp) if sp else None)
    if case.mask is None or not case.mask.is_file():
        return None
    mask = read_mask(case.mask, like=vol)
    if not mask.any():
        return None
    from scipy import ndimage

    lab, n = ndimage.label(mask > 0)
    if n > 1:  # keep the largest component as "the" lesion
        sizes = np.bincount(lab.ravel())[1:]
        lab = (lab == 1 + int(np.argmax(sizes))).astype(np.uint8)
    (les,) = lesions_from_labels(vol.with_array(lab.astype(np.uint8)))
    rng = np.random.default_rng([seed, zlib.crc32(case.case_id.encode())])
    boxes = [np.asarray(les.bbox_kji)] + jittered_boxes(les.bbox_kji, vol.shape, box_views, box_jitter, rng)
    return np.stack([crop_planes(vol, b, les.centre_kji, size=size, margin=margin, margin_of=margin_of,
                                 planes=("transverse",))["transverse"][0].image.astype(np.float32) for b in boxes])


def lesion_crop(case: Case, size: int, margin: float, margin_of: str = "longer") -> Optional[np.ndarray]:
    """The transverse crop (size², float32 in [0, 1]) around the largest ground-truth lesion, or None."""
    crops = lesion_crops(case, size, margin, margin_of)
    return None if crops is None else crops[0]


def build_crops(cases: List[Case], task: str, size: int, margin: float, margin_of: str = "longer",
                cache: Optional[Path] = None, log: Callable[[str], None] = print, box_views: int = 0,
                box_jitter: float = 0.2, seed: int = 0) -> Tuple[np.ndarray, np.ndarray, List[Case]]:
    """Crops and labels of every usable case (cached as .npz of arrays: no pickle).

    Without box views the crops are (N, H, W); with ``box_views`` V they are (N, 1 + V, H, W), the exact crop
    first (see :func:`lesion_crops`)."""
    if cache is not None and cache.is_file():
        z = np.load(cache, allow_pickle=False)
        ids = list(z["case_id"])
        by_id = {c.case_id: c for c in cases}
        kept = [by_id[i] for i in ids if i in by_id]
        if len(kept) == len(ids):
            y = np.array([[-1 if label_of(c, t) is None else label_of(c, t) for t in tasks_of(task)] for c in kept])
            return z["x"], y.astype(np.int64), kept
    xs, ys, kept = [], [], []
    t0 = time.time()
    for n, c in enumerate(cases):
        y = [label_of(c, t) for t in tasks_of(task)]
        if all(v is None for v in y):
            continue
        crops = lesion_crops(c, size, margin, margin_of, box_views, box_jitter, seed)
        if crops is None:
            continue
        xs.append(((crops if box_views else crops[0]) * 255).astype(np.uint8))
        ys.append([-1 if v is None else v for v in y])
        kept.append(c)
        if n % 500 == 0:
            log(f"[crops] {n}/{len(cases)} ({time.time() - t0:.0f} s)")
    x, y = np.stack(xs), np.asarray(ys, dtype=np.int64).reshape(len(ys), -1)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, x=x, y=y, case_id=np.array([c.case_id for c in kept]))
    return x, y, kept


def add_segmenter_views(views: np.ndarray, cases: List[Case], cfg: ClassifierConfig,
                        log: Callable[[str], None] = print) -> np.ndarray:
    """``views`` (N, 1 + V, H, W) with the crops of ``cfg.segmenter_views`` appended as further views.

    The file (written by scripts/segmenter_views.py) holds, per case id, crops cut as ``predict`` cuts them around
    an outline from a segmenter that never trained on that patient.  A case it does not list (the validation fold,
    or an image it could not read) repeats its exact crop, so every lesion keeps the same number of views."""
    path = Path(cfg.segmenter_views)
    if not path.is_file():
        raise InputError(f"The segmenter views file {path} does not exist; write it with scripts/segmenter_views.py.")
    z = np.load(path, allow_pickle=False)
    for key in ("case_id", "x", "size", "margin", "margin_of"):
        if key not in z.files:
            raise InputError(f"{path.name} is not a segmenter views file (it has no {key!r}).")
    if (int(z["size"]), float(z["margin"]), str(z["margin_of"])) != (cfg.size, cfg.margin, cfg.margin_of):
        raise InputError(f"{path.name} holds {int(z['size'])} px crops with margin {float(z['margin']):g} of the "
                         f"{z['margin_of']} side; this training cuts {cfg.size} px with margin {cfg.margin:g} of the "
                         f"{cfg.margin_of} side. Write the views again with the same settings.")
    extra = z["x"]
    if extra.ndim != 4 or extra.shape[2:] != views.shape[2:]:
        raise InputError(f"{path.name} holds crops of shape {extra.shape[1:]}, not (V, {views.shape[2]}, {views.shape[3]}).")
    row = {str(c): i for i, c in enumerate(z["case_id"])}
    out = np.concatenate([views, np.repeat(views[:, :1], extra.shape[1], axis=1)], axis=1)
    n = 0
    for i, c in enumerate(cases):
        j = row.get(c.case_id)
        if j is not None:
            out[i, views.shape[1]:] = extra[j]
            n += 1
    log(f"[train] segmenter views: {n} of {len(cases)} lesions get {extra.shape[1]} crop(s) from {path.name}")
    return out


def crop_cache_name(cfg: ClassifierConfig) -> str:
    """The crop cache of a run in its work folder (exact crops only, or with the box views of its seed)."""
    views = f"_views{cfg.box_views}_j{cfg.box_jitter:g}_s{cfg.seed}" if cfg.box_views else ""
    return f"crops_{cfg.task}_{cfg.size}_{cfg.margin_of}{views}.npz"


def init_from_bundles(model, bundles: List[str], tasks: Tuple[str, ...], log: Callable[[str], None] = print) -> None:
    """Load trained single-task bundles into a (multi-task) EmbeddingNet: the trunk and embedding from the first,
    each task's classifier rows from its own bundle.  Bundles that do not share that trunk are refused (they would
    not be one network), as are bundles of another architecture, input or task count."""
    from ..bundles import open_bundle

    if len(bundles) != len(tasks):
        raise ValueError(f"--init needs one bundle per task ({', '.join(tasks)}), got {len(bundles)}")
    state = model.state_dict()
    trunk = None
    for t, path in enumerate(bundles):
        b = open_bundle(path)
        want = {"backbone": model.backbone, "embedding_dim": model.embedding_dim}
        got = {k: b.manifest.get("arguments", {}).get(k) for k in want}
        if b.manifest.get("architecture") != "EmbeddingNet" or got != want:
            raise ValueError(f"--init {path}: an {b.manifest.get('architecture')} {got}, not an EmbeddingNet {want}")
        sd = {k: v.float() for k, v in b.model("cpu").state_dict().items()}
        body = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
        if trunk is None:
            trunk = body
        elif any(not torch.equal(trunk[k], body[k]) for k in trunk if k in body and body[k].is_floating_point()):
            raise ValueError(f"--init {path}: its trunk is not that of {bundles[0]}; the tasks cannot share it")
        state["classifier.weight"][2 * t:2 * t + 2] = sd["classifier.weight"]
        state["classifier.bias"][2 * t:2 * t + 2] = sd["classifier.bias"]
        log(f"[train] {tasks[t]} head initialised from {b.manifest.get('name')} ({path})")
    state.update(trunk)
    model.load_state_dict(state)


def init_from_segmenter(model, bundle: str, cfg: ClassifierConfig, manifest: str | Path, val_cases: List[Case],
                        log: Callable[[str], None] = print) -> None:
    """Start an EmbeddingNet's efficientnet-b0 trunk from the encoder of a trained segmenter bundle (checked by
    its checksum).  The segmenter must not have seen the classifier's validation patients: it must have been
    trained on the shared patient split with the same folds, held-out fold and seed, as the shipped one was, and
    its training images of ``manifest`` (cut again from that split) must hold none of ``val_cases``' patients
    (a single-task classifier deals its own cases into folds and can differ).  Any other segmenter is refused."""
    from ..bundles import open_bundle
    from .splits import segmenter_split

    b = open_bundle(bundle)
    enc = b.manifest.get("arguments", {}).get("encoder_name")
    if b.manifest.get("architecture") != "Unet" or enc != model.backbone:
        raise InputError(f"--init-encoder {bundle}: a {b.manifest.get('architecture')} with encoder {enc}, not a "
                         f"segmenter with the {model.backbone} encoder of this classifier (--backbone {model.backbone})")
    sc = (b.manifest.get("provenance") or {}).get("config") or {}
    want = {"split": "shared", "folds": cfg.folds, "val_fold": cfg.val_fold, "seed": split_seed_of(cfg)}
    got = {k: sc.get(k) for k in want}
    if got != want:
        raise InputError(f"--init-encoder {bundle}: the segmenter was trained on another patient split ({got}) than "
                         f"this classifier's ({want}), so its encoder may have seen the validation patients; train "
                         "the segmenter on the same split first")
    seg_train, _ = segmenter_split(read_manifest_csv(manifest), cfg.folds, split_seed_of(cfg), cfg.val_fold)
    seen = {f"{c.dataset}/{c.patient_id}" for c in seg_train} & {f"{c.dataset}/{c.patient_id}" for c in val_cases}
    if seen:
        raise InputError(f"--init-encoder {bundle}: the segmenter trained on {len(seen)} of this classifier's "
                         f"validation patients (e.g. {sorted(seen)[0]}): their patient folds differ (train the "
                         "classifiers with --task both, as the segmenter's split is theirs, or train a segmenter "
                         "on this split)")
    try:
        n = model.trunk.load_segmenter_encoder({k: v.float() for k, v in b.model("cpu").state_dict().items()})
    except ValueError as exc:
        raise InputError(f"--init-encoder {bundle}: {exc}") from None
    log(f"[train] trunk initialised from the encoder of {b.manifest.get('name')} ({n} tensors)")


def augmenter(seed: int):
    """The classifiers' augmentation (crops only)."""
    return ultrasound_augmenter(seed, with_mask=False, affine_prob=0.8, scale=0.2, translate=10)


def _to_input(x_uint8: np.ndarray, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    x = torch.from_numpy(x_uint8).to(device).float().div_(255.0).unsqueeze(1)
    return x.repeat(1, 3, 1, 1).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def _batched(fn, x: np.ndarray, bf16: bool, batch: int, device: torch.device = torch.device("cpu")) -> np.ndarray:
    """``fn`` (a network call on ``device``, float32 output) over uint8 crops in batches, rows concatenated."""
    out = []
    for s in range(0, len(x), batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(fn(_to_input(x[s:s + batch], device)).float().cpu())
    return torch.cat(out).numpy()


def predict_probs(model, x: np.ndarray, bf16: bool, batch: int = 64) -> np.ndarray:
    """(N, T) positive-class probabilities, one column per task (logits come in pairs)."""
    model.eval()
    logits = torch.from_numpy(_batched(model, x, bf16, batch, device_of(model)))
    return torch.softmax(logits.view(len(logits), -1, 2), 2)[..., 1].numpy()


def task_model(model, t: int):
    """The single-task EmbeddingNet (2 outputs) for task column ``t`` of a multi-task model."""
    import copy

    single = build_classifier("EmbeddingNet", backbone=model.backbone, embedding_dim=model.embedding_dim,
                              num_classes=2, dropout=model.dropout_p)
    state = copy.deepcopy(model.state_dict())
    state["classifier.weight"] = state["classifier.weight"][2 * t:2 * t + 2].clone()
    state["classifier.bias"] = state["classifier.bias"][2 * t:2 * t + 2].clone()
    single.load_state_dict(state)
    return single.eval()


def train_classifier(manifest: str | Path, cfg: ClassifierConfig, work_dir: str | Path,
                     log: Callable[[str], None] = print) -> Dict:
    from ..evaluation import roc_auc

    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    preset = dict(PRESETS[cfg.preset])
    backbone = preset_backbone(cfg)
    epochs = cfg.epochs or preset["epochs"]
    bs = cfg.batch_size or preset["batch_size"]
    lr = cfg.lr or preset["lr"]
    torch.manual_seed(cfg.seed)
    device, bf16, trained_on = training_device(cfg.device, cfg.bf16, log)
    cfg = replace(cfg, bf16=bf16)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tasks = tasks_of(cfg.task)
    cases = [c for c in read_manifest_csv(manifest) if any(label_of(c, t) is not None for t in tasks)]
    if cfg.max_cases:  # an evenly spread subset (manifests are often sorted by label)
        cases = cases[:: max(1, len(cases) // cfg.max_cases)][: cfg.max_cases]
    if cfg.box_views < 0 or not 0 <= cfg.box_jitter < 0.5:
        raise ValueError("box_views must be >= 0 and box_jitter in [0, 0.5)")
    x, y, cases = build_crops(cases, cfg.task, cfg.size, cfg.margin, cfg.margin_of,
                              cache=work / crop_cache_name(cfg), log=log,
                              box_views=cfg.box_views, box_jitter=cfg.box_jitter, seed=cfg.seed)
    views = x if cfg.box_views else x[:, None]           # (N, 1 + V, H, W); view 0 is the exact crop
    if cfg.segmenter_views:
        views = add_segmenter_views(views, cases, cfg, log)
    x = views[:, 0]
    folds = classifier_folds(cases, tasks, cfg.folds, split_seed_of(cfg))
    tr, va = np.where(folds != cfg.val_fold)[0], np.where(folds == cfg.val_fold)[0]
    assert not ({cases[i].patient_id for i in tr} & {cases[i].patient_id for i in va}), "patient on both sides"
    for t, name in enumerate(tasks):
        ytr, yva = y[tr, t], y[va, t]
        log(f"[train] {name}: {int((ytr >= 0).sum())} training, {int((yva >= 0).sum())} validation crops; "
            f"positives {ytr[ytr >= 0].mean():.2f} / {yva[yva >= 0].mean():.2f}")
    model = build_classifier("EmbeddingNet", backbone=backbone, embedding_dim=128, num_classes=2 * len(tasks), dropout=0.2)
    if cfg.init and cfg.init_encoder:
        raise InputError("--init and --init-encoder both set the trunk; give one of them.")
    if cfg.init:
        init_from_bundles(model, [b for b in cfg.init.split(",") if b], tasks, log)
    if cfg.init_encoder:
        init_from_segmenter(model, cfg.init_encoder, cfg, manifest, [cases[i] for i in va], log)
    model = model.to(device, memory_format=torch.channels_last)
    if preset["optimizer"] == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=preset.get("momentum", 0.9), weight_decay=cfg.weight_decay)
    elif preset["optimizer"] == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=max(cfg.weight_decay, 1e-2))
    steps = epochs * math.ceil(len(tr) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    weights = []
    for t in range(len(tasks)):
        pos = y[tr, t][y[tr, t] >= 0].mean()
        w = torch.tensor([1.0 / max(1e-6, 1 - pos), 1.0 / max(1e-6, pos)], dtype=torch.float32)
        weights.append((w / w.sum() * 2).to(device))
    ckpt = work / f"checkpoint_{cfg.task}.pt"
    start, best, best_epoch, history = 0, -1.0, 0, []
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=True, map_location=device)
        model.load_state_dict(st["model"]); opt.load_state_dict(st["optimizer"]); sched.load_state_dict(st["scheduler"])
        start, best, best_epoch = int(st["epoch"]) + 1, float(st["best"]), int(st["best_epoch"])
        hist = work / f"history_{cfg.task}.json"
        history = json.loads(hist.read_text()) if hist.is_file() else []
        log(f"[train] resumed after epoch {start} (best AUC {best:.3f})")
    aug = augmenter(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t_start = time.time()
    per_epoch = sum(1 for s in range(0, len(tr), bs) if len(tr) - s >= 2)
    bar = step_bar(epochs * per_epoch, start * per_epoch, desc=f"train {cfg.task}")
    for epoch in range(start, epochs):
        model.train()
        te = time.time()
        order = rng.permutation(tr)
        losses = []
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            if len(idx) < 2:
                continue
            view = rng.integers(0, views.shape[1], len(idx)) if views.shape[1] > 1 else np.zeros(len(idx), int)
            imgs = np.stack([np.asarray(aug({"image": views[i, v][None].astype(np.float32)})["image"])[0]
                             for i, v in zip(idx, view)])
            xb = torch.from_numpy(np.clip(imgs, 0, 255)).float().div_(255).unsqueeze(1).repeat(1, 3, 1, 1)
            xb = xb.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(xb)
            pairs = logits.float().view(len(idx), len(tasks), 2)
            yb = torch.from_numpy(y[idx]).to(device)
            loss = sum(F.cross_entropy(pairs[:, t], yb[:, t], weight=weights[t], ignore_index=-1)
                       for t in range(len(tasks)) if (yb[:, t] >= 0).any())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}", refresh=False)
        p = predict_probs(model, x[va], cfg.bf16)
        aucs = {name: roc_auc(y[va, t][y[va, t] >= 0], p[y[va, t] >= 0, t]).auc for t, name in enumerate(tasks)}
        auc = float(np.mean(list(aucs.values())))
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_auc": auc, "val_auc_by_task": aucs,
               "seconds": time.time() - te}
        history.append(rec)
        improved = auc > best
        if improved:
            best, best_epoch = auc, epoch + 1
            torch.save(model.state_dict(), work / f"best_{cfg.task}.pt")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "epoch": epoch, "best": best, "best_epoch": best_epoch}, ckpt)
        (work / f"history_{cfg.task}.json").write_text(json.dumps(history, indent=1))
        log(f"[train] {cfg.task} epoch {epoch + 1}/{epochs} loss {rec['loss']:.3f} val AUC "
            f"{' '.join(f'{k} {v:.3f}' for k, v in aucs.items())} "
            f"({rec['seconds']:.0f} s, ETA {(epochs - epoch - 1) * rec['seconds'] / 60:.0f} min){' *' if improved else ''}")
        if epoch + 1 - best_epoch >= cfg.patience:
            log("[train] early stop")
            break
        if cfg.max_minutes and (time.time() - t_start) / 60 > cfg.max_minutes:
            log("[train] time budget reached")
            break
    bar.close()
    model.load_state_dict(torch.load(work / f"best_{cfg.task}.pt", weights_only=True, map_location=device))
    model.eval()
    svm: Dict[str, Dict] = {}
    p_net = None                                          # the network's own last layer, before an SVM replaces it
    if preset.get("head") == "svm":
        p_net = predict_probs(model, x[va], False)
        log("[train] fitting the SVM on the embeddings of the training crops")
        svm = fit_svm_head(model, x[tr], y[tr], tasks, cfg.bf16, seed=cfg.seed)
        for name, info in svm.items():
            log(f"[train] {name}: linear SVM, {info['n_support']} support vectors, Platt a={info['platt'][0]:.3f} "
                f"b={info['platt'][1]:.3f}")
    p32 = predict_probs(model, x[va], False)
    p16 = predict_probs(model, x[va], True) if cfg.bf16 else None     # emulated bf16 is too slow to bother
    p_flip = (p32 + predict_probs(model, np.ascontiguousarray(x[va][:, :, ::-1]), False)) / 2   # + mirror (hflip TTA)
    model = model.to("cpu")                               # the bundles are written from CPU tensors, wherever it trained
    results = {}
    ds_all = np.array([cases[i].dataset for i in va])
    for t, name in enumerate(tasks):
        sel = y[va, t] >= 0
        yt, pt = y[va, t][sel], p32[sel, t]
        auc = roc_auc(yt, pt)
        ds = ds_all[sel]
        metrics = {"validation": f"one patient-level fold of {cfg.folds}", "val_crops": int(sel.sum()),
                   "val_patients": len({cases[i].patient_id for i in va[sel]}), "val_positives": int(yt.sum()),
                   "auc": auc.auc, "auc_ci95": [auc.ci_low, auc.ci_high], "auc_by_dataset": {},
                   "bf16_vs_fp32_max_abs_diff": None if p16 is None else float(np.abs(p16[sel, t] - pt).max()),
                   "best_epoch": best_epoch, "epochs_run": len(history), "trained_on": trained_on,
                   "multitask": list(tasks) if len(tasks) > 1 else None}
        metrics["auc_tta_hflip"] = roc_auc(yt, p_flip[sel, t]).auc
        if name in svm:
            metrics["svm_head"] = svm[name]
            metrics["auc_before_svm"] = roc_auc(yt, p_net[sel, t]).auc
        for d in sorted(set(ds)):
            m = ds == d
            if len(set(yt[m])) == 2:
                metrics["auc_by_dataset"][d] = roc_auc(yt[m], pt[m]).auc
        results[name] = {"model": task_model(model, t) if len(tasks) > 1 else model, "metrics": metrics,
                         "n_train": int((y[tr, t] >= 0).sum()), "val_index": va[sel], "val_probs": pt,
                         "labels": y[:, t]}
    return {"tasks": results, "history": history, "config": asdict(cfg), "cases": cases,
            "arguments": {"backbone": backbone, "embedding_dim": 128, "num_classes": 2, "dropout": 0.2}}


def embeddings_of(model, x: np.ndarray, bf16: bool, batch: int = 64) -> np.ndarray:
    """(N, embedding_dim) image embeddings of uint8 crops (eval mode, no augmentation)."""
    model.eval()
    return _batched(model.embed, x, bf16, batch, device_of(model)).astype(np.float64)


def fit_svm_head(model, x: np.ndarray, y: np.ndarray, tasks: Tuple[str, ...], bf16: bool, C: float = 1.0,
                 seed: int = 0) -> Dict[str, Dict]:
    """Yang et al. 2024: a linear SVM on the deep features, with Platt scaling, folded into the last layer.

    For each task column ``t`` a :class:`~BreastDLRLib.clinical.SVMFusionHead` (linear kernel, standardised
    features, Platt's sigmoid fitted on cross-validated decision values) is fitted on the embeddings of the
    training crops.  Its probability is ``expit(a * (w . (e - mean) / scale + b0) + b)``, a linear function of
    the embedding ``e`` through a sigmoid, so it is written exactly into the classification layer: logit of the
    negative class 0, of the positive class ``a * f(e) + b``.  The bundle stays one safetensors network and
    ``softmax(model(x))[:, 1]`` is the SVM's calibrated probability.  Returns what was fitted, per task.
    """
    from ..clinical import SVMFusionHead

    emb = embeddings_of(model, x, bf16)
    info: Dict[str, Dict] = {}
    w_layer = model.classifier.weight.data
    b_layer = model.classifier.bias.data
    for t, name in enumerate(tasks):
        sel = y[:, t] >= 0
        head = SVMFusionHead(C=C, kernel="linear", random_state=seed).fit(emb[sel], y[sel, t])
        if list(head.classes_) != [0, 1]:
            raise ValueError(f"{name}: the SVM needs both classes among the training crops")
        w_scaled = head.support_vectors_.T @ head.dual_coef_          # decision = Xs . w_scaled + intercept
        w = w_scaled / head.scale_
        b0 = float(head.intercept_[0] - w @ head.mean_)
        a, b = head.platt_
        neg, pos = 2 * t, 2 * t + 1                                  # logits come in pairs, one per task
        w_layer[pos].copy_(torch.from_numpy(a * w).to(w_layer.device, w_layer.dtype))
        b_layer[pos] = float(a * b0 + b)
        w_layer[neg].zero_()
        b_layer[neg] = 0.0
        info[name] = {"kernel": "linear", "C": C, "n_support": int(len(head.support_vectors_)),
                      "platt": [float(a), float(b)], "n_train": int(sel.sum()),
                      "calibration": "Platt sigmoid on 5-fold cross-validated decision values of the training crops"}
    return info
