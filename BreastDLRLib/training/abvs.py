"""Train the ABVS three-plane model (Liu et al. 2025) on synthetic volumes, branches initialised from the 2D model.

There is no public 3D breast ultrasound volume.  Until real ABVS data is at hand, the three-plane network is
trained on :mod:`BreastDLRLib.synthetic` volumes, with each plane's ResNet trunk initialised from the 2D
malignancy model (the transfer Lu et al. made from BUSI to their own data).  Crops come from the product's own
:func:`BreastDLRLib.planes.crop_planes` around each true lesion, so training and inference cut them alike.
The model card says plainly that its metrics are on synthetic data and mean nothing for real patients.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..networks.classifiers import PLANES, build_classifier

SYNTHETIC_SOURCE = "BreastDLRLib.synthetic.make_volume (deterministic synthetic ABVS-like volumes)"


@dataclass
class AbvsConfig:
    n_volumes: int = 160
    shape_kji: Tuple[int, int, int] = (40, 128, 160)
    spacing: Tuple[float, float, float] = (0.2, 0.2, 0.5)
    size: int = 128
    margin: float = 0.3
    margin_of: str = "shorter"
    frames: int = 3
    epochs: int = 6
    batch_size: int = 16
    lr: float = 1e-3              # Liu 2025: SGD with momentum, lr 1e-3 (batch 64 there; 16 here for CPU memory)
    momentum: float = 0.9
    seed: int = 0
    val_fraction: float = 0.2
    backbone: str = "resnet50"
    shared_trunk: bool = True     # one trunk for the three planes: a third of the weights to ship (see the card)


def lesion_crops(cfg: AbvsConfig, log: Callable[[str], None] = print) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, F, 3 planes, S, S) uint8 crops, labels (1 = malignant-like), and the volume index of each lesion."""
    from ..lesions import lesions_from_labels
    from ..planes import crop_planes
    from ..synthetic import make_volume

    xs, ys, groups = [], [], []
    t0 = time.time()
    for v in range(cfg.n_volumes):
        case = make_volume(seed=cfg.seed * 100000 + v, shape_kji=cfg.shape_kji, spacing=cfg.spacing)
        for les_truth, les in zip(case.lesions, lesions_from_labels(case.mask)):
            crops = crop_planes(case.image, les.bbox_kji, les.centre_kji, size=cfg.size, margin=cfg.margin,
                                margin_of=cfg.margin_of, n_frames=cfg.frames, mask=les.mask)
            stack = np.stack([[(crops[p][f].image * 255).astype(np.uint8) for p in PLANES] for f in range(cfg.frames)])
            xs.append(stack)
            ys.append(int(les_truth.kind == "malignant"))
            groups.append(v)
        if v % 40 == 0:
            log(f"[abvs] volume {v}/{cfg.n_volumes}, {len(xs)} lesions ({time.time() - t0:.0f} s)")
    return np.stack(xs), np.asarray(ys), np.asarray(groups)


def init_from_2d(model, state_2d: Dict[str, torch.Tensor]) -> int:
    """Copy the 2D EmbeddingNet's trunk into every plane's trunk; returns the number of tensors copied."""
    trunk = {k[len("trunk."):]: v for k, v in state_2d.items() if k.startswith("trunk.")}
    n = 0
    for module in model.trunks.values():
        module.load_state_dict({k: v.float() for k, v in trunk.items()}, strict=True)
        n += len(trunk)
    return n


def _batch(x: np.ndarray, idx: np.ndarray, frame: Optional[np.ndarray]) -> Dict[str, torch.Tensor]:
    f = frame if frame is not None else np.zeros(len(idx), dtype=int)
    sel = x[idx, f]  # (B, 3 planes, S, S)
    t = torch.from_numpy(sel).float().div_(255.0)
    return {p: t[:, i:i + 1].repeat(1, 3, 1, 1).contiguous(memory_format=torch.channels_last) for i, p in enumerate(PLANES)}


@torch.no_grad()
def _predict(model, x: np.ndarray) -> np.ndarray:
    """Per-lesion probability: mean over frames of the per-frame softmax (as at inference)."""
    model.eval()
    out = np.zeros(len(x))
    for f in range(x.shape[1]):
        for s in range(0, len(x), 32):
            idx = np.arange(s, min(s + 32, len(x)))
            out[idx] += torch.softmax(model(_batch(x, idx, np.full(len(idx), f))).float(), 1)[:, 1].numpy()
    return out / x.shape[1]


def train_abvs(cfg: AbvsConfig, state_2d: Dict[str, torch.Tensor], log: Callable[[str], None] = print) -> Dict:
    from ..evaluation import roc_auc

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    x, y, g = lesion_crops(cfg, log)
    vols = np.unique(g)
    rng.shuffle(vols)
    val_vols = set(vols[: max(1, int(len(vols) * cfg.val_fraction))].tolist())
    va = np.array([i for i in range(len(y)) if g[i] in val_vols])
    tr = np.array([i for i in range(len(y)) if g[i] not in val_vols])
    log(f"[abvs] {len(tr)} training and {len(va)} validation lesions; malignant {y.mean():.2f}")
    model = build_classifier("ThreePlaneFusion", backbone=cfg.backbone, num_classes=2, dropout=0.5,
                             shared_trunk=cfg.shared_trunk)
    copied = init_from_2d(model, state_2d)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=1e-4)
    history: List[Dict] = []
    best, best_state = -1.0, None
    for epoch in range(cfg.epochs):
        model.train()
        te = time.time()
        order = rng.permutation(tr)
        losses = []
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            if len(idx) < 2:
                continue
            frames = rng.integers(0, x.shape[1], len(idx))
            batch = _batch(x, idx, frames)
            if rng.random() < 0.5:  # left-right flip of the transverse and coronal planes (lateral axis)
                batch = {p: (t.flip(-1) if p != "sagittal" else t) for p, t in batch.items()}
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(batch)
            loss = F.cross_entropy(logits.float(), torch.from_numpy(y[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        p = _predict(model, x[va])
        auc = roc_auc(y[va], p).auc
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_auc": auc, "seconds": time.time() - te})
        log(f"[abvs] epoch {epoch + 1}/{cfg.epochs} loss {np.mean(losses):.3f} val AUC {auc:.3f} ({time.time() - te:.0f} s)")
        if auc > best:
            best, best_state = auc, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    p = _predict(model, x[va])
    auc = roc_auc(y[va], p)
    acc = float(((p >= 0.5) == y[va]).mean())
    metrics = {"data": "synthetic volumes only (no real ABVS data exists here)", "val_lesions": int(len(va)),
               "val_volumes": len(val_vols), "auc_synthetic": auc.auc, "auc_synthetic_ci95": [auc.ci_low, auc.ci_high],
               "accuracy_synthetic": acc, "tensors_initialised_from_2d": copied, "epochs_run": len(history)}
    return {"model": model, "metrics": metrics, "history": history, "config": asdict(cfg), "n_train": int(len(tr))}
