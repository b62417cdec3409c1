"""Grad-CAM per plane (localisation on a trained toy model, no hooks left) and painting back onto the grid."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from BreastDLRLib.explain import gradcam_planes, heatmap_to_volume, jet, overlay_png, overlay_rgb
from BreastDLRLib.planes import PLANES, crop_planes
from BreastDLRLib.volume import Volume

SIZE = 64
RADIUS = 5


# ---------------------------------------------------------------------------------------------- toy data
def _images(rng: np.random.Generator, n: int, with_blob: np.ndarray):
    """Noisy 64×64 grey images; where ``with_blob``, a bright disc of radius 5 at a random position."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    imgs = rng.normal(0.3, 0.1, size=(n, SIZE, SIZE)).astype(np.float32)
    centres = rng.integers(RADIUS + 3, SIZE - RADIUS - 3, size=(n, 2))
    for b in range(n):
        if with_blob[b]:
            cy, cx = centres[b]
            imgs[b][(yy - cy) ** 2 + (xx - cx) ** 2 <= RADIUS**2] += 0.5
    x = torch.from_numpy(np.repeat(imgs[:, None], 3, axis=1))
    return x, centres


def _branch() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()),  # last conv stage (32×32)
    )


class _Single(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = _branch()
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        return self.head(self.features(x).amax(dim=(2, 3)))  # global max pooling: learns in a few dozen steps


class _DictModel(nn.Module):
    """A three-plane model taking a dict: one branch per plane, per-plane logits summed."""

    def __init__(self, single: _Single) -> None:
        super().__init__()
        self.branches = nn.ModuleDict({p: copy.deepcopy(single.features) for p in PLANES})
        self.head = copy.deepcopy(single.head)

    def forward(self, x: dict):
        return sum(self.head(self.branches[p](x[p]).amax(dim=(2, 3))) for p in PLANES if p in x)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions gain nothing from threads, and lose a lot on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(one_thread):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = _Single()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(40):
        y = rng.integers(0, 2, size=32)
        x, _ = _images(rng, 32, y.astype(bool))
        loss = nn.functional.cross_entropy(net(x), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    y = rng.integers(0, 2, size=128)
    x, _ = _images(rng, 128, y.astype(bool))
    with torch.no_grad():
        acc = float((net(x).argmax(1).numpy() == y).mean())
    assert acc >= 0.9, f"toy model did not learn the task (accuracy {acc:.2f})"
    return _DictModel(net)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


# ---------------------------------------------------------------------------------------------- Grad-CAM
def test_gradcam_localises_blob_in_its_plane(trained):
    model = trained
    rng = np.random.default_rng(123)  # held-out images
    layers = {p: model.branches[p][-1] for p in PLANES}
    box = 2 * (RADIUS + 2) + 1  # disc ± 2 px: the last stage is 2× coarser than the image
    area_fraction = box**2 / SIZE**2  # 0.055: the share a uniform (non-localising) CAM would give
    shares, hits = [], 0
    for t in range(8):
        x, centres = _images(rng, 3, np.array([True, False, False]))
        plane = PLANES[t % 3]  # the blob goes into this plane; the other two get noise
        order = [plane] + [p for p in PLANES if p != plane]
        inputs = {p: x[order.index(p)][None] for p in PLANES}
        with torch.no_grad():  # gradients are switched on inside
            cams = gradcam_planes(model, inputs, layers, target_class=1)
        assert set(cams) == set(PLANES)
        cam = cams[plane]
        assert cam.shape == (SIZE, SIZE) and cam.min() >= 0 and cam.max() <= 1
        cy, cx = centres[0]
        sl = (slice(cy - RADIUS - 2, cy + RADIUS + 3), slice(cx - RADIUS - 2, cx + RADIUS + 3))
        shares.append(cam[sl].sum() / cam.sum())
        hits += int(np.unravel_index(np.argmax(cam), cam.shape) in
                    {(r, c) for r in range(sl[0].start, sl[0].stop) for c in range(sl[1].start, sl[1].stop)})
    # Bound: a CAM that ignores the blob (uniform, or computed for another plane, or transposed) puts about
    # area_fraction of its mass in the box.  We ask for 5× that (27 %): the blob then clearly dominates, yet
    # the bound leaves room for numerical drift (this seeded model measures >= 95 % on these images).
    assert min(shares) >= 5 * area_fraction, shares
    assert hits >= 7, hits
    assert _hooks(model) == 0


def test_gradcam_restores_model_state_and_layouts(trained):
    model = trained
    model.train()
    p0 = next(model.parameters())
    sentinel = torch.full_like(p0, 0.25)
    p0.grad = sentinel.clone()
    rng = np.random.default_rng(7)
    x, _ = _images(rng, 3, np.array([True, True, True]))
    stacked = x[None]  # (B=1, P=3, 3, H, W), as to_tensor_batch lays it out
    layers = {p: model.branches[p][-1] for p in PLANES}
    with torch.no_grad():
        a = gradcam_planes(model, stacked, layers)
        b = gradcam_planes(model, {p: x[i][None] for i, p in enumerate(PLANES)}, layers)
        c = gradcam_planes(model, stacked, layers, plane_mask=[True, False, True])
        assert gradcam_planes(model, stacked, layers, plane_mask=[False, False, False]) == {}
    assert _hooks(model) == 0
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(p0.grad, sentinel)
    for p in PLANES:
        np.testing.assert_allclose(a[p], b[p], atol=1e-6)
    assert set(c) == {"transverse", "coronal"}
    model.eval()
    p0.grad = None


def test_gradcam_single_logit_model(one_thread):
    torch.manual_seed(1)

    class OneLogit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = _branch()
            self.fc = nn.Linear(32, 1)

        def forward(self, x: dict):
            return {"logits": self.fc(self.b(x["transverse"]).mean(dim=(2, 3)))}

    m = OneLogit()
    x = torch.rand(1, 3, 32, 32)
    pos = gradcam_planes(m, {"transverse": x}, {"transverse": m.b[-1]}, target_class=1)["transverse"]
    neg = gradcam_planes(m, {"transverse": x}, {"transverse": m.b[-1]}, target_class=0)["transverse"]
    assert pos.shape == (32, 32) and neg.shape == (32, 32)
    assert not np.allclose(pos, neg)  # class 0 uses the negated logit: different channel weights
    assert _hooks(m) == 0


def _library_gradcam(model, inputs: dict, layer_of: dict, target_class: int) -> dict:
    """Reference: pytorch-grad-cam's own ``GradCAM``, run plane by plane with the other planes held fixed (how
    BreastDLR computed Grad-CAM until 2026-12-03: three forward and three full backward passes)."""
    from pytorch_grad_cam import GradCAM

    out = {}
    for plane, layers in layer_of.items():
        class OnePlane(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = model

            def forward(self, x, plane=plane):
                return self.net({**inputs, plane: x})

        layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
        with GradCAM(model=OnePlane(), target_layers=layers) as cam:
            res = cam(input_tensor=inputs[plane].clone().requires_grad_(True),
                      targets=[lambda o: o[target_class]] * inputs[plane].shape[0])
        out[plane] = res[0] if res.shape[0] == 1 else res
    return out


@pytest.mark.parametrize("target_class", [0, 1])
def test_gradcam_one_pass_equals_the_library_plane_by_plane(trained, target_class):
    model = trained
    rng = np.random.default_rng(5)
    x, _ = _images(rng, 6, np.array([True, False, True, True, False, False]))
    inputs = {p: x[2 * i:2 * i + 2] for i, p in enumerate(PLANES)}   # a batch of two per plane
    layers = {p: model.branches[p][-1] for p in PLANES}
    ours = gradcam_planes(model, inputs, layers, target_class=target_class)
    ref = _library_gradcam(model, inputs, layers, target_class)
    for p in PLANES:
        assert ours[p].shape == (2, SIZE, SIZE)
        np.testing.assert_allclose(ours[p], ref[p], atol=1e-5)
    assert ours["transverse"][0].max() == pytest.approx(1.0)   # not an empty map: scaled to [0, 1]
    assert _hooks(model) == 0


def test_gradcam_of_a_shared_trunk_sees_each_plane(one_thread):
    """The ABVS model's planes share one ResNet: its layers run three times per forward, so Grad-CAM hooked on
    them paired one plane's gradients with another plane's maps.  The network's per-plane taps give each plane
    its own map; the shared layer itself is refused."""
    from BreastDLRLib.networks.classifiers import ThreePlaneFusion

    torch.manual_seed(3)
    model = ThreePlaneFusion(backbone="resnet18", dropout=0.0, shared_trunk=True).eval()
    rng = np.random.default_rng(9)
    x, _ = _images(rng, 3, np.array([True, True, True]))
    inputs = {p: x[i:i + 1] for i, p in enumerate(PLANES)}
    layers = model.feature_layers()
    assert len({id(m) for m in layers.values()}) == 3
    ours = gradcam_planes(model, inputs, layers, target_class=1)
    ref = _library_gradcam(model, inputs, layers, 1)
    for p in PLANES:
        assert ours[p].shape == (SIZE, SIZE)
        np.testing.assert_allclose(ours[p], ref[p], atol=1e-5)
    # the planes' images differ, and so do their maps (the shared-layer bug gave the transverse map to all three)
    assert not np.allclose(ours["transverse"], ours["sagittal"], atol=1e-3)
    shared_layer = model.trunks["shared"].layer4[-1]
    with pytest.raises(ValueError, match="ran 3 times"):
        gradcam_planes(model, inputs, {"sagittal": shared_layer})
    with pytest.raises(ValueError, match="one target module per plane"):
        gradcam_planes(model, inputs, {"transverse": layers["sagittal"], "sagittal": layers["sagittal"]})
    assert _hooks(model) == 0


def test_gradcam_of_an_ensemble_averages_its_members(one_thread):
    from BreastDLRLib.networks.classifiers import EnsembleNet

    torch.manual_seed(4)
    ens = EnsembleNet("EmbeddingNet", {"backbone": "resnet18", "embedding_dim": 16, "dropout": 0.0}, n_members=2).eval()

    class DictInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = ens

        def forward(self, x: dict):
            return self.net(x["transverse"])

    net = DictInput()
    x, _ = _images(np.random.default_rng(2), 1, np.array([True]))
    layers = {"transverse": ens.feature_layers()["image"]}
    assert len(layers["transverse"]) == 2
    ours = gradcam_planes(net, {"transverse": x}, layers, target_class=1)
    ref = _library_gradcam(net, {"transverse": x}, layers, 1)
    np.testing.assert_allclose(ours["transverse"], ref["transverse"], atol=1e-5)


# ---------------------------------------------------------------------------------------------- painting
def _affine_inverse(crop, kji):
    """(r, c) of array indices from three forward-mapped pixels (independent of the crop's own inverse)."""
    p00 = crop.crop_to_array_index(0, 0)
    dr = crop.crop_to_array_index(1, 0) - p00
    dc = crop.crop_to_array_index(0, 1) - p00
    m = np.stack([dr, dc], axis=1)  # (3, 2)
    sol, *_ = np.linalg.lstsq(m, (np.asarray(kji, float) - p00).reshape(-1, 3).T, rcond=None)
    return sol[0], sol[1]


@pytest.fixture(scope="module")
def painted_setup():
    shape = (30, 40, 50)
    vol = Volume(np.random.default_rng(5).uniform(size=shape), spacing=(0.2, 0.2, 0.5))
    bbox = [(10, 16), (14, 24), (18, 30)]
    centre = (12.6, 18.5, 23.5)
    n = 48
    crops = {p: fr[0] for p, fr in crop_planes(vol, bbox, centre, size=n).items()}
    r, c = np.mgrid[0:n, 0:n].astype(float)
    # linear CAMs (bilinear sampling reproduces them exactly), positive everywhere in the footprint
    coef = {"transverse": (0.6, 0.3), "sagittal": (0.2, 0.7), "coronal": (0.45, 0.45)}
    cams = {p: (0.05 + (a * r + b * c) / (n - 1)).astype(np.float32) for p, (a, b) in coef.items()}
    return vol, crops, cams, coef, n


def test_heatmap_to_volume_paints_slabs_exactly(painted_setup):
    vol, crops, cams, coef, n = painted_setup
    out = heatmap_to_volume(vol, crops, cams)
    assert out.shape == vol.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    k, j, i = np.meshgrid(*[np.arange(s) for s in vol.shape], indexing="ij")
    grid = np.stack([k, j, i], axis=-1).astype(float)
    expected = np.zeros(vol.shape)
    for p, crop in crops.items():
        f = crop.fixed_axis
        in_slab = grid[..., f] == round(crop.origin_kji[f])
        r, c = _affine_inverse(crop, grid[in_slab])
        inside = (r >= -0.5) & (r <= n - 0.5) & (c >= -0.5) & (c <= n - 0.5)
        a, b = coef[p]
        val = np.where(inside, 0.05 + (a * np.clip(r, 0, n - 1) + b * np.clip(c, 0, n - 1)) / (n - 1), 0.0)
        e = np.zeros(vol.shape)
        e[in_slab] = val
        expected = np.maximum(expected, e)
    # zero outside the slabs and footprints, the CAM value (max over planes) inside
    np.testing.assert_array_equal(out > 0, expected > 0)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # the three slabs meet at the centre voxel: the max of the three planes' values there
    cv = [0, 0, 0]
    for crop in crops.values():
        cv[crop.fixed_axis] = crop.fixed_index  # the voxel where the three slabs cross
    cv = tuple(cv)
    assert cv == (13, 19, 24)  # centre (12.6, 18.5, 23.5) rounded half up
    vals = []
    for p, crop in crops.items():
        r, c = _affine_inverse(crop, np.array(cv, float))
        a, b = coef[p]
        vals.append(0.05 + (a * r[0] + b * c[0]) / (n - 1))
    assert out[cv] == pytest.approx(max(vals), abs=1e-5)
    assert np.count_nonzero(out) < 0.2 * out.size


def test_heatmap_roundtrip_of_crop_image_and_lesions_by_max():
    shape = (24, 36, 40)
    k, j, i = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    ramp = 0.7 * k + 0.4 * j + 0.2 * i
    vol = Volume(ramp, spacing=(0.2, 0.2, 0.5))
    bbox, centre = [(8, 14), (12, 22), (14, 26)], (11.0, 17.0, 20.0)
    crops = crop_planes(vol, bbox, centre, size=40)
    cams = {p: fr[0].image for p, fr in crops.items()}  # the crop image itself, painted back
    out = heatmap_to_volume(vol, crops, {"transverse": cams["transverse"]})
    t = crops["transverse"][0]
    lo, hi = t.intensity_range
    sl = out[t.fixed_index]
    nz = sl > 0
    assert nz.sum() > 50
    # voxels whose (r, c) falls between pixel centres (not in the half-pixel border, where the CAM is held
    # constant) get exactly the normalised ramp value
    jj, ii = np.nonzero(nz)
    r, c = t.array_index_to_crop(np.stack([np.full(jj.shape, t.fixed_index), jj, ii], -1).astype(float))
    core = (r >= 0) & (r <= 39) & (c >= 0) & (c <= 39)
    assert core.sum() > 0.6 * core.size
    np.testing.assert_allclose(sl[jj[core], ii[core]], (ramp[t.fixed_index][jj[core], ii[core]] - lo) / (hi - lo), atol=1e-4)
    # a second lesion into the same array: combined by max, the first lesion's paint kept where larger
    before = out.copy()
    other = crop_planes(vol, [(9, 13), (18, 22), (21, 25)], (11.0, 20.0, 23.0), size=40)  # same transverse slab
    const = {p: np.full((40, 40), 0.5, np.float32) for p in other}
    alone = heatmap_to_volume(vol, other, const)
    assert set(np.unique(alone)) == {0.0, 0.5}
    res = heatmap_to_volume(vol, other, const, out=out)
    assert res is out
    np.testing.assert_array_equal(out, np.maximum(before, alone))
    assert np.any((alone > 0) & (before > 0.5))  # overlaps where the first lesion's larger value survives
    assert np.any((alone > 0) & (before > 0) & (before < 0.5))  # ... and where the second's replaces it
    with pytest.raises(ValueError):
        heatmap_to_volume(vol, crops, cams, out=np.zeros((2, 2, 2), np.float32))


def test_overlay_png(tmp_path):
    from PIL import Image

    gray = np.full((20, 30), 0.5, np.float32)
    gray[0, 0] = 0.0
    gray[0, 1] = 1.0
    cam = np.zeros((10, 15), np.float32)
    cam[5:, :] = 1.0
    path = overlay_png(gray, cam, tmp_path / "sub" / "lesion1_transverse.png", alpha=0.4)
    img = np.asarray(Image.open(path))
    assert img.shape == (20, 30, 3) and img.dtype == np.uint8
    assert [p.name for p in path.parent.iterdir()] == ["lesion1_transverse.png"]  # no temp file left
    # cam 0 -> jet dark blue (0, 0, 0.5); cam 1 -> dark red (0.5, 0, 0); grey 0.5 weighted 0.6
    np.testing.assert_allclose(img[2, 5], np.array([0.3, 0.3, 0.5]) * 255, atol=1)
    np.testing.assert_allclose(img[15, 5], np.array([0.5, 0.3, 0.3]) * 255, atol=1)
    np.testing.assert_allclose(jet(np.array([0.5]))[0], [0.5, 1.0, 0.5])  # 1.5-|4x-3|, 1.5-|4x-2|, 1.5-|4x-1|
    np.testing.assert_array_equal(overlay_rgb(gray, cam), img)


def test_heatmap_with_frame_lists_uses_the_middle_frame():
    vol = Volume(np.random.default_rng(9).uniform(size=(30, 30, 30)), spacing=(0.2, 0.2, 0.5))
    mask = np.zeros(vol.shape, bool)
    mask[18:22, 10:20, 10:20] = True
    mask[21, 8:22, 8:22] = True  # largest transverse areas at k = 21, then 18..20 (ties: nearest the centre)
    frames = crop_planes(vol, [(18, 22), (8, 22), (8, 22)], (15.0, 15.0, 15.0), size=32, n_frames=3,
                         mask=mask, planes=["transverse"])
    ks = [fr.fixed_index for fr in frames["transverse"]]
    assert ks == [18, 19, 21]  # 21 (largest), then 18 and 19: nearest the centre (k = 15) among the ties
    out = heatmap_to_volume(vol, frames, {"transverse": np.ones((32, 32), np.float32)})
    painted = np.nonzero(out.reshape(out.shape[0], -1).any(axis=1))[0].tolist()
    assert painted == [ks[1]]
