"""Grad-CAM per plane, painted back onto the image's voxel grid, and PNG overlays.

Grad-CAM (as pytorch-grad-cam's ``GradCAM`` computes it) for every plane from one forward pass: each plane's
target module (one per plane, run once per forward, e.g. the tap on its trunk's last feature map) is cut out of
the graph, so the gradients run from the logits back to the maps only.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from .planes import PLANES, PlaneCrop
from .volume import Volume


# ---------------------------------------------------------------------------------------------- Grad-CAM
class _Target:
    """Grad-CAM target for one sample's output: logit ``target_class`` of (C,), or ±the single logit."""

    def __init__(self, target_class: int) -> None:
        self.target_class = int(target_class)

    def __call__(self, output):
        if output.numel() == 1:
            v = output.reshape(())
            return v if self.target_class == 1 else -v
        return output.reshape(-1)[self.target_class]


def _logits(out: Any):
    if isinstance(out, Mapping):
        out = out["logits"]
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _hook_count(model) -> int:
    n = 0
    for m in model.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            n += len(getattr(m, name, {}) or {})
    return n


def _as_plane_dict(inputs, planes: Sequence[str]) -> Dict[str, Any]:
    import torch

    if isinstance(inputs, Mapping):
        return dict(inputs)
    x = torch.as_tensor(inputs)
    if x.ndim == 4:  # (P, 3, H, W): one frame
        x = x[None]
    if x.ndim != 5 or x.shape[1] != len(planes):
        raise ValueError(f"stacked inputs must be (B, {len(planes)}, C, H, W), got {tuple(x.shape)}")
    return {p: x[:, pi] for pi, p in enumerate(planes)}


