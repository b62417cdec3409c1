"""Train the lesion segmenter (UNet, EfficientNet-b0 encoder, from scratch) on a manifest of 2D images.

Patient-level split (one fold of a stratified group k-fold held out for validation), MONAI augmentation
suited to ultrasound (flips left-right only, small affine, gain/contrast), Dice + BCE loss, Adam, the best
validation Dice kept, a checkpoint every epoch (tensors only; resumed with ``weights_only=True``), early
stopping, fixed seeds.  The result is a model bundle with its model card.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..networks.segmenter import build_segmenter
from ..progress import step_bar
from ..segmentation import normalise_intensity
from .augment import ultrasound_augmenter
from .devices import device_of, training_device
from .data import Case, load_grey, load_mask, read_manifest_csv
from .splits import parse_folds, segmenter_split


@dataclass
class SegmenterConfig:
    size: int = 128               # the shipped model's settings (scripts/retrain_models.sh)
    epochs: int = 14
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    folds: int = 5
    val_fold: int = 0
    seed: int = 0
    patience: int = 5
    max_train_cases: Optional[int] = None
    bf16: bool = True
    threads: int = 0
    max_minutes: Optional[float] = None
    init: Optional[str] = None    # a segmenter bundle to fine-tune from (else random initialisation)
    split: str = "shared"         # "shared": the classifiers' patient folds (training.splits); "own": the earlier split
    train_folds: str = ""         # "": every fold but val_fold; "1,2": only these folds (out-of-fold outlines)
    device: str = "auto"          # "auto": a CUDA GPU where torch sees one, else the CPU; or "cpu" / "cuda"


def load_arrays(cases: List[Case], size: int) -> tuple:
    imgs = np.stack([load_grey(c.image, size) for c in cases])
    masks = np.stack([load_mask(c.mask, (size, size), size) for c in cases])
    return imgs, masks


def augmenter(seed: int):
    """The segmenter's augmentation (image and mask)."""
    return ultrasound_augmenter(seed, with_mask=True, affine_prob=0.7, scale=0.15, translate=20)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    p = torch.sigmoid(logits)
    inter = (p * target).flatten(1).sum(1)
    denom = p.flatten(1).sum(1) + target.flatten(1).sum(1)
    return (1 - (2 * inter + eps) / (denom + eps)).mean()


