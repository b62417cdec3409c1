"""Post-processing against hand-made masks whose answers are known by construction."""
from __future__ import annotations

import math

import numpy as np
import pytest

from BreastDLRLib.errors import InputError
from BreastDLRLib.lesions import find_lesions, lesions_from_labels, max_feret_diameter
from BreastDLRLib.volume import Volume


def vol(arr, spacing=(0.5, 0.5, 2.0), **meta):
    meta.setdefault("spacing_source", "file")
    return Volume(arr.astype(np.float32), spacing=spacing, origin=(10.0, -5.0, 3.0), metadata=meta)


def test_empty_mask_gives_no_lesions_and_empty_labels():
    labels, lesions = find_lesions(vol(np.zeros((4, 32, 32))))
    assert lesions == []
    assert labels.array.max() == 0 and labels.array.shape == (4, 32, 32)


def test_box_measurements_exact():
    a = np.zeros((10, 40, 50))
    a[2:6, 10:14, 20:40] = 0.9  # 4 slices × 4 rows × 20 cols: wide, parallel
    v = vol(a)
    labels, (les,) = find_lesions(v)
    assert les.bbox_kji == ((2, 6), (10, 14), (20, 40))
    assert les.voxels == 4 * 4 * 20
    assert les.volume_mm3 == pytest.approx(4 * 4 * 20 * 0.5 * 0.5 * 2.0)
    assert les.extent_mm == {"depth": 2.0, "lateral": 10.0, "elevation": 8.0}
    assert les.max_diameter_mm == pytest.approx(math.sqrt(10**2 + 2**2 + 8**2))
    assert les.depth_from_skin_mm == pytest.approx(10 * 0.5)
    assert les.aspect_ratio == pytest.approx(0.2) and les.orientation == "parallel"
    assert not les.touches_edge
    assert les.area_mm2 == pytest.approx(4 * 20 * 0.25)
    # centre in RAS: LPS origin + spacing*index, then x,y negated
    k, j, i = 3.5, 11.5, 29.5
    assert les.centre_ras == pytest.approx((-(10 + 0.5 * i), -(-5 + 0.5 * j), 3 + 2 * k))
    assert (labels.array == 1).sum() == les.voxels


def test_taller_than_wide_is_not_parallel():
    a = np.zeros((1, 60, 60))
    a[0, 10:40, 20:30] = 1
    _, (les,) = find_lesions(vol(a, spacing=(0.1, 0.1, 1.0)))
    assert les.aspect_ratio == pytest.approx(3.0) and les.orientation == "not parallel"
    assert les.volume_mm3 is None and les.extent_mm["elevation"] is None  # 2D image
    assert les.area_mm2 == pytest.approx(300 * 0.01)


def test_touching_lesions_merge_separate_ones_do_not():
    a = np.zeros((3, 30, 30))
    a[1, 5:10, 5:10] = 1
    a[1, 10:15, 10:15] = 1  # touches the first only at a corner: 26-connected → one lesion
    _, lesions = find_lesions(vol(a))
    assert len(lesions) == 1 and lesions[0].voxels == 50
    a[1, 10:15, 10:15] = 0
    a[1, 11:15, 11:15] = 1  # one voxel gap → two lesions, larger first
    labels, lesions = find_lesions(vol(a))
    assert [l.voxels for l in lesions] == [25, 16]
    assert set(np.unique(labels.array)) == {0, 1, 2}
    assert (labels.array == 1).sum() == 25


def test_specks_are_dropped_by_physical_size():
    a = np.zeros((5, 30, 30))
    a[2, 3, 3] = 1                 # 1 voxel = 0.5 mm³ < 1 mm³ → speck
    a[1:4, 10:20, 10:20] = 1       # 300 voxels
    _, lesions = find_lesions(vol(a), min_size_mm3=1.0)
    assert len(lesions) == 1 and lesions[0].voxels == 300
    _, lesions = find_lesions(vol(a), min_size_mm3=0.1)
    assert len(lesions) == 2


