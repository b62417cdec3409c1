"""Ultrasound-suitable augmentation (MONAI dictionary transforms), shared by every training recipe.

Left-right flips only (depth has a direction: skin on top, shadows below), a small affine, gamma and gain.
"""
from __future__ import annotations


def ultrasound_augmenter(seed: int, with_mask: bool, affine_prob: float, scale: float, translate: int):
    """A seeded MONAI ``Compose`` over ``{"image"[, "mask"]}`` (the mask follows the geometry, nearest-neighbour)."""
    from monai.transforms import Compose, RandAdjustContrastd, RandAffined, RandFlipd, RandScaleIntensityd

    keys = ("image", "mask") if with_mask else ("image",)
    t = Compose([
        RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
        RandAffined(keys=keys, prob=affine_prob, rotate_range=(0.17,), scale_range=(scale, scale),
                    translate_range=(translate, translate),
                    mode=("bilinear", "nearest") if with_mask else "bilinear", padding_mode="zeros"),
        RandAdjustContrastd(keys=("image",), prob=0.5, gamma=(0.7, 1.5)),
        RandScaleIntensityd(keys=("image",), prob=0.5, factors=0.2),
    ])
    t.set_random_state(seed)
    return t
