"""Three-plane crops: geometry in mm on anisotropic grids, exact pixel -> array index mapping, edges, 2D."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from BreastDLRLib.planes import PLANES, PlaneCrop, available_planes, crop_planes, plane_axes, to_tensor_batch
from BreastDLRLib.volume import Volume

SPACING = (0.2, 0.2, 0.5)  # (si, sj, sk) mm -> spacing_kji = (0.5, 0.2, 0.2)
SP_KJI = np.array([0.5, 0.2, 0.2])


def _ellipsoid(shape, centre, semi_vox):
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    q = sum(((g - c) / s) ** 2 for g, c, s in zip((k, j, i), centre, semi_vox))
    return q <= 1.0


def _bbox(mask):
    idx = np.nonzero(mask)
    return [(int(a.min()), int(a.max()) + 1) for a in idx]


@pytest.fixture(scope="module")
def blob():
    shape = (40, 80, 80)
    centre = (20.0, 40.0, 40.0)
    mask = _ellipsoid(shape, centre, (8, 12, 15))  # 4 mm, 2.4 mm, 3 mm semi-axes
    vol = Volume(mask * 100.0 + 10.0, spacing=SPACING, metadata={"spacing_source": "synthetic"})
    return vol, mask, centre


def test_plane_axes_abvs_convention():
    ax = plane_axes(0)
    assert ax == {"transverse": (0, 1, 2), "sagittal": (2, 1, 0), "coronal": (1, 0, 2)}
    for a in (0, 1, 2):
        for f, r, c in plane_axes(a).values():
            assert sorted((f, r, c)) == [0, 1, 2]
        assert plane_axes(a)["transverse"][0] == a


@pytest.mark.parametrize("margin_of", ["shorter", "longer"])
def test_crop_geometry_anisotropic(blob, margin_of):
    vol, mask, centre = blob
    bbox = _bbox(mask)
    assert bbox == [(12, 29), (28, 53), (25, 56)]  # symmetric about the centre by construction
    ext = np.array([17 * 0.5, 25 * 0.2, 31 * 0.2])  # bbox extent in mm along k, j, i (voxel edges)
    size, margin = 224, 0.3
    crops = crop_planes(vol, bbox, centre, size=size, margin=margin, margin_of=margin_of)
    assert set(crops) == set(PLANES)
    for name, (f, ra, ca) in plane_axes(0).items():
        (crop,) = crops[name]
        assert crop.image.shape == (size, size) and crop.image.dtype == np.float32
        assert crop.image.min() >= 0.0 and crop.image.max() == pytest.approx(1.0)
        assert crop.valid_fraction == 1.0
        longer, shorter = max(ext[ra], ext[ca]), min(ext[ra], ext[ca])
        # the square: the box's longer side plus a margin of 30 % of its shorter (default) or longer side each way
        side = longer + 2 * margin * (shorter if margin_of == "shorter" else longer)
        # square isotropic pixels of side/size mm, first-to-last pixel distance = side*(size-1)/size
        p00, pr, pc = crop.crop_to_array_index(0, 0), crop.crop_to_array_index(size - 1, 0), crop.crop_to_array_index(0, size - 1)
        d_row = np.linalg.norm((pr - p00) * SP_KJI)
        d_col = np.linalg.norm((pc - p00) * SP_KJI)
        assert d_row == pytest.approx(side * (size - 1) / size, rel=1e-12)
        assert d_col == pytest.approx(side * (size - 1) / size, rel=1e-12)
        assert crop.pixel_mm == pytest.approx(side / size)
        # rows run along the row axis only, columns along the column axis only; plane through the centre
        assert np.count_nonzero(crop.row_step_kji) == 1 and crop.row_step_kji[ra] > 0
        assert np.count_nonzero(crop.col_step_kji) == 1 and crop.col_step_kji[ca] > 0
        assert p00[f] == round(centre[f])
        mid = crop.crop_to_array_index((size - 1) / 2, (size - 1) / 2)
        np.testing.assert_allclose(mid, centre, atol=1e-9)
        # the bright ellipse is centred in the crop and has its size in mm
        bright = crop.image > 0.5
        rr, cc = np.nonzero(bright)
        assert rr.mean() == pytest.approx((size - 1) / 2, abs=0.5)
        assert cc.mean() == pytest.approx((size - 1) / 2, abs=0.5)
        h = side / size
        n_rows = rr.max() - rr.min() + 1
        n_cols = cc.max() - cc.min() + 1
        # mask extent (voxel edges) vs bilinear edge at 0.5: within about one voxel
        assert abs(n_rows * h - ext[ra]) <= SP_KJI[ra] + 2 * h
        assert abs(n_cols * h - ext[ca]) <= SP_KJI[ca] + 2 * h
        # the bbox (voxel edges) lies inside the crop with >= margin * reference side on each side
        lo_r, _ = crop.array_index_to_crop(np.where(np.arange(3) == ra, bbox[ra][0] - 0.5, 0.0))
        hi_r, _ = crop.array_index_to_crop(np.where(np.arange(3) == ra, bbox[ra][1] - 0.5, 0.0))
        _, lo_c = crop.array_index_to_crop(np.where(np.arange(3) == ca, bbox[ca][0] - 0.5, 0.0))
        _, hi_c = crop.array_index_to_crop(np.where(np.arange(3) == ca, bbox[ca][1] - 0.5, 0.0))
        m_px = margin * (shorter if margin_of == "shorter" else longer) / h
        assert lo_r + 0.5 >= m_px - 1e-6 and (size - 0.5) - hi_r >= m_px - 1e-6
        assert lo_c + 0.5 >= m_px - 1e-6 and (size - 0.5) - hi_c >= m_px - 1e-6


def test_mapping_is_exact_on_ramp_and_random():
    shape = (30, 40, 50)
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    ramp = 3.0 * k + 2.0 * j - 0.5 * i + 7.0
    vol = Volume(ramp, spacing=SPACING)
    bbox = [(10, 19), (12, 25), (20, 33)]
    centre = (14.3, 18.0, 26.6)
    crops = crop_planes(vol, bbox, centre, size=96, n_frames=3)
    for name, frames in crops.items():
        assert [fr.frame_offset for fr in frames] == [-1, 0, 1]
        for fr in frames:
            r, c = np.meshgrid(np.arange(96), np.arange(96), indexing="ij")
            idx = fr.crop_to_array_index(r, c)
            expected = 3.0 * idx[..., 0] + 2.0 * idx[..., 1] - 0.5 * idx[..., 2] + 7.0
            lo, hi = fr.intensity_range
            got = fr.image * (hi - lo) + lo
            v = fr.valid_mask
            assert v.all()
            np.testing.assert_allclose(got[v], expected[v], atol=1e-3 * (hi - lo))
            assert idx[0, 0, fr.fixed_axis] == round(centre[fr.fixed_axis]) + fr.frame_offset
    # non-linear content: compare with scipy's 3D trilinear sampling at the affine positions
    rng = np.random.default_rng(0)
    noise = rng.normal(size=shape)
    vol2 = Volume(noise, spacing=SPACING)
    for name, (fr,) in crop_planes(vol2, bbox, centre, size=80).items():
        r, c = np.meshgrid(np.arange(80), np.arange(80), indexing="ij")
        idx = fr.crop_to_array_index(r, c)
        ref = ndimage.map_coordinates(noise, np.moveaxis(idx, -1, 0), order=1)
        lo, hi = fr.intensity_range
        np.testing.assert_allclose(fr.image * (hi - lo) + lo, ref, atol=1e-5)
        assert lo == pytest.approx(ref.min(), abs=1e-6) and hi == pytest.approx(ref.max(), abs=1e-6)


def test_lesion_at_edge_is_partly_outside():
    rng = np.random.default_rng(1)
    arr = rng.uniform(50, 200, size=(20, 40, 80))
    vol = Volume(arr, spacing=SPACING)
    bbox = [(8, 12), (0, 10), (70, 80)]
    centre = (10.0, 4.5, 74.5)
    crops = crop_planes(vol, bbox, centre, size=224)
    # hand computation: side 3.2 mm, 224 px of 3.2/224 mm; the bbox centre lies 0.9 mm from the first row
    # (j = 0) and from the last column (i = 79): rows r >= 48.5 and columns c <= 174.5 are inside -> 175 each
    t = crops["transverse"][0]
    assert t.valid_fraction == pytest.approx((175 / 224) ** 2, abs=1e-12)
    assert t.valid_mask[49:, :175].all() and not t.valid_mask[:49].any() and not t.valid_mask[:, 175:].any()
    s = crops["sagittal"][0]  # rows j (175 inside), columns k (all inside)
    assert s.valid_fraction == pytest.approx(175 / 224, abs=1e-12)
    for name, (fr,) in crops.items():
        assert np.all(fr.image[~fr.valid_mask] == 0.0)
        assert fr.image[fr.valid_mask].max() == pytest.approx(1.0)
        if fr.valid_fraction < 1:
            assert "outside" in fr.note


def test_2d_image_gives_only_transverse():
    rng = np.random.default_rng(2)
    vol = Volume(rng.uniform(size=(60, 70)), spacing=(0.1, 0.1, 1.0))
    assert vol.is_2d and available_planes(vol) == ("transverse",)
    crops = crop_planes(vol, [(0, 1), (20, 40), (25, 45)], (0.0, 29.5, 34.5), size=64, planes=PLANES)
    assert list(crops) == ["transverse"]
    x, m = to_tensor_batch(crops)
    assert tuple(x.shape) == (1, 3, 3, 64, 64) and m.tolist() == [True, False, False]
    assert float(x[:, 1:].abs().sum()) == 0.0
    np.testing.assert_array_equal(x[0, 0, 0].numpy(), crops["transverse"][0].image)


def test_constant_image_gives_zeros():
    vol = Volume(np.full((10, 30, 30), 42.0), spacing=SPACING)
    crops = crop_planes(vol, [(3, 7), (10, 20), (10, 20)], (5.0, 15.0, 15.0), size=32)
    for (fr,) in crops.values():
        assert np.isfinite(fr.image).all() and np.all(fr.image == 0.0)
        assert "constant" in fr.note


def test_acquisition_axis_2_matches_transposed_volume():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(20, 30, 40))
    bbox = [(5, 12), (8, 20), (10, 30)]
    centre = (8.4, 13.0, 19.2)
    vol_a = Volume(a, spacing=SPACING)
    crops_a = crop_planes(vol_a, bbox, centre, size=48)
    # B has axes (j, i, k) of A: sweep along B's axis 2; ITK spacing (si', sj', sk') = (sk, si, sj)
    b = a.transpose(1, 2, 0)
    vol_b = Volume(b, spacing=(0.5, 0.2, 0.2), metadata={"acquisition_axis": 2})
    crops_b = crop_planes(vol_b, [bbox[1], bbox[2], bbox[0]], (centre[1], centre[2], centre[0]), size=48)
    perm = [1, 2, 0]  # B index = A index permuted
    for name in PLANES:
        (ca,), (cb,) = crops_a[name], crops_b[name]
        np.testing.assert_allclose(cb.image, ca.image, atol=1e-6)
        np.testing.assert_allclose(cb.origin_kji, ca.origin_kji[perm])
        np.testing.assert_allclose(cb.row_step_kji, ca.row_step_kji[perm])
        np.testing.assert_allclose(cb.col_step_kji, ca.col_step_kji[perm])
        assert cb.pixel_mm == pytest.approx(ca.pixel_mm)


def test_frames_follow_largest_lesion_area():
    shape = (40, 30, 30)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    # a cone: disc radius grows with k from 12 to 28 -> largest areas at k = 28, 27, 26
    mask = ((j - 15) ** 2 + (i - 15) ** 2 <= (k - 10) ** 2) & (k >= 12) & (k <= 28)
    vol = Volume(mask * 1.0, spacing=SPACING)
    bbox = _bbox(mask)
    centre = tuple(float(np.mean(a)) for a in np.nonzero(mask))
    ck = round(centre[0])
    for m in (mask, mask[tuple(slice(lo, hi) for lo, hi in bbox)]):
        crops = crop_planes(vol, bbox, centre, size=32, n_frames=3, mask=m, planes=["transverse"])
        pos = [fr.fixed_index for fr in crops["transverse"]]
        assert pos == [26, 27, 28]
        assert [fr.frame_offset for fr in crops["transverse"]] == [p - ck for p in pos]
    crops = crop_planes(vol, bbox, centre, size=32, n_frames=3, frame_step=2, planes=["transverse"])
    assert [fr.fixed_index for fr in crops["transverse"]] == [ck - 2, ck, ck + 2]


def test_to_tensor_batch_layout(blob):
    vol, mask, centre = blob
    crops = crop_planes(vol, _bbox(mask), centre, size=32, n_frames=2)
    x, m = to_tensor_batch(crops)
    assert tuple(x.shape) == (2, 3, 3, 32, 32) and x.dtype.is_floating_point
    assert m.dtype == torch.bool and m.tolist() == [True, True, True]
    for pi, p in enumerate(PLANES):
        for fi in range(2):
            for ch in range(3):
                np.testing.assert_array_equal(x[fi, pi, ch].numpy(), crops[p][fi].image)
    x2, m2 = to_tensor_batch({"sagittal": crops["sagittal"]})
    assert m2.tolist() == [False, True, False] and float(x2[:, 0].abs().sum()) == 0.0
    with pytest.raises(ValueError):
        to_tensor_batch({})
    assert isinstance(crops["coronal"][0], PlaneCrop)
