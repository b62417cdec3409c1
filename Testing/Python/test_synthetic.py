"""Synthetic breast ultrasound: determinism, truth consistency, geometry, image-model properties, writers."""
from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
from scipy import ndimage

from BreastDLRLib import synthetic as S

SMALL = dict(shape_kji=(24, 128, 160), spacing=(0.2, 0.2, 0.5))


@pytest.fixture(scope="module")
def images():
    """Sixty 2D cases, half forced malignant (each takes a few milliseconds)."""
    return [S.make_image(seed, malignant=(seed % 2 == 0)) for seed in range(60)]


@pytest.fixture(scope="module")
def volumes():
    return [S.make_volume(seed, n_lesions=2, **SMALL) for seed in range(6)]


def _lesion_voxels(case, les):
    return np.nonzero(case.mask.array == les.label)


# ------------------------------------------------------------------------------------ determinism
def test_same_seed_gives_identical_bytes_and_truth():
    for make in (lambda s: S.make_image(s), lambda s: S.make_volume(s, **SMALL)):
        a, b = make(11), make(11)
        assert a.image.array.tobytes() == b.image.array.tobytes()
        assert a.mask.array.tobytes() == b.mask.array.tobytes()
        assert a.lesions == b.lesions and a.clinical == b.clinical and a.label == b.label
        c = make(12)
        assert np.mean(a.image.array != c.image.array) > 0.5


def test_dtypes_and_value_ranges(images, volumes):
    for case in images[:5] + volumes[:2]:
        assert case.image.array.dtype == np.uint8 and case.mask.array.dtype == np.uint8
        assert case.image.array.std() > 10  # not a constant or empty image


# ---------------------------------------------------------------------------- truth consistency
def test_mask_labels_match_lesions(images, volumes):
    for case in images + volumes:
        n = len(case.lesions)
        assert sorted(np.unique(case.mask.array).tolist()) == list(range(n + 1))
        for idx, les in enumerate(case.lesions, start=1):
            assert les.label == idx
            assert (case.mask.array == idx).sum() > 0
            k, j, i = (int(round(c)) for c in les.centre_kji)
            assert case.mask.array[k, j, i] == idx  # the recorded centre lies in its own mask
        kinds = {les.kind for les in case.lesions}
        expected = "normal" if n == 0 else "malignant" if "malignant" in kinds else "benign"
        assert case.label == expected


def test_lesions_stay_inside_volume_and_glandular_layer(images, volumes):
    for case in images + volumes:
        sj = case.image.spacing[1]
        m = case.mask.array
        for les in case.lesions:
            k, j, i = _lesion_voxels(case, les)
            depth = j * sj
            assert np.all(depth >= case.layers["fat"][k, i]) and np.all(depth <= case.layers["gland"][k, i])
        # allow_edge=False: no lesion touches the lateral or sweep borders
        assert not m[:, :, 0].any() and not m[:, :, -1].any()
        if not case.image.is_2d:
            assert not m[0].any() and not m[-1].any()


def test_allow_edge_lets_lesions_be_cut_but_keeps_them_in_gland():
    cut = 0
    for seed in range(8):
        case = S.make_volume(seed, n_lesions=2, allow_edge=True, **SMALL)
        m = case.mask.array
        cut += int(m[0].any() or m[-1].any() or m[:, :, 0].any() or m[:, :, -1].any())
        for les in case.lesions:
            k, j, i = _lesion_voxels(case, les)
            assert np.all(j * case.image.spacing[1] <= case.layers["gland"][k, i])
    assert cut > 0


def test_lesions_do_not_touch_each_other(volumes):
    for case in volumes:
        a = case.mask.array == 1
        b = case.mask.array == 2
        grown = ndimage.binary_dilation(a, iterations=2)
        assert not (grown & b).any()


def test_no_lesions_gives_empty_mask_and_normal_label():
    for case in (S.make_image(3, n_lesions=0), S.make_volume(3, n_lesions=0, **SMALL)):
        assert not case.mask.array.any()
        assert case.label == "normal" and case.lesions == [] and case.birads == "1"
    with pytest.raises(ValueError):
        S.make_image(3, n_lesions=0, malignant=True)
    with pytest.raises(ValueError):
        S.make_image(3, n_lesions=4)


def test_malignant_flag_and_kinds():
    for seed in range(5):
        assert S.make_image(seed, malignant=True).label == "malignant"
        case = S.make_image(seed, n_lesions=2, malignant=False)
        assert case.label == "benign" and all(les.kind == "benign" for les in case.lesions)
    case = S.make_volume(1, kinds=("benign", "malignant"), **SMALL)
    assert [les.kind for les in case.lesions] == ["benign", "malignant"]


