"""Classifiers of published DLR systems: fusion arithmetic, missing planes, shapes, frame averaging,
manifest round trip.  Small ResNet18 trunks on 64×64 inputs keep it fast on CPU."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torchvision import models as tv_models

from BreastDLRLib.errors import ModelBundleError
from BreastDLRLib.networks.classifiers import (
    EmbeddingNet,
    FramePrediction,
    PlaneView,
    ResNetTrunk,
    ThreePlaneFusion,
    build_classifier,
    predict_frames,
)

PLANES = ("transverse", "sagittal", "coronal")
C18 = 512


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads make backward passes crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FixedFeatures(nn.Module):
    """Stands in for a trunk: returns given features and counts its calls."""

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        self.features = features
        self.calls = 0

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.features[: x.shape[0], :, None, None]    # a 1×1 map

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        return torch.flatten(feature_map, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(x))


def _hand_logits(model: ThreePlaneFusion, ft: np.ndarray, fs: np.ndarray, fc: np.ndarray) -> np.ndarray:
    """Add, concatenate, Linear + ReLU, Linear — in float64 numpy, independent of the module code."""
    w1 = model.reduce.weight.detach().double().numpy()
    b1 = model.reduce.bias.detach().double().numpy()
    w2 = model.classifier.weight.detach().double().numpy()
    b2 = model.classifier.bias.detach().double().numpy()
    z = np.concatenate([ft + fs, fc], axis=1)
    h = np.maximum(z @ w1.T + b1, 0.0)
    return h @ w2.T + b2


@pytest.fixture(scope="module")
def fusion_with_fixed_trunks():
    torch.manual_seed(0)
    model = ThreePlaneFusion(backbone="resnet18", dropout=0.3).eval()
    gen = torch.Generator().manual_seed(1)
    feats = {p: torch.rand(2, C18, generator=gen) for p in PLANES}
    for p in PLANES:
        model.trunks[p] = FixedFeatures(feats[p])
    return model, {p: f.double().numpy() for p, f in feats.items()}


def _images(b: int = 2, size: int = 64) -> dict:
    return {p: torch.randn(b, 3, size, size) for p in PLANES}


def test_trunk_equals_torchvision_resnet_without_fc():
    torch.manual_seed(0)
    ref = tv_models.resnet18(weights=None).eval()
    trunk = ResNetTrunk("resnet18").eval()
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    trunk.load_state_dict(state, strict=True)
    ref.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), ref(x))
    assert trunk.out_features == C18
    assert ResNetTrunk("resnet50").out_features == 2048


def test_fusion_arithmetic_matches_hand_computation(fusion_with_fixed_trunks):
    model, f = fusion_with_fixed_trunks
    with torch.no_grad():
        logits = model(_images()).double().numpy()
        emb = model.embed(_images()).double().numpy()
    np.testing.assert_allclose(logits, _hand_logits(model, f["transverse"], f["sagittal"], f["coronal"]), rtol=1e-5, atol=1e-5)
    w1 = model.reduce.weight.detach().double().numpy()
    b1 = model.reduce.bias.detach().double().numpy()
    z = np.concatenate([f["transverse"] + f["sagittal"], f["coronal"]], axis=1)
    np.testing.assert_allclose(emb, np.maximum(z @ w1.T + b1, 0), rtol=1e-5, atol=1e-5)
    assert emb.shape == (2, C18) and model.reduce.in_features == 2 * C18 and model.reduce.out_features == C18


def test_fusion_roles_sum_is_symmetric_concat_is_not(fusion_with_fixed_trunks):
    model, f = fusion_with_fixed_trunks
    with torch.no_grad():
        swapped_ts = model.fuse_features({"transverse": torch.tensor(f["sagittal"]).float(),
                                          "sagittal": torch.tensor(f["transverse"]).float(),
                                          "coronal": torch.tensor(f["coronal"]).float()})
        normal = model.fuse_features({p: torch.tensor(v).float() for p, v in f.items()})
        swapped_tc = model.fuse_features({"transverse": torch.tensor(f["coronal"]).float(),
                                          "sagittal": torch.tensor(f["sagittal"]).float(),
                                          "coronal": torch.tensor(f["transverse"]).float()})
    torch.testing.assert_close(swapped_ts, normal)
    assert not torch.allclose(swapped_tc, normal)


def test_missing_planes_are_zero_features_and_their_trunks_do_not_run(fusion_with_fixed_trunks):
    model, f = fusion_with_fixed_trunks
    zeros = np.zeros_like(f["transverse"])
    x = torch.randn(2, 3, 64, 64)
    calls = {p: model.trunks[p].calls for p in PLANES}
    with torch.no_grad():
        only_t = model({"transverse": x}).double().numpy()
        only_t_4d = model(x).double().numpy()
        t_and_s = model({"transverse": x, "sagittal": x, "coronal": None}).double().numpy()
    np.testing.assert_allclose(only_t, _hand_logits(model, f["transverse"], zeros, zeros), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(only_t_4d, only_t, rtol=0, atol=0)
    np.testing.assert_allclose(t_and_s, _hand_logits(model, f["transverse"], f["sagittal"], zeros), rtol=1e-5, atol=1e-5)
    assert model.trunks["coronal"].calls == calls["coronal"]  # never run for a missing plane
    assert model.trunks["transverse"].calls == calls["transverse"] + 3


def test_plane_mask_is_per_sample(fusion_with_fixed_trunks):
    model, f = fusion_with_fixed_trunks
    mask = torch.tensor([[True, False, True], [True, True, False]])
    with torch.no_grad():
        logits = model(_images(), plane_mask=mask).double().numpy()
    expected0 = _hand_logits(model, f["transverse"][:1], 0 * f["sagittal"][:1], f["coronal"][:1])
    expected1 = _hand_logits(model, f["transverse"][1:], f["sagittal"][1:], 0 * f["coronal"][1:])
    np.testing.assert_allclose(logits, np.concatenate([expected0, expected1]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no plane"):
        model(_images(), plane_mask=torch.tensor([[False, False, False], [True, True, True]]))
    with pytest.raises(ValueError, match="plane_mask must have shape"):
        model(_images(), plane_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown plane"):
        model({"axial": torch.randn(2, 3, 64, 64)})


@pytest.fixture(scope="module")
def real_fusion() -> ThreePlaneFusion:
    torch.manual_seed(0)
    return ThreePlaneFusion(backbone="resnet18", dropout=0.0).eval()


def test_three_plane_shapes_grey_input_and_gradcam_layers(real_fusion):
    model = real_fusion
    x = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        assert model.embed(x).shape == (2, C18)
        grey = torch.randn(1, 3, 1, 64, 64)
        torch.testing.assert_close(model(grey), model(grey.expand(-1, -1, 3, -1, -1)))
    layers = model.feature_layers()
    assert set(layers) == set(PLANES)
    assert len({id(m) for m in layers.values()}) == 3
    captured, handles = {}, []
    for p, layer in layers.items():
        assert layer is model.taps[p]   # the pass-through on that plane's last feature map
        handles.append(layer.register_forward_hook(lambda mod, inp, out, p=p: captured.__setitem__(p, out)))
    try:
        logits = model(x)
        assert logits.shape == (2, 2)
        logits[:, 1].sum().backward()
    finally:
        for h in handles:
            h.remove()
    for p in PLANES:
        assert captured[p].shape == (2, C18, 2, 2)  # 64 / 32
        assert model.trunks[p].layer4[-1].conv2.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_plane_view_feeds_one_plane_and_works_with_grad_cam(real_fusion):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = real_fusion
    x = _images(b=1)
    view = PlaneView(model, x, "sagittal")
    with torch.no_grad():
        torch.testing.assert_close(view(x["sagittal"]), model(x))
        assert not torch.allclose(view(torch.zeros_like(x["sagittal"])), model(x))
    with GradCAM(model=view, target_layers=[model.feature_layers()["sagittal"]]) as cam:
        heat = cam(input_tensor=x["sagittal"], targets=[ClassifierOutputTarget(1)])
    assert heat.shape == (1, 64, 64) and np.isfinite(heat).all() and heat.min() >= 0
    with pytest.raises(ValueError, match="unknown plane"):
        PlaneView(model, x, "axial")


def test_embedding_net_logits_are_a_linear_map_of_the_embedding():
    torch.manual_seed(0)
    net = EmbeddingNet(backbone="resnet18", embedding_dim=128).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        emb = net.embed(x)
        logits = net(x)
        grey = torch.randn(3, 1, 64, 64)
        torch.testing.assert_close(net(grey), net(grey.expand(-1, 3, -1, -1)))
    assert emb.shape == (3, 128) and logits.shape == (3, 2)
    assert (emb >= 0).all()
    w, b = net.classifier.weight.detach().double().numpy(), net.classifier.bias.detach().double().numpy()
    np.testing.assert_allclose(logits.double().numpy(), emb.double().numpy() @ w.T + b, rtol=1e-5, atol=1e-5)
    assert net.feature_width == C18 and net.embedding.in_features == C18
    one = EmbeddingNet(backbone="resnet18", in_channels=1).eval()
    assert one.trunk.conv1.in_channels == 1
    with torch.no_grad():
        assert one(grey).shape == (3, 2)
    with pytest.raises(ValueError, match="channels"):
        net(torch.randn(1, 2, 64, 64))


class LogitsFromPixels(nn.Module):
    """A 'model' whose logits for a frame are its first two pixel values."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_grad = []

    def forward(self, x):
        self.seen_grad.append(torch.is_grad_enabled())
        return x.flatten(1)[:, :2] * 1.0