def test_thin_sheets_are_dropped_in_volumes_unless_the_slices_are_that_thick():
    a = np.zeros((12, 40, 40))
    a[2, 5:25, 5:25] = 1           # one slice: a 10 x 10 mm sheet at 0.5 mm slices
    a[4:10, 30:38, 30:38] = 1      # six slices deep: 3 x 4 x 4 mm
    a[11, 30:31, 0:20] = 1         # one slice, one row: a line
    fine = (0.5, 0.5, 0.5)
    _, lesions = find_lesions(vol(a, spacing=fine), min_size_mm3=0.1, min_extent_mm=2.0)
    assert [les.voxels for les in lesions] == [6 * 8 * 8]
    _, lesions = find_lesions(vol(a, spacing=fine), min_size_mm3=0.1)
    assert len(lesions) == 3
    # slices 2 mm apart: one slice is as thick as the limit, so the sheet stays; the line is 0.5 mm wide
    _, lesions = find_lesions(vol(a, spacing=(0.5, 0.5, 2.0)), min_size_mm3=0.1, min_extent_mm=2.0)
    assert sorted(les.voxels for les in lesions) == [6 * 8 * 8, 20 * 20]
    # a 2D image has no elevation: the limit does not apply
    _, lesions = find_lesions(vol(a[2:3], spacing=fine), min_size_mm2=0.1, min_extent_mm=2.0)
    assert len(lesions) == 1


def test_lesion_cut_by_edge_is_flagged():
    a = np.zeros((4, 30, 30))
    a[1:3, 0:5, 10:15] = 1   # touches row 0 (skin side)
    _, (les,) = find_lesions(vol(a))
    assert les.touches_edge and les.depth_from_skin_mm == 0.0
    b = np.zeros((4, 30, 30))
    b[0:2, 10:15, 10:15] = 1  # cut by the first slice of a volume
    _, (les,) = find_lesions(vol(b))
    assert les.touches_edge


def test_threshold_is_strict_and_nan_refused():
    a = np.zeros((2, 20, 20))
    a[0, 5:10, 5:10] = 0.5
    _, lesions = find_lesions(vol(a), threshold=0.5)
    assert lesions == []
    a[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        find_lesions(vol(np.where(np.isnan(a), np.nan, a)))


def test_unknown_spacing_reports_pixels():
    a = np.zeros((1, 20, 20))
    a[0, 5:10, 5:15] = 1
    v = Volume(a.astype(np.float32), metadata={"spacing_source": "unknown"})
    _, (les,) = find_lesions(v)
    assert les.units == "pixels" and les.extent_mm["lateral"] == 10


def test_feret_of_rectangle_and_single_pixel():
    m = np.zeros((1, 10, 20), bool)
    m[0, 2:6, 3:13] = True
    assert max_feret_diameter(m, (1.0, 1.0, 1.0)) == pytest.approx(math.hypot(4, 10))
    one = np.zeros((1, 5, 5), bool)
    one[0, 2, 2] = True
    assert max_feret_diameter(one, (1.0, 0.3, 0.4)) == pytest.approx(0.5)


def test_labels_roundtrip_measurements():
    a = np.zeros((3, 20, 20), np.uint16)
    a[1, 2:6, 2:6] = 1
    a[1, 10:12, 10:18] = 2
    les = lesions_from_labels(vol(a))
    assert [l.voxels for l in les] == [16, 16]
    assert les[1].bbox_kji == ((1, 2), (10, 12), (10, 18))


def test_feret_equals_brute_force_over_every_voxel_corner():
    from scipy import ndimage
    from scipy.spatial.distance import pdist

    rng = np.random.default_rng(3)
    m = ndimage.binary_opening(rng.random((6, 12, 14)) > 0.45)
    sp = (0.5, 0.3, 0.2)
    pts = np.argwhere(m).astype(float)
    off = np.array(np.meshgrid([-0.5, 0.5], [-0.5, 0.5], [-0.5, 0.5], indexing="ij")).reshape(3, -1).T
    corners = (pts[:, None] + off[None]).reshape(-1, 3) * np.array(sp)
    assert max_feret_diameter(m, sp) == pytest.approx(pdist(np.unique(corners, axis=0)).max())