def dice_scores(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image Dice; an image with neither prediction nor truth scores 1."""
    p = pred.reshape(len(pred), -1).astype(bool)
    t = truth.reshape(len(truth), -1).astype(bool)
    inter = (p & t).sum(1)
    s = p.sum(1) + t.sum(1)
    return np.where(s == 0, 1.0, 2 * inter / np.maximum(s, 1))


@torch.inference_mode()
def predict_masks(model, imgs: np.ndarray, size: int, bf16: bool, batch: int = 32) -> np.ndarray:
    model.eval()
    dev = device_of(model)
    out = []
    for s in range(0, len(imgs), batch):
        x = torch.from_numpy(imgs[s:s + batch]).float().unsqueeze(1).to(dev)
        x = normalise_intensity(x).contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            y = model(x).float()
        out.append((torch.sigmoid(y[:, 0]) > 0.5).cpu().numpy())
    return np.concatenate(out)


def train_segmenter(manifest: str | Path, out_dir: str | Path, cfg: SegmenterConfig = SegmenterConfig(),
                    work_dir: Optional[str | Path] = None, log=print) -> Dict:
    torch.manual_seed(cfg.seed)
    device, bf16, trained_on = training_device(cfg.device, cfg.bf16, log)
    cfg = replace(cfg, bf16=bf16)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tr, va = segmenter_split(read_manifest_csv(manifest), cfg.folds, cfg.seed, cfg.val_fold, cfg.split,
                             train_folds=parse_folds(cfg.train_folds, cfg.folds, cfg.val_fold))
    assert not ({c.patient_id for c in tr} & {c.patient_id for c in va}), "patient on both sides of the split"
    if cfg.max_train_cases:
        tr = tr[: cfg.max_train_cases]
        va = va[: max(8, cfg.max_train_cases // 4)]
    log(f"[train] {len(tr)} training and {len(va)} validation images ({len({c.patient_id for c in va})} patients held out)")
    t0 = time.time()
    xtr, ytr = load_arrays(tr, cfg.size)
    xva, yva = load_arrays(va, cfg.size)
    log(f"[train] images loaded in {time.time() - t0:.0f} s")

    args = {"architecture": "Unet", "encoder_name": "efficientnet-b0", "in_channels": 1, "classes": 1}
    model = build_segmenter(**args)
    if cfg.init:
        from ..bundles import load_weights, open_bundle

        model.load_state_dict({k: v.float() for k, v in load_weights(open_bundle(cfg.init)).items()})
        log(f"[train] fine-tuning from {cfg.init}")
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(tr) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.1)
    work = Path(work_dir or Path(out_dir).with_name(Path(out_dir).name + "-work"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "checkpoint.pt"
    start_epoch, best, best_epoch, history = 0, -1.0, -1, []
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, best, best_epoch = int(state["epoch"]) + 1, float(state["best"]), int(state["best_epoch"])
        history = json.loads((work / "history.json").read_text()) if (work / "history.json").is_file() else []
        log(f"[train] resumed after epoch {start_epoch} (best Dice {best:.3f})")
    aug = augmenter(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t_start = time.time()
    bar = step_bar(cfg.epochs * steps_per_epoch, start_epoch * steps_per_epoch, desc="train segmenter")
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = rng.permutation(len(tr))
        te = time.time()
        losses = []
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            items = [aug({"image": xtr[i][None].astype(np.float32), "mask": ytr[i][None].astype(np.float32)}) for i in idx]
            x = torch.stack([torch.as_tensor(np.asarray(it["image"])) for it in items])
            y = torch.stack([torch.as_tensor(np.asarray(it["mask"])) for it in items])
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = normalise_intensity(x).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(x)
            logits = logits.float()
            loss = F.binary_cross_entropy_with_logits(logits, y) + dice_loss(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}", refresh=False)
            step = s // cfg.batch_size + 1
            if step % 25 == 0:
                log(f"[train] epoch {epoch + 1} step {step}/{steps_per_epoch} loss {np.mean(losses[-25:]):.3f} "
                    f"({(time.time() - te) / step:.1f} s/step)")
        pred = predict_masks(model, xva, cfg.size, cfg.bf16)
        d = dice_scores(pred, yva)
        lesion = yva.reshape(len(yva), -1).any(1)
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_dice_mean": float(d.mean()),
               "val_dice_lesion_images": float(d[lesion].mean()), "seconds": time.time() - te}
        history.append(rec)
        improved = rec["val_dice_lesion_images"] > best
        if improved:
            best, best_epoch = rec["val_dice_lesion_images"], epoch + 1
            torch.save({k: v for k, v in model.state_dict().items()}, work / "best.pt")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "epoch": epoch, "best": best, "best_epoch": best_epoch}, ckpt)
        (work / "history.json").write_text(json.dumps(history, indent=1))
        eta = (cfg.epochs - epoch - 1) * rec["seconds"]
        log(f"[train] epoch {epoch + 1}/{cfg.epochs} loss {rec['loss']:.3f} val Dice {rec['val_dice_lesion_images']:.3f} "
            f"({rec['seconds']:.0f} s, ETA {eta / 60:.0f} min){' *' if improved else ''}")
        if epoch + 1 - best_epoch >= cfg.patience:
            log(f"[train] early stop: no improvement for {cfg.patience} epochs")
            break
        if cfg.max_minutes and (time.time() - t_start) / 60 > cfg.max_minutes:
            log("[train] time budget reached")
            break
    bar.close()
    model.load_state_dict(torch.load(work / "best.pt", weights_only=True, map_location=device))
    model.eval()
    pred32 = predict_masks(model, xva, cfg.size, False)
    pred16 = predict_masks(model, xva, cfg.size, True)
    d32 = dice_scores(pred32, yva)
    agree = dice_scores(pred16, pred32)
    lesion = yva.reshape(len(yva), -1).any(1)
    metrics = {
        "validation": "one patient-level fold of 5 (stratified by dataset and pathology)",
        "val_images": len(va), "val_patients": len({c.patient_id for c in va}),
        "dice_mean_lesion_images_fp32": float(d32[lesion].mean()),
        "dice_median_lesion_images_fp32": float(np.median(d32[lesion])),
        "dice_by_dataset": {ds: float(d32[lesion & np.array([c.dataset == ds for c in va])].mean())
                            for ds in sorted({c.dataset for c in va})},
        "bf16_vs_fp32_mask_dice_mean": float(agree.mean()), "bf16_vs_fp32_mask_dice_min": float(agree.min()),
        "best_epoch": best_epoch, "epochs_run": len(history), "trained_on": trained_on,
    }
    real = np.array([c.dataset != "synthetic" for c in va])
    if real.any() and not real.all():       # synthetic images in the validation fold: the real images' figures on their own too
        metrics.update(real_val_images=int(real.sum()),
                       dice_mean_real_lesion_images_fp32=float(d32[lesion & real].mean()),
                       dice_median_real_lesion_images_fp32=float(np.median(d32[lesion & real])))
    from collections import Counter

    model = model.to("cpu")               # the bundle is written from CPU tensors, wherever it trained
    return {"model": model, "metrics": metrics, "history": history, "config": asdict(cfg), "arguments": args,
            "n_train": len(tr), "train_datasets": dict(Counter(c.dataset for c in tr))}