def gradcam_planes(
    model,
    inputs,
    target_layers: Mapping[str, Any],
    target_class: int = 1,
    planes: Sequence[str] = PLANES,
    plane_mask: Optional[Sequence[bool]] = None,
    forward_kwargs: Optional[Mapping[str, Any]] = None,
) -> Dict[str, np.ndarray]:
    """Grad-CAM of each plane's branch, in [0, 1], at the plane input's size, from one forward pass.

    ``model(dict plane -> (B, 3, H, W), **forward_kwargs)`` must return logits ``(B, C)`` (or ``(B,)``/``(B, 1)``
    for one logit: class 1 = the logit, class 0 = its negative; a dict with ``"logits"`` or a tuple whose first
    item is the logits are accepted).  ``inputs``: that dict, or the stacked ``(B, P, 3, H, W)`` /
    ``(P, 3, H, W)`` layout of :func:`BreastDLRLib.planes.to_tensor_batch` with ``planes`` naming axis P.
    ``target_layers``: plane -> the module whose output is that plane's map (or a list of them, one per ensemble
    member, whose maps are averaged); each must run once per forward pass, and a module that runs more often (a
    layer of a trunk the planes share) is refused.  Planes missing from ``target_layers`` or with ``plane_mask``
    False are skipped.  Returns ``plane -> (H, W)`` for B = 1, else ``(B, H, W)``.

    The maps are pytorch-grad-cam's ``GradCAM`` (channel weights = mean gradient, ReLU, min-max scaling, resized
    with its ``scale_cam_image``, several layers averaged), but all planes come from one forward pass, and the
    gradients only run back from the logits to the target layers (the model is cut there), not through the
    trunks.  Works inside ``torch.no_grad()`` (not ``torch.inference_mode()``); the model's train/eval flags,
    ``requires_grad`` flags and ``.grad`` are restored, and no hook stays on it.
    """
    import torch
    from pytorch_grad_cam.utils.image import scale_cam_image

    x_all = _as_plane_dict(inputs, planes)
    masked = dict(zip(planes, plane_mask)) if plane_mask is not None else {}
    wanted: Dict[str, list] = {}
    for plane in planes:
        layer = target_layers.get(plane)
        if layer is None or plane not in x_all or not masked.get(plane, True):
            continue
        wanted[plane] = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    owners: Dict[int, Any] = {}
    for plane, layers in wanted.items():
        for layer in layers:
            if id(layer) in owners:
                raise ValueError(f"Grad-CAM needs one target module per plane; {type(layer).__name__} is given for "
                                 "more than one plane")
            owners[id(layer)] = layer
    if not wanted:
        return {}
    target = _Target(target_class)
    maps: Dict[int, list] = {key: [] for key in owners}

    def cut(module, _inputs, output):
        # the map becomes a leaf of its own graph: the backward pass stops here, and yields d(logit)/d(map)
        leaf = output.detach().requires_grad_(True)
        maps[id(module)].append(leaf)
        return leaf.clone()  # a non-leaf copy, so that in-place operations after the layer stay allowed

    hooks_before = _hook_count(model)
    training = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    handles = []
    cams: Dict[str, np.ndarray] = {}
    try:
        model.eval()
        for p in params:  # no graph through the weights: only the maps need gradients
            p.requires_grad_(False)
        handles = [layer.register_forward_hook(cut) for layer in owners.values()]
        fixed = {k: v.detach() if torch.is_tensor(v) else v for k, v in x_all.items()}
        with torch.enable_grad():
            logits = _logits(model(fixed, **dict(forward_kwargs or {})))
            for key, got in maps.items():
                if len(got) != 1:
                    raise ValueError(f"the Grad-CAM target {type(owners[key]).__name__} ran {len(got)} times in one "
                                     "forward pass; give a module that runs once per plane")
            leaves = [maps[key][0] for key in owners]
            loss = sum(target(o) for o in logits)
            # no path from the maps to the logits (e.g. every hooked plane masked out): zero gradients, empty maps
            grads = (torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad
                     else [None] * len(leaves))
        grad_of = dict(zip(owners, grads))
        for plane, layers in wanted.items():
            h, w = fixed[plane].shape[-2:]
            per_layer = []
            for layer in layers:
                act = maps[id(layer)][0].detach().float()
                g = grad_of[id(layer)]
                g = torch.zeros_like(act) if g is None else g.float()
                cam = (g.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1).cpu().numpy()
                per_layer.append(scale_cam_image(np.maximum(cam, 0), (int(w), int(h)))[:, None])
            res = scale_cam_image(np.maximum(np.concatenate(per_layer, axis=1), 0).mean(axis=1))
            res = np.clip(np.nan_to_num(np.asarray(res, dtype=np.float32)), 0.0, 1.0)
            cams[plane] = res[0] if res.shape[0] == 1 else res
    finally:
        for handle in handles:
            handle.remove()
        for p, (rg, g) in zip(params, saved):
            p.requires_grad_(rg)
            p.grad = g
        for m, t in training.items():
            m.train(t)
    if _hook_count(model) != hooks_before:
        raise RuntimeError("Grad-CAM left hooks on the model")
    return cams


