"""Batch norm folded into the convolution before it (inference only): the folded network computes what the
original computes, on a real segmentation-models-pytorch UNet with EfficientNet-b0 encoder whose batch-norm
statistics and affine parameters are set to seeded random values (at initialisation they are the identity, and a
wrong fold could not show)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from BreastDLRLib.networks.fold import count_batchnorms, fold_batchnorm
from BreastDLRLib.networks.segmenter import build_segmenter
from BreastDLRLib.segmentation import SliceSegmenter
from BreastDLRLib.volume import Volume


def _randomise_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return _randomise_batchnorms(build_segmenter()).eval()


def test_folded_unet_computes_the_same_logits(unet):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    folded = fold_batchnorm(unet)
    assert count_batchnorms(unet) == 59
    assert count_batchnorms(folded) == 0           # 58 folded; the 59th (after the unused head) is never called
    x = torch.randn(3, 1, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = unet(x), folded(x)
        # another batch size and grid than the one traced with nothing: the trace holds no shapes
        want2, got2 = unet(x[:1, :, :32, :32]), folded(x[:1, :, :32, :32])
    assert want.abs().max() > 1.0                   # not a trivially small output
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got2, want2, atol=1e-4, rtol=1e-4)
    for k, v in unet.state_dict().items():          # the network given is left as it was
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_a_batchnorm_read_by_two_layers_is_not_folded():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.other = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + self.other(y)       # the convolution's output is also read elsewhere

    m = _randomise_batchnorms(Branch()).eval()
    assert fold_batchnorm(m) is m


def test_untraceable_network_comes_back_unchanged():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            if x.sum() > 0:                         # control flow on values: torch.fx cannot trace this
                return self.bn(self.conv(x))
            return x

    m = Branchy().eval()
    assert fold_batchnorm(m) is m


def test_training_mode_is_refused(unet):
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(build_segmenter().train())


def test_segmenter_folds_by_default_and_probabilities_agree(unet):
    rng = np.random.default_rng(0)
    vol = Volume(rng.integers(0, 255, (2, 50, 70)).astype(np.uint8), spacing=(1.0, 0.2, 0.2))
    folded = SliceSegmenter(unet, size=64, device="cpu")
    plain = SliceSegmenter(unet, size=64, device="cpu", fold_bn=False)
    assert count_batchnorms(folded.model) == 0 and count_batchnorms(plain.model) == 59
    a, b = folded(vol).probability.array.astype(np.float32), plain(vol).probability.array.astype(np.float32)
    assert np.abs(a - b).max() < 2e-3               # float16 probabilities: a few units in their last place
