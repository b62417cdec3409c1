"""The segmenter's left-right mirror test-time augmentation: exactly the mean of the two passes' logits, on single
images only, declared by the bundle and recorded in the results.  A real UNet with seeded random weights (its
output is not meaningful, the arithmetic is)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from BreastDLRLib.bundles import open_bundle, save_bundle
from BreastDLRLib.errors import InputError
from BreastDLRLib.networks.segmenter import build_segmenter
from BreastDLRLib.segmentation import SliceSegmenter, to_network_grid
from BreastDLRLib.volume import Volume


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_segmenter().eval()


def _image(shape=(1, 50, 70), seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 255, shape).astype(np.uint8)
    a[:, 10:30, 5:25] = 30                                  # something left-right asymmetric
    return Volume(a, spacing=(1.0, 0.2, 0.2))


def test_mirror_logits_are_the_mean_of_both_passes(unet):
    seg = SliceSegmenter(unet, size=64, device="cpu", hflip_single_images=True)
    sl = torch.from_numpy(_image().array.astype(np.float32))
    with torch.no_grad():
        x = to_network_grid(sl, 64, "zscore")
        plain = seg.model(x).float()                    # the network the segmenter runs (batch norms folded)
        mirrored = seg.model(x.flip(-1)).float().flip(-1)
        want = torch.nn.functional.interpolate((plain + mirrored) / 2, size=(50, 70), mode="bilinear",
                                               align_corners=False)[:, 0]
    got = seg.logits_for(sl, hflip=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seg.logits_for(sl, hflip=False), got, atol=1e-4)      # the mirror changed something


def test_mirror_only_on_single_images(unet):
    seg = SliceSegmenter(unet, size=64, device="cpu", hflip_single_images=True)
    one = seg(_image())
    assert one.test_time_augmentation == ("hflip",)
    vol = _image((3, 50, 70))
    three = seg(vol)
    assert three.test_time_augmentation == ()
    plain = SliceSegmenter(unet, size=64, device="cpu")(vol)
    np.testing.assert_array_equal(three.probability.array, plain.probability.array)   # volumes: one pass per slice
    assert SliceSegmenter(unet, size=64, device="cpu")(_image()).test_time_augmentation == ()


def _seg_bundle(folder, unet, tta):
    inp = {"size": [64, 64], "normalisation": "zscore"}
    if tta is not None:
        inp["test_time_augmentation"] = tta
    return save_bundle(folder, unet, {
        "name": "t-seg", "version": "0", "role": "segmenter", "architecture": "Unet",
        "arguments": {"encoder_name": "efficientnet-b0", "in_channels": 1, "classes": 1}, "input": inp,
        "labels": ["background", "lesion"], "thresholds": {"probability": 0.5}, "provenance": {"data": "none"},
        "metrics": {}, "licence": "Apache-2.0", "intended_use": "Tests only."}, "card").path


def test_the_bundle_declares_it_and_unknown_augmentations_are_refused(unet, tmp_path):
    assert SliceSegmenter.from_bundle(open_bundle(_seg_bundle(tmp_path / "a", unet, ["hflip"])), "cpu").hflip_single_images
    assert not SliceSegmenter.from_bundle(open_bundle(_seg_bundle(tmp_path / "b", unet, None)), "cpu").hflip_single_images
    with pytest.raises(InputError, match="vflip"):
        SliceSegmenter.from_bundle(open_bundle(_seg_bundle(tmp_path / "c", unet, ["vflip"])), "cpu")


def test_findings_and_lesions_record_the_segmenters_augmentation(unet, tmp_path):
    from BreastDLRLib.outputs import write_segmentation
    from BreastDLRLib.pipeline import Pipeline

    pipe = Pipeline({"segmenter": open_bundle(_seg_bundle(tmp_path / "s", unet, ["hflip"]))}, device="cpu")
    res = pipe.segment(_image())
    assert res.segmentation_tta == ("hflip",)
    write_segmentation(tmp_path / "out", res)
    doc = json.loads((tmp_path / "out" / "lesions.json").read_text())
    assert doc["segmentation"] == {"precision": "fp32", "test_time_augmentation": ["hflip"]}
    assert pipe.segment(_image((2, 50, 70))).segmentation_tta == ()
