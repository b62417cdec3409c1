"""Where a training run computes: the device asked for, whether bf16 autocast pays there, and how the bundle names it."""
from __future__ import annotations

from typing import Callable, Tuple

import torch

from ..segmentation import cpu_has_fast_bf16, resolve_device


def training_device(requested: str, bf16: bool, log: Callable[[str], None] = print) -> Tuple[torch.device, bool, str]:
    """``(device, bf16, trained_on)`` for ``--device requested``: a CUDA GPU keeps bf16; a CPU without native bf16
    trains in fp32 (emulated bf16 is several times slower).  ``trained_on`` is ``cpu`` or ``cuda (<GPU name>)``.
    ``cuda`` without a GPU raises :class:`~BreastDLRLib.errors.InputError`."""
    device = resolve_device(requested)
    if device.type == "cuda":
        trained_on = f"cuda ({torch.cuda.get_device_name(device)})"
        log(f"[train] training on {trained_on}")
        return device, bf16, trained_on
    if bf16 and not cpu_has_fast_bf16():
        log("[train] this CPU has no native bf16 (emulated bf16 is several times slower): training in fp32")
        bf16 = False
    return device, bf16, "cpu"


def device_of(model: torch.nn.Module) -> torch.device:
    """The device a network's parameters live on."""
    return next(model.parameters()).device
