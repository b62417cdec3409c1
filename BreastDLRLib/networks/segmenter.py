"""Lesion segmenter: a segmentation-models-pytorch UNet with an EfficientNet-b0 encoder.

No pretrained weights are ever downloaded (``encoder_weights=None``); a model bundle supplies trained ones.
"""
from __future__ import annotations

from typing import Any

from torch import nn

SEGMENTER_ARCHITECTURES = ("Unet",)


def build_segmenter(
    architecture: str = "Unet",
    encoder_name: str = "efficientnet-b0",
    in_channels: int = 1,
    classes: int = 1,
    decoder_channels: tuple = (256, 128, 64, 32, 16),
    **_: Any,
) -> nn.Module:
    """Build the lesion segmenter from plain arguments (those stored in a bundle manifest)."""
    if architecture not in SEGMENTER_ARCHITECTURES:
        raise ValueError(f"unknown segmenter architecture {architecture!r}; known: {SEGMENTER_ARCHITECTURES}")
    import segmentation_models_pytorch as smp

    return smp.Unet(
        encoder_name=encoder_name,
        encoder_weights=None,
        in_channels=in_channels,
        classes=classes,
        decoder_channels=tuple(decoder_channels),
    )
