"""DICOM reading for ultrasound: single files with pydicom, series folders with SimpleITK/GDCM.

Pixels: MONOCHROME1 (inverted to MONOCHROME2), MONOCHROME2 (Rescale Slope/Intercept applied), RGB
(both planar configurations), YBR_FULL/YBR_FULL_422/YBR_ICT/YBR_RCT (RGB via pydicom), PALETTE COLOR
(8/16-bit, segmented LUTs; palette colours are display colours, so the grey is uint8) → grey by
luminance; any bit depth and byte order (returned in native order), and every compression that the
installed pydicom decoders (pylibjpeg-libjpeg, -openjpeg, -rle, Pillow) handle; a missing decoder is
named with the pip package to install.  Frames become slices: cine frames (no slice positions) are
time, ``metadata["frames_are_time"]`` and k spacing 1 mm; frames with positions (enhanced multi-frame)
are sorted along the slice normal and give origin, direction and k spacing.

Spacing, first match wins: Pixel Spacing (row, column) / Imager Pixel Spacing → ``"file"``; the
Sequence of Ultrasound Regions (0018,6011), largest region calibrated in cm on both axes →
``"ultrasound_regions"``; the caller's spacing → ``"user"``; else ``"unknown"`` (1 mm).

Only technical tags are copied into metadata (modality, manufacturer, photometric, transfer syntax);
names, IDs, dates and other identifiers never are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..volume import Volume
from .readers import (
    SpacingArg,
    native,
    resolve_spacing,
    to_grey,
    unreadable,
    user_spacing,
    volume_from_sitk,
)

CM_UNITS = 3  # PhysicalUnitsX/YDirection code for centimetres
# pip packages providing pydicom decoders, by transfer syntax UID prefix / UID.
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline (Pillow also works)
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}


# ---------------------------------------------------------------------------------------- detection
def has_dicom_preamble(path: Union[str, Path]) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def looks_like_dicom(path: Union[str, Path]) -> bool:
    """True for a DICOM image file, with or without the 128-byte preamble."""
    if has_dicom_preamble(path):
        return True
    try:
        ds = _dcmread(Path(path), stop_before_pixels=True)
    except InputError:
        return False
    return "Rows" in ds and "Columns" in ds


def _dcmread(path: Path, stop_before_pixels: bool = False) -> Any:
    """pydicom dataset, forcing files that lack the preamble; unreadable files raise InputError."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
            if "Rows" not in ds or "Columns" not in ds:
                raise InvalidDicomError("no DICOM header and no image attributes")
        if "TransferSyntaxUID" not in ds.file_meta:
            implicit, little = ds.original_encoding
            uid = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
            ds.file_meta.TransferSyntaxUID = uid
        return ds
    except InputError:
        raise
    except InvalidDicomError:
        raise unreadable(path.name, "it is not a DICOM file") from None
    except Exception as exc:  # pydicom raises many types for damaged files
        raise unreadable(path.name, f"its DICOM data is damaged: {exc}") from None


# ---------------------------------------------------------------------------------------- spacing
def _first_item(ds: Any, *keywords: str) -> Any:
    """Walk ``ds.Kw1[0].Kw2[0]...``; None when any step is missing."""
    node = ds
    for kw in keywords:
        seq = node.get(kw) if node is not None else None
        if not seq:
            return None
        node = seq[0]
    return node


def _positive_pair(value: Any) -> Optional[Tuple[float, float]]:
    try:
        a, b = float(value[0]), float(value[1])
    except (TypeError, ValueError, IndexError):
        return None
    return (a, b) if np.isfinite([a, b]).all() and a > 0 and b > 0 else None


