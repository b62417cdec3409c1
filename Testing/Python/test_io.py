"""Image and volume IO: real ultrasound DICOM, real 3D volumes, real breast PNGs, synthetic DICOM made
with pydicom, geometry round trips and bad inputs.

References are independent of the code under test: facts from the data READMEs and DICOM tags, other
decoders (SimpleITK/GDCM, Pillow), hand-applied palettes and luminance, and SimpleITK's own geometry.
"""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from BreastDLRLib.errors import InputError
from BreastDLRLib.io import read_mask, read_volume, volume_from_sitk, volume_to_sitk, write_png, write_volume
from BreastDLRLib.io.writers import atomic_write
from BreastDLRLib.volume import Volume

LUMA = np.array([0.299, 0.587, 0.114])

# (rows, cols, frames) from us-dicom/README.md
US_DICOM_SHAPES = {
    "US1_UNCR.dcm": (480, 640, 1),
    "US1_UNCI.dcm": (480, 640, 1),
    "US1_J2KR.dcm": (480, 640, 1),
    "US1_J2KI.dcm": (480, 640, 1),
    "gdcm-US-ALOKA-16.dcm": (480, 640, 1),
    "gdcm-US-ALOKA-16_big.dcm": (480, 640, 1),
    "OBXXXX1A.dcm": (600, 800, 1),
    "OBXXXX1A_2frame.dcm": (600, 800, 2),
    "OBXXXX1A_rle.dcm": (600, 800, 1),
    "OBXXXX1A_rle_2frame.dcm": (600, 800, 2),
    "JPGLosslessP14SV1_1s_1f_8b.dcm": (768, 1024, 1),
    "color-pl.dcm": (120, 256, 1),
    "color-px.dcm": (120, 256, 1),
}
# PhysicalDeltaX/Y (cm) of the largest cm-calibrated ultrasound region, read off the files' tags.
US_REGION_SPACING_MM = {
    "OBXXXX1A": 0.02622878766196998 * 10,  # README: PhysicalDeltaX 0.0262 cm
    "gdcm-US-ALOKA-16": 0.03826530650258064 * 10,  # two equal regions of 304×392 pixels
    "JPGLosslessP14SV1_1s_1f_8b": 0.025476696592378157 * 10,
}


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float64) @ LUMA


@pytest.fixture(scope="module")
def us_dicom(shared_data: Path) -> Path:
    return shared_data / "us-dicom"


@pytest.fixture(scope="module")
def dicom_volumes(us_dicom: Path) -> dict:
    return {name: read_volume(us_dicom / name) for name in US_DICOM_SHAPES}


# ------------------------------------------------------------------------------------------- real DICOM
def test_every_us_dicom_file_is_covered(us_dicom: Path):
    assert sorted(p.name for p in us_dicom.glob("*.dcm")) == sorted(US_DICOM_SHAPES)


@pytest.mark.parametrize("name", sorted(US_DICOM_SHAPES))
def test_us_dicom_shape_and_metadata(dicom_volumes: dict, name: str):
    vol = dicom_volumes[name]
    rows, cols, frames = US_DICOM_SHAPES[name]
    assert vol.shape == (frames, rows, cols)
    assert vol.array.dtype.byteorder in ("=", "|")
    assert vol.metadata["source"] == name
    assert vol.metadata["modality"] == "US"
    assert vol.metadata["frames"] == frames
    assert vol.metadata["frames_are_time"] is (frames > 1)
    assert vol.array.std() > 0  # decoded real content, not a blank
    stem = name[:-4].replace("_big", "").replace("_rle", "").replace("_2frame", "")
    if stem in US_REGION_SPACING_MM:
        s = US_REGION_SPACING_MM[stem]
        assert vol.metadata["spacing_source"] == "ultrasound_regions"
        assert vol.spacing == pytest.approx((s, s, 1.0), abs=1e-9)
    else:  # US1_* and color-* carry no spacing at all
        assert vol.metadata["spacing_source"] == "unknown"
        assert "pixels" in vol.metadata["spacing_note"]
        assert vol.spacing == (1.0, 1.0, 1.0)