# ---------------------------------------------------------------------------------- geometry
def test_volume_geometry_as_asked():
    c, s = np.cos(0.3), np.sin(0.3)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    case = S.make_volume(2, shape_kji=(20, 120, 150), spacing=(0.25, 0.3, 0.6), origin=(10, -5, 3), direction=direction)
    img = case.image
    assert img.shape == (20, 120, 150)
    assert img.spacing == (0.25, 0.3, 0.6) and img.origin == (10.0, -5.0, 3.0)
    assert np.allclose(img.direction, direction)
    assert case.mask.same_geometry(img)
    assert img.metadata["spacing_source"] == "synthetic" and img.metadata["acquisition_axis"] == 0
    assert not img.is_2d
    img.validate()


def test_image_geometry_as_asked():
    case = S.make_image(4, shape=(200, 240), spacing_mm=(0.12, 0.08))
    img = case.image
    assert img.shape == (1, 200, 240) and img.is_2d
    assert img.spacing == (0.12, 0.08, 1.0)
    assert img.metadata["spacing_source"] == "synthetic"
    assert case.mask.same_geometry(img)


def test_acquisition_axis_2_is_the_transposed_canonical_volume():
    ref = S.make_volume(5, shape_kji=(24, 128, 160), spacing=(0.2, 0.2, 0.5))
    swapped = S.make_volume(5, shape_kji=(160, 128, 24), spacing=(0.5, 0.2, 0.2), acquisition_axis=2)
    assert swapped.image.metadata["acquisition_axis"] == 2
    assert np.array_equal(swapped.image.array, ref.image.array.transpose(2, 1, 0))
    assert np.array_equal(swapped.mask.array, ref.mask.array.transpose(2, 1, 0))
    for a, b in zip(swapped.lesions, ref.lesions):
        assert a.centre_kji == tuple(b.centre_kji[::-1])
    with pytest.raises(ValueError):
        S.make_volume(5, acquisition_axis=1, **SMALL)


# ------------------------------------------------------------------------------- image model
def test_lesions_are_darker_than_a_shell_around_them(images, volumes):
    for case in images + volumes:
        a = case.image.array.astype(float)
        sp = np.array(case.image.spacing_kji())
        for les in case.lesions:
            inside = case.mask.array == les.label
            dist = ndimage.distance_transform_edt(~inside, sampling=np.where(case.image.is_2d, [1e3, *sp[1:]], sp))
            shell = (dist > 0.3) & (dist <= 1.5) & (case.mask.array == 0)
            assert a[inside].mean() < a[shell].mean() - 10


def _extent_mm(case, les):
    k, j, i = _lesion_voxels(case, les)
    return (i.max() - i.min() + 1) * case.image.spacing[0], (j.max() - j.min() + 1) * case.image.spacing[1]


def test_orientation_measured_from_mask(images, volumes):
    seen = set()
    for case in images + volumes:
        for les in case.lesions:
            width, height = _extent_mm(case, les)
            if les.orientation == "parallel":
                assert width > height
            else:
                assert height > width
            seen.add((les.kind, les.orientation))
    assert ("benign", "parallel") in seen and ("malignant", "not parallel") in seen


def _below_and_beside(case, les):
    """Mean grey 0.5–4 mm below the lesion's central half, and at the same depth beside it."""
    img, mask = case.image.array[0].astype(float), case.mask.array[0]
    si, sj = case.image.spacing[0], case.image.spacing[1]
    jj, ii = np.nonzero(mask == les.label)
    i0, i1 = ii.min(), ii.max()
    w = i1 - i0 + 1
    c0, c1 = i0 + w // 4, i1 - w // 4 + 1
    bottom = jj[(ii >= c0) & (ii < c1)].max()
    r0, r1 = bottom + int(0.5 / sj) + 1, min(img.shape[0], bottom + int(4 / sj) + 1)
    occupied = np.convolve((mask > 0).any(0), np.ones(2 * int(0.5 / si) + 1), "same") > 0
    gap = int(1.0 / si)
    side = [c for c in list(range(i0 - gap - (c1 - c0), i0 - gap)) + list(range(i1 + gap + 1, i1 + gap + 1 + (c1 - c0)))
            if 0 <= c < img.shape[1] and not occupied[c]]
    if r1 - r0 < 3 or len(side) < 3:
        return None
    return img[r0:r1, c0:c1].mean(), img[r0:r1][:, side].mean()