def pixel_spacing_tag(ds: Any) -> Optional[Tuple[float, float]]:
    """``(si, sj)`` mm from Pixel Spacing (stored row, column) or Imager Pixel Spacing; None if absent."""
    candidates = [ds.get("PixelSpacing")]
    measures = _first_item(ds, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence")
    if measures is not None:
        candidates.append(measures.get("PixelSpacing"))
    measures = _first_item(ds, "PerFrameFunctionalGroupsSequence", "PixelMeasuresSequence")
    if measures is not None:
        candidates.append(measures.get("PixelSpacing"))
    candidates.append(ds.get("ImagerPixelSpacing"))
    for value in candidates:
        pair = _positive_pair(value) if value is not None else None
        if pair is not None:
            row_spacing, col_spacing = pair
            return (col_spacing, row_spacing)
    return None


def ultrasound_region_spacing(ds: Any) -> Optional[Tuple[float, float]]:
    """``(si, sj)`` mm from the largest ultrasound region calibrated in cm on both axes; None if none."""
    best: Optional[Tuple[float, float]] = None
    best_area = -1
    for region in ds.get("SequenceOfUltrasoundRegions") or []:
        if region.get("PhysicalUnitsXDirection") != CM_UNITS or region.get("PhysicalUnitsYDirection") != CM_UNITS:
            continue
        pair = _positive_pair([abs(float(region.get("PhysicalDeltaX", 0) or 0)),
                               abs(float(region.get("PhysicalDeltaY", 0) or 0))])
        if pair is None:
            continue
        try:
            area = (int(region.RegionLocationMaxX1) - int(region.RegionLocationMinX0) + 1) * (
                int(region.RegionLocationMaxY1) - int(region.RegionLocationMinY0) + 1
            )
        except (AttributeError, TypeError, ValueError):
            area = 0
        if area > best_area:
            best_area = area
            best = (pair[0] * 10.0, pair[1] * 10.0)
    return best


# ---------------------------------------------------------------------------------------- geometry
def _orientation(ds: Any) -> Optional[np.ndarray]:
    value = ds.get("ImageOrientationPatient")
    if value is None:
        item = _first_item(ds, "SharedFunctionalGroupsSequence", "PlaneOrientationSequence")
        item = item or _first_item(ds, "PerFrameFunctionalGroupsSequence", "PlaneOrientationSequence")
        value = item.get("ImageOrientationPatient") if item is not None else None
    if value is None or len(value) != 6:
        return None
    row, col = np.asarray(value[:3], float), np.asarray(value[3:], float)
    normal = np.cross(row, col)
    if not np.isfinite(normal).all() or abs(np.linalg.norm(normal) - 1.0) > 1e-3:
        return None
    return np.column_stack([row, col, normal])


def _frame_positions(ds: Any, frames: int) -> Optional[np.ndarray]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) == frames:
        out = []
        for item in per_frame:
            pos = _first_item(item, "PlanePositionSequence")
            if pos is None or pos.get("ImagePositionPatient") is None:
                return None
            out.append([float(v) for v in pos.ImagePositionPatient])
        return np.asarray(out)
    if frames == 1 and ds.get("ImagePositionPatient") is not None:
        return np.asarray([[float(v) for v in ds.ImagePositionPatient]])
    return None


def _spatial_geometry(
    ds: Any, frames: int
) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[float]]]:
    """(frame order, origin, direction, k spacing) when the file gives slice positions and orientation."""
    direction = _orientation(ds)
    positions = _frame_positions(ds, frames)
    if direction is None or positions is None:
        return None
    depth = positions @ direction[:, 2]
    order = np.argsort(depth, kind="stable")
    if frames == 1:
        return order, positions[0], direction, None
    steps = np.diff(depth[order])
    if np.any(steps <= 1e-6):
        return None  # repeated positions: not a volume
    return order, positions[order[0]], direction, float(np.median(steps))


def _slice_thickness(ds: Any) -> float:
    try:
        value = float(ds.get("SliceThickness", 1.0) or 1.0)
    except (TypeError, ValueError):
        return 1.0
    return value if np.isfinite(value) and value > 0 else 1.0