def test_predict_frames_averages_softmax_by_hand():
    logits = np.array([[0.0, 2.0], [1.0, -1.0], [3.0, 3.0], [-2.0, 0.5], [0.0, 0.0]])
    frames = np.zeros((5, 1, 2, 2), dtype=np.float32)
    frames[:, 0, 0, :] = logits
    p_frames = np.exp(logits[:, 1]) / np.exp(logits).sum(1)
    model = LogitsFromPixels().train()
    pred = predict_frames(model, frames, batch_size=2)
    assert isinstance(pred, FramePrediction)
    np.testing.assert_allclose(pred.frame_probabilities, p_frames, rtol=1e-6)
    assert pred.probability == pytest.approx(p_frames.mean(), rel=1e-6)
    assert float(pred) == pred.probability
    assert pred.malignant == (p_frames.mean() >= 0.5)
    assert model.training and not any(model.seen_grad)  # eval + no_grad during, flag restored after
    assert predict_frames(model, frames, threshold=p_frames.mean() - 1e-6).malignant
    assert not predict_frames(model, frames, threshold=min(1.0, p_frames.mean() + 1e-6)).malignant
    benign_first = predict_frames(model, frames, positive_index=0)
    assert benign_first.probability == pytest.approx(1 - p_frames.mean(), rel=1e-6)
    with pytest.raises(ValueError):
        predict_frames(model, frames[:0])