def test_obxxxx1a_spacing_is_0262_mm(dicom_volumes: dict):
    assert dicom_volumes["OBXXXX1A.dcm"].spacing[:2] == pytest.approx((0.262, 0.262), abs=5e-4)


def test_lossless_twins_are_equal(dicom_volumes: dict):
    v = dicom_volumes
    np.testing.assert_array_equal(v["US1_J2KR.dcm"].array, v["US1_UNCR.dcm"].array)
    np.testing.assert_array_equal(v["OBXXXX1A_rle.dcm"].array, v["OBXXXX1A.dcm"].array)
    np.testing.assert_array_equal(v["OBXXXX1A_rle_2frame.dcm"].array, v["OBXXXX1A_2frame.dcm"].array)
    np.testing.assert_array_equal(v["gdcm-US-ALOKA-16_big.dcm"].array, v["gdcm-US-ALOKA-16.dcm"].array)
    np.testing.assert_array_equal(v["color-pl.dcm"].array, v["color-px.dcm"].array)
    # frame 0 of the 2-frame file is the single-frame image; frame 1 differs (frames kept in order)
    np.testing.assert_array_equal(v["OBXXXX1A_2frame.dcm"].array[0], v["OBXXXX1A.dcm"].array[0])
    assert not np.array_equal(v["OBXXXX1A_2frame.dcm"].array[1], v["OBXXXX1A.dcm"].array[0])


def test_lossy_jpeg2000_is_close_to_its_twin(dicom_volumes: dict):
    a = dicom_volumes["US1_J2KI.dcm"].array.astype(float)
    b = dicom_volumes["US1_UNCI.dcm"].array.astype(float)
    assert np.abs(a - b).mean() < 2.0


def test_rgb_grey_is_luminance(us_dicom: Path, dicom_volumes: dict):
    import pydicom

    rgb = pydicom.dcmread(us_dicom / "US1_UNCR.dcm").pixel_array
    expected = np.rint(luminance(rgb))
    np.testing.assert_array_equal(dicom_volumes["US1_UNCR.dcm"].array[0], expected)


def test_palette_applied_by_hand(us_dicom: Path, dicom_volumes: dict):
    """OBXXXX1A: 8-bit indices into 16-bit LUTs (descriptor 256/0/16); grey scaled to 8 bits."""
    import pydicom

    ds = pydicom.dcmread(us_dicom / "OBXXXX1A.dcm")
    assert list(ds.RedPaletteColorLookupTableDescriptor) == [256, 0, 16]
    idx = np.frombuffer(ds.PixelData, dtype=np.uint8).reshape(600, 800)
    luts = [np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, dtype="<u2") for c in ("Red", "Green", "Blue")]
    rgb = np.stack([lut[idx] for lut in luts], axis=-1)
    expected = np.rint(luminance(rgb) / 257.0)
    got = dicom_volumes["OBXXXX1A.dcm"].array[0]
    assert got.dtype == np.uint8
    assert np.abs(got.astype(float) - expected).max() <= 1
    assert (got == expected).mean() > 0.99


def test_segmented_16bit_palette_matches_gdcm(us_dicom: Path, dicom_volumes: dict):
    """ALOKA (16-bit pixels, segmented 16-bit LUT): GDCM applies the palette independently."""
    rgb16 = sitk.GetArrayFromImage(sitk.ReadImage(str(us_dicom / "gdcm-US-ALOKA-16.dcm")))[0]
    assert rgb16.dtype == np.uint16 and rgb16.shape == (480, 640, 3)
    expected = np.rint(luminance(rgb16) / 257.0)
    got = dicom_volumes["gdcm-US-ALOKA-16.dcm"].array[0].astype(float)
    assert np.abs(got - expected).max() <= 1


def test_jpeg_lossless_matches_gdcm(us_dicom: Path, dicom_volumes: dict):
    name = "JPGLosslessP14SV1_1s_1f_8b.dcm"
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(us_dicom / name)))
    np.testing.assert_array_equal(dicom_volumes[name].array, reference)
    assert dicom_volumes[name].metadata["transfer_syntax"].startswith("JPEG Lossless")