# ---------------------------------------------------------------------------------------- pixels
def _decode(ds: Any, name: str) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Decoded pixels (frames first) and pydicom's description of them (photometric after decoding)."""
    from pydicom.pixels import get_decoder

    uid = ds.file_meta.TransferSyntaxUID
    ts_name = getattr(uid, "name", str(uid))
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise InputError(
            f"{name} is compressed as '{ts_name}', which BreastDLR cannot decode; export it from the scanner "
            "or PACS uncompressed, or as JPEG / JPEG 2000."
        ) from None
    if not decoder.is_available:
        package = _DECODER_PACKAGES.get(str(uid), "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")
        raise InputError(
            f"{name} is compressed as '{ts_name}' and no decoder for it is installed; install one with "
            f"'pip install {package}' and try again."
        )
    try:
        arr, info = decoder.as_array(ds, as_rgb=True)
    except InputError:
        raise
    except Exception as exc:
        raise unreadable(name, f"its pixel data could not be decoded: {exc}") from None
    frames = int(info.get("number_of_frames", 1) or 1)
    arr = native(arr)
    if frames == 1:
        arr = arr[np.newaxis]
    return arr, dict(info, number_of_frames=frames)


def _to_grey_frames(arr: np.ndarray, info: Dict[str, Any], ds: Any, name: str) -> np.ndarray:
    """Frames-first array (n, rows, cols[, samples]) to grey (n, rows, cols)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    photometric = str(info.get("photometric_interpretation", ds.get("PhotometricInterpretation", ""))).upper()
    samples = int(info.get("samples_per_pixel", 1) or 1)
    if samples == 1:
        if photometric == "PALETTE COLOR":
            try:
                rgb = apply_color_lut(arr, ds)
            except Exception as exc:
                raise unreadable(name, f"its colour palette could not be applied: {exc}") from None
            return _palette_grey(native(rgb))
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise InputError(f"{name} has the unsupported colour type '{photometric}' for a one-channel image.")
        if "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds:
            slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
            if "ModalityLUTSequence" in ds or slope != 1.0 or intercept != 0.0:
                arr = native(apply_modality_lut(arr, ds))
        if photometric == "MONOCHROME1":
            arr = _invert(arr, int(info.get("bits_stored", 0) or 0))
        return arr
    if photometric != "RGB":  # pydicom already turned YBR_FULL(_422) and JPEG 2000 YBR_ICT/RCT into RGB
        raise InputError(
            f"{name} has the unsupported colour type '{photometric}'; export it from the scanner as RGB or grey."
        )
    return to_grey(arr)


def _palette_grey(rgb: np.ndarray) -> np.ndarray:
    """Grey of palette colours as uint8: palette entries are display colours, and 16-bit entries
    (0–65535) are scaled to 0–255 (÷257) so every palette image has the range of 8-bit pictures."""
    if rgb.dtype == np.uint8:
        return to_grey(rgb)
    grey = to_grey(rgb.astype(np.float64))
    top = 65535.0 if rgb.dtype.itemsize >= 2 else 255.0
    return np.clip(np.rint(grey * (255.0 / top)), 0, 255).astype(np.uint8)


def _invert(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    """MONOCHROME1 → MONOCHROME2: unsigned ``(2^bits − 1) − v``; signed/float ``min + max − v``."""
    if np.issubdtype(arr.dtype, np.unsignedinteger) and bits_stored > 0:
        return ((1 << bits_stored) - 1 - arr.astype(np.int64)).astype(arr.dtype)
    lo, hi = arr.min(), arr.max()
    return (lo + hi - arr).astype(arr.dtype)


# ---------------------------------------------------------------------------------------- metadata
def _text(value: Any) -> str:
    return " ".join(str(value).split()) if value is not None else ""


def safe_metadata(ds: Any, name: str) -> Dict[str, Any]:
    """The technical tags BreastDLR keeps; never names, IDs, dates or institutions."""
    uid = ds.file_meta.get("TransferSyntaxUID")
    return {
        "source": name,
        "modality": _text(ds.get("Modality")),
        "manufacturer": _text(ds.get("Manufacturer")),
        "photometric": _text(ds.get("PhotometricInterpretation")),
        "transfer_syntax": getattr(uid, "name", _text(uid)),
    }


# ---------------------------------------------------------------------------------------- readers
def read_dicom_file(path: Union[str, Path], spacing: SpacingArg = None) -> Volume:
    """Read one DICOM image file (single- or multi-frame) as grey slices (not validated)."""
    p = Path(path)
    ds = _dcmread(p)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if "Image" in str(getattr(ds.get("SOPClassUID"), "name", "")) or "Rows" in ds:
            raise unreadable(p.name, "its image data is missing (the file may be cut short)")
        raise InputError(
            f"{p.name} is a DICOM file without an image (for example a report); open an image file of the study."
        )
    arr, info = _decode(ds, p.name)
    grey = _to_grey_frames(arr, info, ds, p.name)
    frames = grey.shape[0]
    meta = safe_metadata(ds, p.name)
    meta["frames"] = frames

    origin = np.zeros(3)
    direction = np.eye(3)
    k_spacing = 1.0
    geometry = _spatial_geometry(ds, frames)
    if geometry is not None:
        order, origin, direction, k_step = geometry
        grey = grey[order]
        k_spacing = k_step if k_step is not None else _slice_thickness(ds)
    meta["frames_are_time"] = frames > 1 and geometry is None

    single_plane = frames == 1 or bool(meta["frames_are_time"])
    user = user_spacing(spacing, single_plane)
    in_plane = pixel_spacing_tag(ds)
    source = "file"
    if in_plane is None:
        in_plane = ultrasound_region_spacing(ds)
        source = "ultrasound_regions"
    file_spacing = (in_plane[0], in_plane[1], k_spacing) if in_plane is not None else None
    if user is not None and not single_plane:
        user = (user[0], user[1], k_spacing)  # slice positions give the k spacing
    sp = resolve_spacing(file_spacing, source, user, meta, default=(1.0, 1.0, k_spacing))
    return Volume(grey, sp, tuple(origin), direction, meta)


def read_dicom_series(folder: Union[str, Path], spacing: SpacingArg = None) -> Volume:
    """Read the one DICOM series in a folder, slices sorted by position (GDCM), as grey (not validated)."""
    d = Path(folder)
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(d))
    except RuntimeError:
        ids = ()
    if not ids:
        raise InputError(f"The folder {d.name} holds no DICOM series; choose a DICOM folder or a single image file.")
    if len(ids) > 1:
        raise InputError(
            f"The folder {d.name} holds {len(ids)} DICOM series; choose the folder or a file of one series."
        )
    files: List[str] = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(d), ids[0]))
    if len(files) == 1:
        return read_dicom_file(files[0], spacing)
    ds0 = _dcmread(Path(files[0]), stop_before_pixels=True)
    if ds0.get("ImagePositionPatient") is None or _orientation(ds0) is None:
        raise InputError(
            f"The folder {d.name} holds {len(files)} DICOM images without slice positions (separate 2D images, "
            "not a volume); open them one at a time."
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise unreadable(d.name, exc) from None
    meta = safe_metadata(ds0, d.name)
    meta["frames"] = len(files)
    meta["frames_are_time"] = False
    vol = volume_from_sitk(image, meta)
    in_plane = pixel_spacing_tag(ds0)
    source = "file"
    if in_plane is None:
        in_plane = ultrasound_region_spacing(ds0)
        source = "ultrasound_regions"
    k = vol.spacing[2]
    user = user_spacing(spacing, single_plane=False)
    file_spacing = (in_plane[0], in_plane[1], k) if in_plane is not None else None
    if user is not None:
        user = (user[0], user[1], k)
    vol.spacing = resolve_spacing(file_spacing, source, user, vol.metadata, default=(1.0, 1.0, k))
    return vol