def test_predict_frames_hflip_tta_by_hand():
    """The model reads its two logits from the first row's two pixels: mirrored left-right they swap, so the
    mirrored probability is 1 - p and the TTA mean is exactly 0.5; an unknown TTA is refused."""
    logits = np.array([[0.0, 2.0], [1.0, -1.0], [-2.0, 0.5]])
    frames = np.zeros((3, 1, 2, 2), dtype=np.float32)
    frames[:, 0, 0, :] = logits
    frames[:, 0, 1, :] = [[5.0, 7.0]] * 3                     # row 1 is ignored by the model
    model = LogitsFromPixels()
    plain = predict_frames(model, frames)
    assert not np.allclose(plain.frame_probabilities, 0.5)
    pred = predict_frames(model, frames, tta=("hflip",))
    np.testing.assert_allclose(pred.frame_probabilities, 0.5, rtol=1e-6)
    assert pred.probability == pytest.approx(0.5)
    with pytest.raises(ModelBundleError, match="vflip"):
        predict_frames(model, frames, tta=("vflip",))


def test_predict_frames_with_plane_dict(fusion_with_fixed_trunks):
    model, f = fusion_with_fixed_trunks
    frames = {"transverse": torch.randn(2, 3, 64, 64), "sagittal": torch.randn(2, 3, 64, 64)}
    zeros = np.zeros_like(f["coronal"])
    logits = _hand_logits(model, f["transverse"], f["sagittal"], zeros)
    p = np.exp(logits[:, 1]) / np.exp(logits).sum(1)
    pred = predict_frames(model, frames, batch_size=1)
    # batch_size 1 feeds one frame at a time; FixedFeatures then returns row 0 each time
    p0 = p[0]
    np.testing.assert_allclose(pred.frame_probabilities, [p0, p0], rtol=1e-5)
    pred2 = predict_frames(model, frames, batch_size=2)
    np.testing.assert_allclose(pred2.frame_probabilities, p, rtol=1e-5)


@pytest.mark.parametrize("arch,kwargs", [
    ("ThreePlaneFusion", {"backbone": "resnet18", "dropout": 0.2}),
    ("EmbeddingNet", {"backbone": "resnet18", "embedding_dim": 16, "in_channels": 1}),
])
def test_build_classifier_round_trip(arch, kwargs):
    torch.manual_seed(0)
    model = build_classifier(arch, **kwargs).eval()
    config = json.loads(json.dumps(model.config()))
    assert config["architecture"] == arch
    torch.manual_seed(123)
    rebuilt = build_classifier(config["architecture"], **config["arguments"]).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 1 if kwargs.get("in_channels") == 1 else 3, 64, 64)
    x = x[:, 0] if arch == "EmbeddingNet" else x
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    assert rebuilt.config() == config