def test_missing_decoder_names_syntax_and_package(us_dicom: Path, monkeypatch):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLosslessSV1

    monkeypatch.setattr(get_decoder(JPEGLosslessSV1), "_available", {})
    with pytest.raises(InputError, match=r"JPEG Lossless.*pip install pylibjpeg pylibjpeg-libjpeg"):
        read_volume(us_dicom / "JPGLosslessP14SV1_1s_1f_8b.dcm")


def test_undecodable_transfer_syntax(us_dicom: Path, tmp_path: Path):
    import pydicom
    from pydicom.uid import MPEG2MPML

    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(us_dicom / "OBXXXX1A.dcm")
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(tmp_path / "mpeg.dcm")
    with pytest.raises(InputError, match="MPEG2 Main Profile.*cannot decode"):
        read_volume(tmp_path / "mpeg.dcm")


def test_file_spacing_wins_over_user_spacing(us_dicom: Path):
    vol = read_volume(us_dicom / "OBXXXX1A.dcm", spacing=0.5)
    assert vol.spacing[0] == pytest.approx(US_REGION_SPACING_MM["OBXXXX1A"])
    assert vol.metadata["spacing_ignored"] is True
    vol = read_volume(us_dicom / "US1_UNCR.dcm", spacing=0.07)
    assert vol.spacing == (0.07, 0.07, 1.0)
    assert vol.metadata["spacing_source"] == "user" and "spacing_note" not in vol.metadata
    vol = read_volume(us_dicom / "OBXXXX1A_2frame.dcm")
    assert vol.spacing[2] == 1.0  # cine frames: time, not space


def test_patient_identifiers_never_reach_metadata(us_dicom: Path, tmp_path: Path):
    import pydicom

    ds = pydicom.dcmread(us_dicom / "OBXXXX1A.dcm")
    ds.PatientName = "SECRET^NAME"
    ds.PatientID = "SECRET-ID-1"
    ds.PatientBirthDate = "19010101"
    ds.InstitutionName = "SECRET HOSPITAL"
    path = tmp_path / "identified.dcm"
    ds.save_as(path)
    vol = read_volume(path)
    assert "SECRET" not in repr(vol.metadata)
    assert "SECRET" not in repr(vol.describe())
    assert "19010101" not in repr(vol.metadata)
    assert vol.metadata["manufacturer"] == "Philips Medical Systems"