# ---------------------------------------------------------------------------------------------- painting
def _one_crop(v: Union[PlaneCrop, Sequence[PlaneCrop]]) -> PlaneCrop:
    """The crop a CAM belongs to: the crop itself, or the middle frame ``frames[len(frames) // 2]``."""
    if isinstance(v, PlaneCrop):
        return v
    lst = list(v)
    if not lst:
        raise ValueError("empty list of crops")
    return lst[len(lst) // 2]


def heatmap_to_volume(
    volume: Volume,
    crops: Mapping[str, Union[PlaneCrop, Sequence[PlaneCrop]]],
    cams: Mapping[str, np.ndarray],
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Paint each plane's CAM onto the voxel grid of ``volume``; float32 ``(k, j, i)`` in [0, 1].

    For each plane, the voxels of its slab (the crop's fixed index) whose centre falls inside the crop's
    footprint (pixel cells ``[-0.5, size - 0.5]``) get the CAM bilinearly sampled at their (r, c) (the
    inverse of the crop's affine; held constant in the outer half pixel; a CAM of another size is rescaled
    cell for cell).  Planes combine by max,
    and by max with ``out`` (pass the same ``out`` for every lesion).  Everything else is 0.  With a list
    of frames per plane, the middle frame ``frames[len(frames) // 2]`` is used: compute the CAM on that one.
    """
    shape = volume.shape
    if out is None:
        out = np.zeros(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {shape}, got {out.dtype} {out.shape}")
    for plane, cam in cams.items():
        if plane not in crops:
            continue
        crop = _one_crop(crops[plane])
        cam = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float32)), 0.0, 1.0)
        if cam.ndim != 2:
            raise ValueError(f"CAM of plane {plane} must be 2D, got shape {cam.shape}")
        f, ra, ca = crop.fixed_axis, crop.row_axis, crop.col_axis
        pos = crop.fixed_index
        if not 0 <= pos < shape[f]:
            continue
        size_r, size_c = crop.image.shape
        rs, cs = crop.row_step_kji[ra], crop.col_step_kji[ca]
        # voxel index ranges whose inverse-mapped (r, c) lies in [-0.5, size - 0.5]
        lo_r = crop.origin_kji[ra] - 0.5 * rs
        hi_r = crop.origin_kji[ra] + (size_r - 0.5) * rs
        lo_c = crop.origin_kji[ca] - 0.5 * cs
        hi_c = crop.origin_kji[ca] + (size_c - 0.5) * cs
        a0, a1 = max(int(np.ceil(lo_r)), 0), min(int(np.floor(hi_r)), shape[ra] - 1)
        b0, b1 = max(int(np.ceil(lo_c)), 0), min(int(np.floor(hi_c)), shape[ca] - 1)
        if a1 < a0 or b1 < b0:
            continue
        r = (np.arange(a0, a1 + 1) - crop.origin_kji[ra]) / rs
        c = (np.arange(b0, b1 + 1) - crop.origin_kji[ca]) / cs
        # CAM pixel coordinates (a CAM of another size covers the same square)
        rc = (r + 0.5) * cam.shape[0] / size_r - 0.5
        cc = (c + 0.5) * cam.shape[1] / size_c - 0.5
        rr, ccg = np.meshgrid(rc, cc, indexing="ij")
        vals = ndimage.map_coordinates(cam, [rr, ccg], order=1, mode="nearest").astype(np.float32)
        idx: list = [slice(None)] * 3
        idx[f] = pos
        idx[ra] = slice(a0, a1 + 1)
        idx[ca] = slice(b0, b1 + 1)
        region = out[tuple(idx)]  # 2D view, axes in increasing order of (ra, ca)
        if ra > ca:
            vals = vals.T
        np.maximum(region, np.clip(vals, 0.0, 1.0), out=region)
    return out


# ---------------------------------------------------------------------------------------------- overlay
def jet(x: np.ndarray) -> np.ndarray:
    """Jet-like colour map: values in [0, 1] -> RGB float in [0, 1], shape ``x.shape + (3,)``."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * x - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * x - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * x - 1.0), 0.0, 1.0)
    return np.stack([r, g, b], axis=-1)


def overlay_rgb(gray2d: np.ndarray, cam2d: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """uint8 (H, W, 3): grey image (min-max scaled) blended with ``alpha`` × jet(CAM); CAM resized if needed."""
    g = np.asarray(gray2d, dtype=np.float32)
    if g.ndim != 2:
        raise ValueError(f"grey image must be 2D, got shape {g.shape}")
    lo, hi = float(g.min()), float(g.max())
    g = (g - lo) / (hi - lo) if hi > lo else np.zeros_like(g)
    cam = np.clip(np.nan_to_num(np.asarray(cam2d, dtype=np.float32)), 0.0, 1.0)
    if cam.shape != g.shape:
        rr, cc = np.meshgrid(
            (np.arange(g.shape[0]) + 0.5) * cam.shape[0] / g.shape[0] - 0.5,
            (np.arange(g.shape[1]) + 0.5) * cam.shape[1] / g.shape[1] - 0.5,
            indexing="ij",
        )
        cam = ndimage.map_coordinates(cam, [rr, cc], order=1, mode="nearest")
    rgb = (1.0 - alpha) * g[..., None] + alpha * jet(cam)
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def overlay_png(gray2d: np.ndarray, cam2d: np.ndarray, path: Union[str, Path], alpha: float = 0.4) -> Path:
    """Write :func:`overlay_rgb` as an RGB PNG, atomically (temporary file in the same folder, then rename)."""
    from PIL import Image

    path = Path(path)
    rgb = overlay_rgb(gray2d, cam2d, alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(rgb).save(fh, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