def test_posterior_shadowing_and_enhancement(images):
    diffs = {"shadowing": [], "enhancement": []}
    for case in images:
        for les in case.lesions:
            pair = _below_and_beside(case, les) if les.posterior in diffs else None
            if pair is not None:
                diffs[les.posterior].append(pair[0] - pair[1])
    shadow, enhance = np.array(diffs["shadowing"]), np.array(diffs["enhancement"])
    assert len(shadow) >= 10 and len(enhance) >= 5
    assert np.all(shadow < 0)  # every shadowing lesion darkens the tissue below it
    # enhancement is weaker than the tissue's own variation for small lesions: most, and on average
    assert np.mean(enhance > 0) >= 0.8 and enhance.mean() > 5


def test_calcifications_are_bright_specks_inside(images):
    with_calc, without = [], []
    for case in images:
        a = case.image.array
        for les in case.lesions:
            n_bright = int((a[case.mask.array == les.label] > 170).sum())
            (with_calc if les.calcifications else without).append(n_bright)
    assert len(with_calc) >= 3 and min(with_calc) >= 3
    assert np.median(without) == 0


def test_descriptors_follow_kind(images):
    for case in images:
        for les in case.lesions:
            assert les.shape in S.SHAPES and les.margin in S.MARGINS and les.posterior in S.POSTERIORS
            if les.kind == "benign":
                assert les.birads in ("2", "3", "4a", "4b")
            else:
                assert les.birads in ("4a", "4b", "4c", "5") and les.margin != "circumscribed"


# ---------------------------------------------------------------------------------- clinical
def test_clinical_variables_plausible(images):
    ages = {"benign": [], "malignant": []}
    fam = []
    for case in images:
        cl = case.clinical
        assert isinstance(cl["age"], int) and 18 <= cl["age"] <= 90
        if cl["age"] < 40:
            assert cl["menopause"] is False
        if cl["age"] >= 60:
            assert cl["menopause"] is True
        assert cl["tissue_composition"] in S.TISSUE_COMPOSITIONS
        assert isinstance(cl["palpable"], bool)
        fam.append(cl["family_history"])
        if case.label in ages:
            ages[case.label].append(cl["age"])
    assert 0.0 < np.mean(fam) < 0.4
    assert np.mean(ages["malignant"]) > np.mean(ages["benign"])


# ----------------------------------------------------------------------------------- writers
def test_write_case_round_trip(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    case = S.make_volume(8, n_lesions=2, origin=(1, 2, 3), **SMALL)
    paths = S.write_case(case, tmp_path, "case8")
    img = sitk.ReadImage(str(paths["image"]))
    lab = sitk.ReadImage(str(paths["label"]))
    assert np.array_equal(sitk.GetArrayFromImage(img), case.image.array)
    assert np.array_equal(sitk.GetArrayFromImage(lab), case.mask.array)
    assert np.allclose(img.GetSpacing(), case.image.spacing) and np.allclose(img.GetOrigin(), (1, 2, 3))
    assert b"gzip" in paths["image"].read_bytes()[:400]
    truth = json.loads(paths["truth"].read_text())
    assert truth["label"] == case.label and len(truth["lesions"]) == 2
    assert [d["label"] for d in truth["lesions"]] == [1, 2]
    vox = float(np.prod(case.image.spacing))
    assert truth["lesions"][0]["volume_mm3"] == pytest.approx((case.mask.array == 1).sum() * vox, abs=1e-3)


def test_make_dataset_2d_manifest(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    path = S.make_dataset_2d(5, seed=1, folder=tmp_path)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == S.MANIFEST_COLUMNS
        rows = list(reader)
    assert len(rows) == 5 and len({r["case_id"] for r in rows}) == 5
    for r in rows:
        assert r["dataset"] == "synthetic" and r["label"] in ("benign", "malignant", "normal")
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / r["image"])))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / r["mask"])))
        assert img.shape == mask.shape == (int(r["height"]), int(r["width"]))
        assert set(np.unique(mask).tolist()) <= {0, 255}
        assert int((mask > 0).sum()) == int(r["lesion_area_px"])
        assert (r["label"] == "normal") == (not mask.any())
        assert hashlib.sha256((tmp_path / r["image"]).read_bytes()).hexdigest() == r["sha256"]
        assert 18 <= int(r["age"]) <= 90 and float(r["pixel_spacing_mm"]) == 0.1
        assert r["device"] == "" and r["histology"] == ""


def test_manifest_columns_match_the_real_manifest(shared_data):
    real = shared_data / "breast-us" / "manifest.csv"
    if not real.is_file():
        pytest.skip("real manifest not available")
    with open(real, newline="") as fh:
        assert tuple(next(csv.reader(fh))) == S.MANIFEST_COLUMNS