# ------------------------------------------------------------------------------------------- synthetic DICOM
def make_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 8,
               preamble: bool = True, **tags) -> Path:
    """A minimal ultrasound DICOM written by pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = tags.pop("SOPClassUID", UltrasoundImageStorage)
    ds.Modality = "US"
    ds.Manufacturer = "TestCo"
    ds.PatientName = "SECRET^NAME"
    ds.set_pixel_data(pixels, photometric, bits)
    for key, value in tags.items():
        setattr(ds, key, value)
    if not preamble:
        ds.file_meta = FileMetaDataset()
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    else:
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(path, enforce_file_format=True)
    return path


def test_monochrome1_is_inverted(tmp_path: Path):
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 4096, size=(16, 20), dtype=np.uint16)
    vol = read_volume(make_dicom(tmp_path / "m1.dcm", pix, "MONOCHROME1", bits=12))
    np.testing.assert_array_equal(vol.array[0], 4095 - pix)
    assert vol.metadata["photometric"] == "MONOCHROME1"
    vol2 = read_volume(make_dicom(tmp_path / "m2.dcm", pix, "MONOCHROME2", bits=12))
    np.testing.assert_array_equal(vol2.array[0], pix)


def test_pixel_spacing_is_row_then_column(tmp_path: Path):
    pix = np.arange(16 * 20, dtype=np.uint8).reshape(16, 20)
    vol = read_volume(make_dicom(tmp_path / "ps.dcm", pix, PixelSpacing=[0.2, 0.1]), spacing=9.0)
    assert vol.spacing == pytest.approx((0.1, 0.2, 1.0))  # (column, row, slice)
    assert vol.metadata["spacing_source"] == "file" and vol.metadata["spacing_ignored"] is True


def _region(x0: int, y0: int, x1: int, y1: int, delta_cm: float, units: int = 3):
    from pydicom.dataset import Dataset

    r = Dataset()
    r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1 = x0, y0, x1, y1
    r.PhysicalUnitsXDirection = r.PhysicalUnitsYDirection = units
    r.PhysicalDeltaX = r.PhysicalDeltaY = delta_cm
    return r


def test_largest_cm_region_gives_spacing(tmp_path: Path):
    from pydicom.sequence import Sequence

    regions = [
        _region(0, 0, 99, 79, 0.05, units=0),  # largest, but not calibrated in cm
        _region(0, 0, 59, 49, 0.02),  # the largest cm region: 0.2 mm
        _region(60, 0, 79, 19, 0.01),  # a small cm inset (e.g. a zoom box)
    ]
    pix = np.zeros((80, 100), np.uint8)
    vol = read_volume(make_dicom(tmp_path / "r.dcm", pix, SequenceOfUltrasoundRegions=Sequence(regions)))
    assert vol.spacing == pytest.approx((0.2, 0.2, 1.0))
    assert vol.metadata["spacing_source"] == "ultrasound_regions"
    vol = read_volume(make_dicom(tmp_path / "r0.dcm", pix, SequenceOfUltrasoundRegions=Sequence(regions[:1])))
    assert vol.metadata["spacing_source"] == "unknown"  # no cm region: spacing is not guessed


def test_big_endian_16bit_comes_out_native(tmp_path: Path):
    from pydicom.uid import ExplicitVRBigEndian

    pix = (np.arange(12 * 16, dtype=np.uint16) * 300).reshape(12, 16)
    import pydicom

    path = make_dicom(tmp_path / "be.dcm", pix, bits=16)

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = pix.astype(">u2").tobytes()
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    assert pydicom.dcmread(path).original_encoding == (False, False)
    vol = read_volume(path)
    assert vol.metadata["transfer_syntax"] == "Explicit VR Big Endian"
    assert vol.array.dtype == np.dtype("=u2")  # native order: torch and SimpleITK need it
    np.testing.assert_array_equal(vol.array[0], pix)


def test_ybr_full_becomes_rgb_grey(us_dicom: Path, tmp_path: Path, dicom_volumes: dict):
    import pydicom
    from pydicom.pixels import convert_color_space

    rgb = pydicom.dcmread(us_dicom / "US1_UNCR.dcm").pixel_array
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    vol = read_volume(make_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL"))
    diff = np.abs(vol.array.astype(int) - dicom_volumes["US1_UNCR.dcm"].array.astype(int))
    assert diff.max() <= 2  # YBR is rounded to 8 bits twice


def test_dicom_detected_by_content_not_extension(tmp_path: Path):
    pix = (np.arange(12 * 10) % 251).astype(np.uint8).reshape(12, 10)
    no_preamble = make_dicom(tmp_path / "scan.xyz", pix, preamble=False)
    assert no_preamble.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(read_volume(no_preamble).array[0], pix)
    disguised = make_dicom(tmp_path / "scan.png", pix)  # DICOM content, picture extension
    vol = read_volume(disguised)
    np.testing.assert_array_equal(vol.array[0], pix)
    assert vol.metadata["modality"] == "US"
    assert "SECRET" not in repr(vol.metadata)


def test_dicom_without_pixels(tmp_path: Path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = BasicTextSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match="sr.dcm is a DICOM file without an image"):
        read_volume(tmp_path / "sr.dcm")


@pytest.mark.parametrize("keep", [0.5, 0.002])
def test_truncated_dicom(us_dicom: Path, tmp_path: Path, keep: float):
    data = (us_dicom / "OBXXXX1A.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError, match=r"^cut.dcm is not a readable image: its (pixel|image) data"):
        read_volume(tmp_path / "cut.dcm")


def test_rescale_slope_intercept(tmp_path: Path):
    pix = np.arange(10 * 12, dtype=np.uint16).reshape(10, 12)
    vol = read_volume(make_dicom(tmp_path / "r.dcm", pix, bits=16, RescaleSlope=2, RescaleIntercept=-10))
    np.testing.assert_allclose(vol.array[0], 2.0 * pix - 10)


def _oblique(ax: float, ay: float, az: float) -> np.ndarray:
    cx, cy, cz, sx, sy, sz = np.cos(ax), np.cos(ay), np.cos(az), np.sin(ax), np.sin(ay), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def test_dicom_series_folder_sorted_by_position(tmp_path: Path):
    from pydicom.uid import CTImageStorage, generate_uid

    rot = _oblique(0.3, -0.2, 0.1)
    origin = np.array([10.0, -20.0, 30.0])
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    folder = tmp_path / "series"
    folder.mkdir()
    for n, k in enumerate([2, 0, 3, 1]):  # file order is not slice order
        pos = origin + rot[:, 2] * 2.5 * k
        make_dicom(
            folder / f"f{n}.dcm", np.full((10, 12), 10 * (k + 1), np.uint8), SOPClassUID=CTImageStorage,
            SeriesInstanceUID=series, StudyInstanceUID=study, FrameOfReferenceUID=frame, InstanceNumber=n + 1,
            ImagePositionPatient=[f"{v:.6f}" for v in pos],
            ImageOrientationPatient=[f"{v:.6f}" for v in np.r_[rot[:, 0], rot[:, 1]]],
            PixelSpacing=[0.4, 0.3], SliceThickness=2.5,
        )
    vol = read_volume(folder)
    assert vol.shape == (4, 10, 12)
    np.testing.assert_array_equal(vol.array[:, 0, 0], [10, 20, 30, 40])
    assert vol.spacing == pytest.approx((0.3, 0.4, 2.5), abs=1e-5)
    assert vol.origin == pytest.approx(tuple(origin), abs=1e-5)
    np.testing.assert_allclose(vol.direction, rot, atol=1e-5)
    assert vol.metadata["spacing_source"] == "file" and "SECRET" not in repr(vol.metadata)


def test_multiframe_with_positions_is_a_volume(tmp_path: Path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    frames = np.stack([np.full((10, 12), 10 * (k + 1), np.uint8) for k in range(3)])
    per_frame = []
    for z in (4.0, 2.0, 0.0):  # stored top-down, positions decreasing
        pos = Dataset()
        pos.ImagePositionPatient = [0, 0, z]
        item = Dataset()
        item.PlanePositionSequence = Sequence([pos])
        per_frame.append(item)
    orient, measures, shared = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing = [0.5, 0.25]
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    path = make_dicom(tmp_path / "mf.dcm", frames, PerFrameFunctionalGroupsSequence=Sequence(per_frame),
                      SharedFunctionalGroupsSequence=Sequence([shared]))
    vol = read_volume(path)
    assert vol.metadata["frames"] == 3 and vol.metadata["frames_are_time"] is False
    np.testing.assert_array_equal(vol.array[:, 0, 0], [30, 20, 10])  # sorted by position
    assert vol.spacing == pytest.approx((0.25, 0.5, 2.0))
    assert vol.origin == (0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------------- 3D volumes
@pytest.mark.parametrize("name", ["SpinePhantomFreehandReconstructed.mha", "NwirePhantomFreehandReconstructed.mha"])
def test_phantom_volumes_match_simpleitk(shared_data: Path, name: str):
    path = shared_data / "us-3d-phantom" / name
    ref = sitk.ReadImage(str(path))
    vol = read_volume(path, spacing=0.1)
    size = ref.GetSize()
    assert vol.shape == (size[2], size[1], size[0])
    assert vol.spacing == pytest.approx((0.5, 0.5, 0.5))
    assert vol.origin == ref.GetOrigin()
    np.testing.assert_array_equal(vol.direction.ravel(), ref.GetDirection())
    np.testing.assert_array_equal(vol.array, sitk.GetArrayViewFromImage(ref))
    assert vol.metadata["spacing_source"] == "file" and vol.metadata["spacing_ignored"] is True
    corner = ref.TransformIndexToPhysicalPoint((3, 5, 7))
    np.testing.assert_allclose(vol.ijk_to_lps() @ [3, 5, 7, 1], [*corner, 1.0], atol=1e-9)


@pytest.fixture
def oblique_volume() -> Volume:
    rng = np.random.default_rng(1)
    arr = rng.integers(-1000, 1000, size=(5, 9, 11), dtype=np.int16)
    meta = {"source": "x", "modality": "US", "spacing_source": "user", "acquisition_axis": 2}
    return Volume(arr, (0.3, 0.7, 1.9), (-12.5, 40.25, 3.125), _oblique(0.4, -0.25, 0.7), meta)


# NRRD and MetaImage store geometry as decimal text with 17 digits (exact); NIfTI stores it in
# float32 (qform/sform), so the NIfTI round trip is checked to 1e-4 mm and 1e-5 in the direction.
@pytest.mark.parametrize("ext,tol", [(".nrrd", 1e-12), (".mha", 1e-12), (".nii.gz", 1e-4), (".nii", 1e-4)])
def test_geometry_round_trip(oblique_volume: Volume, tmp_path: Path, ext: str, tol: float):
    path = write_volume(oblique_volume, tmp_path / f"vol{ext}")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, oblique_volume.array)
    assert back.array.dtype == np.int16
    np.testing.assert_allclose(back.spacing, oblique_volume.spacing, atol=tol)
    np.testing.assert_allclose(back.origin, oblique_volume.origin, atol=tol)
    np.testing.assert_allclose(back.direction, oblique_volume.direction, atol=max(tol, 1e-5) if tol > 1e-9 else tol)
    # SimpleITK (independent of Volume) puts voxel (i, j, k) where the volume says it is
    ref = sitk.ReadImage(str(path))
    for ijk in [(0, 0, 0), (10, 8, 4), (3, 1, 2)]:
        np.testing.assert_allclose(
            oblique_volume.ijk_to_lps() @ [*ijk, 1], [*ref.TransformIndexToPhysicalPoint(ijk), 1], atol=10 * tol
        )
    assert sorted(os.listdir(tmp_path)) == [f"vol{ext}"]  # no temporary files left
    if ext in (".nrrd", ".mha"):  # safe metadata survives in the header
        assert back.metadata["spacing_source"] == "user"
        assert back.metadata["acquisition_axis"] == 2
        assert back.metadata["modality"] == "US"


def test_sitk_helpers_round_trip(oblique_volume: Volume):
    image = volume_to_sitk(oblique_volume)
    assert image.GetSpacing() == oblique_volume.spacing
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3)[:, 0], oblique_volume.direction[:, 0])
    back = volume_from_sitk(image, {"source": "x"})
    assert back.same_geometry(oblique_volume, atol=1e-12)
    np.testing.assert_array_equal(back.array, oblique_volume.array)


def test_2d_and_colour_sitk_files(tmp_path: Path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, size=(9, 13, 3), dtype=np.uint8)
    img = sitk.GetImageFromArray(rgb, isVector=True)
    img.SetSpacing((0.2, 0.3))
    img.SetOrigin((5.0, 6.0))
    sitk.WriteImage(img, str(tmp_path / "rgb2d.mha"))
    vol = read_volume(tmp_path / "rgb2d.mha")
    assert vol.shape == (1, 9, 13) and vol.is_2d
    np.testing.assert_array_equal(vol.array[0], np.rint(luminance(rgb)))
    assert vol.spacing == pytest.approx((0.2, 0.3, 1.0)) and vol.origin == (5.0, 6.0, 0.0)


def test_nrrd_without_spacing_takes_user_spacing(tmp_path: Path):
    path = tmp_path / "nospacing.nrrd"
    data = np.arange(2 * 10 * 12, dtype=np.uint8)
    path.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 12 10 2\nencoding: raw\n\n" + data.tobytes())
    vol = read_volume(path)
    assert vol.metadata["spacing_source"] == "unknown" and vol.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(vol.array.ravel(), data)
    vol = read_volume(path, spacing=(0.2, 0.3, 0.4))
    assert vol.metadata["spacing_source"] == "user" and vol.spacing == (0.2, 0.3, 0.4)


# ------------------------------------------------------------------------------------------- pictures
def _sample_rows(manifest: Path) -> list:
    rows = list(csv.DictReader(manifest.open()))
    picks = {}
    for row in rows:  # the first image of each dataset ...
        picks.setdefault(row["dataset"], row)
    chosen = list(picks.values()) + [rows[len(rows) // 2], rows[-1]]
    return chosen[:5]


def test_breast_us_pngs(shared_data: Path):
    root = shared_data / "breast-us"
    rows = _sample_rows(root / "manifest.csv")
    assert len(rows) == 5 and len({r["dataset"] for r in rows}) == 3
    for row in rows:
        given = float(row["pixel_spacing_mm"]) if row["pixel_spacing_mm"] else None
        vol = read_volume(root / row["image"], spacing=given)
        assert vol.shape == (1, int(row["height"]), int(row["width"]))
        with Image.open(root / row["image"]) as im:
            ref = np.asarray(im)
        expected = np.rint(luminance(ref)) if ref.ndim == 3 else ref
        np.testing.assert_array_equal(vol.array[0], expected)
        if given is None:
            assert vol.metadata["spacing_source"] == "unknown" and vol.spacing == (1.0, 1.0, 1.0)
        else:
            assert vol.metadata["spacing_source"] == "user" and vol.spacing[:2] == (given, given)
        mask = read_mask(root / row["mask"], vol)
        assert mask.dtype == np.uint8 and mask.shape == vol.shape and set(np.unique(mask)) <= {0, 1}
        assert int(mask.sum()) == int(row["lesion_area_px"])


def test_pillow_modes(tmp_path: Path):
    rng = np.random.default_rng(3)
    grey16 = rng.integers(0, 65536, size=(10, 14), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(read_volume(tmp_path / "g16.png").array[0], grey16)
    rgb = rng.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.bmp")
    np.testing.assert_array_equal(read_volume(tmp_path / "rgb.bmp").array[0], np.rint(luminance(rgb)))
    pages = [Image.fromarray(np.full((10, 14), v, np.uint8)) for v in (5, 6, 7)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    vol = read_volume(tmp_path / "stack.tif", spacing=0.2)
    assert vol.shape == (3, 10, 14) and vol.array[:, 0, 0].tolist() == [5, 6, 7]
    assert vol.spacing == (0.2, 0.2, 0.2) and vol.metadata["frames"] == 3


def test_write_png_and_read_mask(tmp_path: Path):
    like = Volume(np.zeros((1, 10, 12), np.uint8))
    mask = np.zeros((10, 12), bool)
    mask[2:6, 3:9] = True
    path = write_png(mask, tmp_path / "m.png")
    assert set(np.unique(np.asarray(Image.open(path)))) == {0, 255}
    got = read_mask(path, like)
    np.testing.assert_array_equal(got[0], mask.astype(np.uint8))
    Image.fromarray(mask.astype(np.uint8)).save(tmp_path / "m01.png")  # a 0/1 mask works too
    np.testing.assert_array_equal(read_mask(tmp_path / "m01.png", like)[0], mask)
    with pytest.raises(InputError, match=r"12×10 pixels but the image is 13×10"):
        read_mask(path, Volume(np.zeros((1, 10, 13), np.uint8)))
    ramp = np.linspace(-2.0, 3.0, 10 * 12).reshape(10, 12)
    out = np.asarray(Image.open(write_png(ramp, tmp_path / "ramp.png")))
    np.testing.assert_array_equal(out, np.rint((ramp + 2.0) / 5.0 * 255).astype(np.uint8))
    assert sorted(os.listdir(tmp_path)) == ["m.png", "m01.png", "ramp.png"]


def test_read_mask_from_label_volume(oblique_volume: Volume, tmp_path: Path):
    image = oblique_volume.with_array(oblique_volume.array, spacing_source="file")
    labels = (image.array > 0).astype(np.uint8) * 3
    write_volume(image.with_array(labels), tmp_path / "mask.nrrd")
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.nrrd", image), labels > 0)
    moved = Volume(labels, image.spacing, (0.0, 0.0, 0.0), image.direction, {"spacing_source": "file"})
    write_volume(moved, tmp_path / "moved.nrrd")
    with pytest.raises(InputError, match="not its position, spacing or orientation"):
        read_mask(tmp_path / "moved.nrrd", image)
    # an image whose spacing the user typed in: only the size has to match
    typed = image.with_array(image.array, spacing_source="user")
    assert read_mask(tmp_path / "moved.nrrd", typed).sum() == (labels > 0).sum()


# ------------------------------------------------------------------------------------------- bad inputs
def _random_file(path: Path, n: int = 4096) -> Path:
    path.write_bytes(np.random.default_rng(4).integers(0, 256, n, dtype=np.uint8).tobytes())
    return path


@pytest.mark.parametrize("name", ["corrupt.dcm", "corrupt.nrrd", "corrupt.png", "corrupt.nii.gz"])
def test_corrupt_files(tmp_path: Path, name: str):
    with pytest.raises(InputError, match=rf"^{name} is not a readable image: .+") as err:
        read_volume(_random_file(tmp_path / name))
    msg = str(err.value)
    assert "\n" not in msg and "/" not in msg and ".cxx" not in msg and "0x" not in msg and len(msg) < 300


def test_missing_empty_unsupported(tmp_path: Path):
    with pytest.raises(InputError, match="was not found"):
        read_volume(tmp_path / "nope.nrrd")
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty \(0 bytes\)"):
        read_volume(tmp_path / "empty.dcm")
    (tmp_path / "notes.txt").write_text("not an image at all\n" * 20)
    with pytest.raises(InputError, match="not in a supported format; BreastDLR reads DICOM, NRRD"):
        read_volume(tmp_path / "notes.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="holds no DICOM series"):
        read_volume(tmp_path / "folder")


@pytest.mark.parametrize("dims", [4, 5])
def test_time_series_refused(tmp_path: Path, dims: int):
    shape = (2, 3, 10, 10) if dims == 4 else (2, 2, 3, 10, 10)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape, np.float32), isVector=False), str(tmp_path / "t.nii.gz"))
    expected = rf"^t.nii.gz has {dims} dimensions \(a time series\?\); BreastDLR reads 2D images and 3D volumes"
    with pytest.raises(InputError, match=expected):
        read_volume(tmp_path / "t.nii.gz")
    assert os.listdir(tmp_path) == ["t.nii.gz"]


def test_nan_volume_refused_and_nothing_written(tmp_path: Path):
    arr = np.ones((3, 10, 10), np.float32)
    arr[1, 2, 3] = np.nan
    src = tmp_path / "src"
    src.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(src / "nan.mha"))
    with pytest.raises(InputError, match="NaN or infinite"):
        read_volume(src / "nan.mha")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="NaN or infinite"):
        write_volume(Volume(arr, metadata={"source": "nan"}), out / "nan.nrrd")
    assert not out.exists() or os.listdir(out) == []


def test_zero_spacing_refused_and_nothing_written(tmp_path: Path):
    for bad in [(0.0, 1.0, 1.0), (1.0, -0.5, 1.0), (1.0, 1.0, np.nan)]:
        with pytest.raises(InputError, match="not positive"):
            write_volume(Volume(np.zeros((2, 10, 10), np.uint8), spacing=bad), tmp_path / "z.nrrd")
    assert os.listdir(tmp_path) == []
    header = "ObjectType = Image\nNDims = 3\nDimSize = 10 10 2\nElementSpacing = 0 1 1\nElementType = MET_UCHAR\n"
    (tmp_path / "zero.mha").write_bytes((header + "ElementDataFile = LOCAL\n").encode() + bytes(200))
    with pytest.raises(InputError, match="spacing of zero"):
        read_volume(tmp_path / "zero.mha")
    no_spacing = make_dicom(tmp_path / "u.dcm", np.zeros((10, 10), np.uint8))
    for bad in (-1.0, 0.0, (0.1, 0.0)):
        with pytest.raises(InputError, match="not valid; give positive numbers in mm"):
            read_volume(no_spacing, spacing=bad)


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path):
    dest = tmp_path / "keep.nrrd"
    dest.write_bytes(b"old content")

    def broken(tmp: str) -> None:
        Path(tmp).write_bytes(b"half a fi")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(dest, broken)
    assert dest.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["keep.nrrd"]
    with pytest.raises(InputError, match="use a name ending in .nrrd"):
        write_volume(Volume(np.zeros((1, 10, 10), np.uint8)), tmp_path / "x.vtk")


def test_shared_files_untouched(us_dicom: Path, tmp_path: Path):
    """Reading never writes beside the input (the shared data folder is read-only)."""
    copy = shutil.copy(us_dicom / "OBXXXX1A_rle.dcm", tmp_path / "a.dcm")
    read_volume(copy)
    assert os.listdir(tmp_path) == ["a.dcm"]