def test_build_classifier_refuses_unknown_arch_and_bad_arguments():
    with pytest.raises(ModelBundleError, match="UNet3000"):
        build_classifier("UNet3000")
    with pytest.raises(ModelBundleError, match="EmbeddingNet"):
        build_classifier("EmbeddingNet", backbone="resnet18", widht=3)
    with pytest.raises(ModelBundleError, match="backbone"):
        build_classifier("EmbeddingNet", backbone="vgg16")
    with pytest.raises(ModelBundleError, match="three distinct"):
        build_classifier("ThreePlaneFusion", backbone="resnet18", planes=["a", "a", "b"])


def test_vgg_trunk_equals_torchvision_vgg11_features_pooled():
    from BreastDLRLib.networks.classifiers import VGGTrunk

    torch.manual_seed(0)
    ref = tv_models.vgg11_bn(weights=None).eval()
    trunk = VGGTrunk("vgg11_bn").eval()
    trunk.load_state_dict({k: v for k, v in ref.state_dict().items() if k.startswith("features.")}, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = ref.features(x).mean(dim=(2, 3))
        torch.testing.assert_close(trunk(x), want)
    assert trunk.out_features == 512
    # Grad-CAM's target is the activation that is pooled: the last ReLU, not in place
    last = trunk.last_conv_block()
    assert isinstance(last, nn.ReLU) and not last.inplace and last is list(trunk.features)[-2]


def test_embedding_net_on_vgg11_explains_with_grad_cam():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    net = EmbeddingNet(backbone="vgg11_bn", embedding_dim=16).eval()
    assert net.config()["arguments"]["backbone"] == "vgg11_bn"
    x = torch.rand(1, 3, 64, 64)
    with GradCAM(model=net, target_layers=[net.feature_layers()["image"]]) as cam:
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(1)])
    assert heat.shape == (1, 64, 64) and np.isfinite(heat).all()
    with pytest.raises(ModelBundleError, match="not valid"):
        build_classifier("EmbeddingNet", backbone="vgg13")


def test_ensemble_head_on_the_ensembles_embedding_gives_its_probabilities():
    """EnsembleNet.classifier(EnsembleNet.embed(x)) is the ensemble's output (what a sibling ensemble on the same
    trunks computes from this one's embedding); a wrong width is refused."""
    from BreastDLRLib.networks.classifiers import EnsembleNet

    torch.manual_seed(0)
    ens = EnsembleNet("EmbeddingNet", {"backbone": "resnet18", "embedding_dim": 8}, n_members=3).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feats = ens.embed(x)
        assert feats.shape == (2, 24)
        torch.testing.assert_close(torch.softmax(ens.classifier(feats), 1), torch.softmax(ens(x), 1))
        with pytest.raises(ValueError, match="24 wide"):
            ens.classifier(feats[:, :16])
    assert not any("heads" in k for k in ens.state_dict())            # a view on the members' layers, stored once


def test_efficientnet_trunk_takes_over_the_segmenter_encoder_exactly():
    """A classifier started from the segmenter sees, on a grey image replicated to 3 channels, exactly the
    features the segmenter's encoder computes on the standardised 1-channel image (the stem spread over the
    channels); Grad-CAM runs on its last block."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from BreastDLRLib.networks.segmenter import build_segmenter

    torch.manual_seed(0)
    seg = build_segmenter(in_channels=1).eval()
    net = EmbeddingNet(backbone="efficientnet-b0", embedding_dim=16).eval()
    assert net.trunk.load_segmenter_encoder(seg.state_dict()) == len(net.trunk.encoder.state_dict())
    grey = torch.rand(2, 1, 64, 64) * 255
    z = (grey - grey.mean(dim=(1, 2, 3), keepdim=True)) / grey.std(dim=(1, 2, 3), keepdim=True)
    with torch.no_grad():
        want = seg.encoder(z)[-1].mean(dim=(2, 3))
        torch.testing.assert_close(net.trunk(grey.repeat(1, 3, 1, 1)), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(net.trunk(grey.repeat(1, 3, 1, 1)), net.trunk(grey))
    assert net.trunk.out_features == 320 and net.config()["arguments"]["backbone"] == "efficientnet-b0"
    with GradCAM(model=net, target_layers=[net.feature_layers()["image"]]) as cam:
        heat = cam(input_tensor=grey[:1].repeat(1, 3, 1, 1) / 255, targets=[ClassifierOutputTarget(1)])
    assert heat.shape == (1, 64, 64) and np.isfinite(heat).all()
    # an encoder of another kind does not fit
    other = build_segmenter(encoder_name="resnet18", in_channels=1)
    with pytest.raises(ValueError, match="does not fit"):
        net.trunk.load_segmenter_encoder(other.state_dict())
