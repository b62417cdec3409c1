"""Slice-by-slice lesion segmentation of a :class:`Volume` with the bundle's UNet.

Each slice perpendicular to the acquisition axis is resized to the network's grid (``input.size`` of the
manifest), normalised the way the model was trained (``input.normalisation``), run through the network in
batches (channels-last; bf16 autocast on CPU when asked), and the logits are resized back to the slice's own
size.  The result is a lesion-probability volume with the input's geometry.

A bundle may declare test-time augmentation (``input.test_time_augmentation: ["hflip"]``): the logits of each
slice are then averaged with those of its left-right mirror.  It is applied to single images only (a volume of
one slice), where it costs one more network call; volumes keep one pass per slice.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .progress import CancelCheck, ProgressCallback, check_cancel, no_progress
from .volume import Volume

NORMALISATIONS = ("zscore", "minmax")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` takes the GPU when torch sees one, else the CPU."""
    from .errors import InputError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available here; use --device cpu or auto.")
    if device not in ("cpu", "cuda"):
        raise InputError(f"Unknown device '{device}'; use auto, cpu or cuda.")
    return torch.device(device)


def normalise_intensity(x: torch.Tensor, method: str = "zscore", eps: float = 1e-6) -> torch.Tensor:
    """Per-image normalisation of a (B, C, H, W) batch; constant images become zeros (never NaN)."""
    flat = x.flatten(1)
    if method == "zscore":
        mean = flat.mean(1).view(-1, 1, 1, 1)
        std = flat.std(1, unbiased=False).view(-1, 1, 1, 1)
        return (x - mean) / std.clamp_min(eps)
    if method == "minmax":
        lo = flat.amin(1).view(-1, 1, 1, 1)
        hi = flat.amax(1).view(-1, 1, 1, 1)
        return (x - lo) / (hi - lo).clamp_min(eps)
    raise ValueError(f"unknown normalisation {method!r}; known: {NORMALISATIONS}")


def to_network_grid(x: torch.Tensor, size: int, normalisation: str) -> torch.Tensor:
    """(B, H, W) slices → normalised (B, 1, size, size) network input."""
    x = x.unsqueeze(1).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return normalise_intensity(x, normalisation)


@dataclass
class SegmentationResult:
    probability: Volume                      # float16 probabilities in [0, 1], the input's geometry
    timings: Dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"
    test_time_augmentation: tuple = ()       # what was applied (("hflip",) or ())


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX).

    Without it, bf16 autocast is emulated and much slower than fp32 (measured on a 2-core AVX2 AMD EPYC: 8.0 s
    against 0.75 s for 16 slices of 128x128 through the segmenter), so bf16 is only used where this is true.
    ``BREASTDLR_BF16=0`` or ``=1`` overrides the detection."""
    import os

    forced = os.environ.get("BREASTDLR_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # pragma: no cover - older torch: stay on the safe (fp32) side
        return False


class SliceSegmenter:
    """Runs a 2D segmentation network over every slice of a volume.

    ``bf16=None`` follows the bundle's manifest (``inference.bf16_cpu``), which is set only where agreement with
    fp32 was measured (see the model card), on CPUs with native bf16 (:func:`cpu_has_fast_bf16`);
    ``True``/``False`` force it.  bf16 is never used on the GPU path
    here (fp32 there), so CPU and GPU agree within the tolerance the tests state.

    ``fold_bn`` (default) runs a copy of the network with its batch norms folded into the convolutions before
    them (:func:`BreastDLRLib.networks.fold.fold_batchnorm`: same logits up to float rounding, about 12 % faster
    on the CPU); the network given is not changed.
    """

    def __init__(self, model: torch.nn.Module, size: int = 256, normalisation: str = "zscore",
                 device: str | torch.device = "cpu", batch_size: int = 16, bf16: bool = False,
                 hflip_single_images: bool = False, fold_bn: bool = True):
        self.device = resolve_device(device) if isinstance(device, str) else device
        model = model.eval()
        if fold_bn:
            from .networks.fold import fold_batchnorm

            model = fold_batchnorm(model)
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        self.size = int(size)
        self.normalisation = normalisation
        self.batch_size = int(batch_size)
        self.bf16 = bool(bf16) and self.device.type == "cpu"
        self.hflip_single_images = bool(hflip_single_images)

    @classmethod
    def from_bundle(cls, bundle, device: str = "auto", batch_size: int = 16, bf16: Optional[bool] = None) -> "SliceSegmenter":
        inp = bundle.input
        dev = resolve_device(device)
        if bf16 is None:
            bf16 = bool(bundle.manifest.get("inference", {}).get("bf16_cpu", False)) and cpu_has_fast_bf16()
        size = inp["size"][0] if isinstance(inp.get("size"), (list, tuple)) else int(inp.get("size", 256))
        tta = inp.get("test_time_augmentation") or []
        unknown = [t for t in tta if t != "hflip"]
        if unknown:
            from .errors import InputError

            raise InputError(f"The segmentation model asks for test-time augmentation {unknown}, which this version of "
                             "BreastDLR does not know; update BreastDLR or use another model.")
        return cls(bundle.model(str(dev)), size=size, normalisation=inp.get("normalisation", "zscore"),
                   device=dev, batch_size=batch_size, bf16=bf16, hflip_single_images="hflip" in tta)

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(x.contiguous(memory_format=torch.channels_last)).float()

    @torch.inference_mode()
    def logits_for(self, slices: torch.Tensor, hflip: bool = False) -> torch.Tensor:
        """(B, H, W) raw slices → (B, H, W) float32 logits at the slices' own size; ``hflip`` averages them with
        the mirrored logits of the mirrored slices."""
        h, w = slices.shape[-2:]
        x = to_network_grid(slices.to(self.device), self.size, self.normalisation)
        y = self._network(x)
        if hflip:
            y = (y + self._network(x.flip(-1)).flip(-1)) / 2
        if (h, w) != (self.size, self.size):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return y[:, 0]

    def __call__(self, volume: Volume, progress: ProgressCallback = no_progress,
                 cancel: Optional[CancelCheck] = None) -> SegmentationResult:
        timings = {"preprocess": 0.0, "network": 0.0, "postprocess": 0.0}
        axis = int(volume.metadata.get("acquisition_axis", 0))
        arr = np.moveaxis(volume.array, axis, 0)
        n = arr.shape[0]
        hflip = self.hflip_single_images and n == 1
        out = np.empty(arr.shape, dtype=np.float16)
        for start in range(0, n, self.batch_size):
            check_cancel(cancel)
            t0 = time.perf_counter()
            chunk = torch.from_numpy(np.ascontiguousarray(arr[start:start + self.batch_size], dtype=np.float32))
            t1 = time.perf_counter()
            logits = self.logits_for(chunk, hflip=hflip)
            t2 = time.perf_counter()
            out[start:start + len(chunk)] = torch.sigmoid(logits).to(torch.float16).cpu().numpy()
            t3 = time.perf_counter()
            timings["preprocess"] += t1 - t0
            timings["network"] += t2 - t1
            timings["postprocess"] += t3 - t2
            progress("segment", min(1.0, (start + len(chunk)) / n), f"slice {start + len(chunk)} of {n}")
        prob = volume.with_array(np.moveaxis(out, 0, axis))
        return SegmentationResult(prob, timings, "bf16" if self.bf16 else "fp32", ("hflip",) if hflip else ())
