"""Read any supported image or volume file into a :class:`~BreastDLRLib.volume.Volume`.

``read_volume`` looks at the file's content (and then its extension) and hands it to one reader:

* DICOM (``DICM`` preamble, or a file pydicom reads as an image) and DICOM folders: :mod:`.dicom_us`.
* NRRD, NIfTI, MetaImage (and other formats ITK knows): SimpleITK, geometry kept exactly (LPS).
* PNG, JPEG, BMP, TIFF: Pillow; these carry no trustworthy spacing.

Colour is turned into grey with the luminance ``0.299 R + 0.587 G + 0.114 B``.  A file's own spacing
always wins; the caller's ``spacing`` is used only when the file has none.  Every volume returned has
passed :meth:`Volume.validate`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..volume import SPACING_SOURCES, Volume

SpacingArg = Union[float, Sequence[float], None]
Spacing3 = Tuple[float, float, float]

SITK_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
PILLOW_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic", ".ima", "")
SUPPORTED_FORMATS = "DICOM, NRRD, NIfTI, MetaImage (.mha/.mhd), PNG, JPEG, BMP or TIFF"
SPACING_NOTE = (
    "The file gives no pixel spacing: measurements are in pixels (1 pixel = 1 mm) until a spacing is given "
    "(e.g. --spacing 0.1)."
)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Safe metadata that write_volume stores in NRRD/MetaImage headers and read_volume restores.
PERSISTED_PREFIX = "BreastDLR_"
PERSISTED_KEYS = ("modality", "manufacturer", "spacing_source", "acquisition_axis", "is_2d", "frames_are_time")

_MAGIC_PILLOW = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*")


# ---------------------------------------------------------------------------------------- helpers
def extension(path: Union[str, Path]) -> str:
    """Lower-case extension, keeping the double ``.nii.gz``."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def unreadable(name: str, reason: Any) -> InputError:
    """The standard error for a file whose content cannot be decoded."""
    text = _clean_reason(str(reason))
    return InputError(f"{name} is not a readable image: {text}; check that the file is complete, or export it again.")


def _clean_reason(text: str) -> str:
    """One short line from a library's error message (ITK messages carry source paths and addresses)."""
    if "ERROR:" in text:
        text = text.rsplit("ERROR:", 1)[1]
    text = re.sub(r"\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    text = re.sub(r'"?/[^"\s]*/([^/"\s]+)"?', r"\1", text)  # absolute paths -> base names
    text = " ".join(text.split()).strip()
    if "Unable to determine ImageIO reader" in text:
        return "its content does not match any image format"
    if "File cannot be read" in text:
        return "its data could not be read (the file may be cut short)"
    text = re.split(r"(?<=[^\d\s])\.\s| - ", text)[0].strip().rstrip(".")  # first sentence only
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        text = text[0].lower() + text[1:]
    return text[:200] or "unknown error"


def to_grey(array: np.ndarray) -> np.ndarray:
    """Grey levels of a colour array whose last axis holds the channels (1 to 4).

    RGB(A) → luminance ``0.299 R + 0.587 G + 0.114 B`` (alpha dropped); grey+alpha → grey.  Integer input
    stays in its integer type (rounded), floating input stays floating.
    """
    a = np.asarray(array)
    n = a.shape[-1]
    if n in (1, 2):  # grey, grey + alpha
        return a[..., 0]
    if n not in (3, 4):
        raise ValueError(f"cannot convert {n} channels to grey")
    w = np.asarray(LUMA_WEIGHTS)
    grey = a[..., 0] * w[0] + a[..., 1] * w[1] + a[..., 2] * w[2]
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        return np.clip(np.rint(grey), info.min, info.max).astype(a.dtype)
    if np.issubdtype(a.dtype, np.floating):
        return grey.astype(a.dtype)
    return grey.astype(np.float32)


def native(array: np.ndarray) -> np.ndarray:
    """The array in native byte order and C-contiguous (big-endian DICOM/TIFF data come otherwise)."""
    a = np.asarray(array)
    if a.dtype.byteorder not in ("=", "|"):
        a = a.astype(a.dtype.newbyteorder("="))
    return np.ascontiguousarray(a)


def user_spacing(spacing: SpacingArg, single_plane: bool = True) -> Optional[Spacing3]:
    """The caller's spacing as ``(si, sj, sk)`` mm, or None.

    A number ``s`` means ``(s, s, 1.0)`` for 2D images and cine frames (``single_plane``) and ``(s, s, s)``
    for a stack; a pair ``(si, sj)`` means ``(si, sj, 1.0)``; a triple is taken as is (ITK order).
    """
    if spacing is None:
        return None
    if np.ndim(spacing) == 0:
        s = float(spacing)  # type: ignore[arg-type]
        out = (s, s, 1.0 if single_plane else s)
    else:
        vals = [float(v) for v in spacing]  # type: ignore[union-attr]
        if len(vals) == 2:
            out = (vals[0], vals[1], 1.0)
        elif len(vals) == 3:
            out = (vals[0], vals[1], vals[2])
        else:
            raise InputError(f"The spacing {tuple(vals)} must be one number or 2 or 3 numbers in mm.")
    if not all(np.isfinite(out)) or min(out) <= 0:
        raise InputError(f"The spacing {out} mm is not valid; give positive numbers in mm (e.g. --spacing 0.1).")
    return out


def resolve_spacing(
    file_spacing: Optional[Spacing3],
    file_source: str,
    user: Optional[Spacing3],
    metadata: Dict[str, Any],
    default: Spacing3 = (1.0, 1.0, 1.0),
) -> Spacing3:
    """Pick the file's spacing, else the user's, else ``default`` (unknown), and record the choice."""
    if file_spacing is not None:
        metadata["spacing_source"] = file_source
        if user is not None:
            metadata["spacing_ignored"] = True
        return file_spacing
    if user is not None:
        metadata["spacing_source"] = "user"
        return user
    metadata["spacing_source"] = "unknown"
    metadata["spacing_note"] = SPACING_NOTE
    return default


# ---------------------------------------------------------------------------------------- dispatch
def sniff(path: Path) -> str:
    """``"dicom"``, ``"sitk"``, ``"pillow"`` or ``"unknown"`` from the first bytes, then the extension."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if any(head.startswith(m) for m in _MAGIC_PILLOW):
        return "pillow"
    if head.startswith(b"NRRD"):
        return "sitk"
    ext = extension(path)
    if ext in SITK_EXTENSIONS:
        return "sitk"
    if head.startswith(b"BM") or ext in PILLOW_EXTENSIONS:  # "BM" is a weak magic: after the extensions
        return "pillow"
    if ext in DICOM_EXTENSIONS:
        return "dicom"
    return "unknown"


def read_volume(path: Union[str, Path], spacing: SpacingArg = None) -> Volume:
    """Read a 2D image, a 3D volume or a DICOM series folder as a validated :class:`Volume`.

    ``spacing`` (mm) is used only when the file carries no spacing of its own; otherwise it is ignored
    and ``metadata["spacing_ignored"]`` is True.
    """
    from . import dicom_us

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p} was not found; check the file or folder name.")
    if p.is_dir():
        return dicom_us.read_dicom_series(p, spacing).validate()
    if p.stat().st_size == 0:
        raise InputError(f"{p.name} is empty (0 bytes); copy or export the file again.")
    kind = sniff(p)
    if kind == "unknown":
        kind = _guess_unknown(p)
    if kind == "dicom":
        vol = dicom_us.read_dicom_file(p, spacing)
    elif kind == "sitk":
        vol = read_sitk_file(p, spacing)
    elif kind == "pillow":
        vol = read_pillow_file(p, spacing)
    else:
        raise InputError(f"{p.name} is not in a supported format; BreastDLR reads {SUPPORTED_FORMATS} files.")
    return vol.validate()


def _guess_unknown(path: Path) -> str:
    """For an unfamiliar extension: DICOM without preamble, then any format ITK can read."""
    from .dicom_us import looks_like_dicom

    if looks_like_dicom(path):
        return "dicom"
    try:
        if sitk.ImageFileReader().GetImageIOFromFileName(str(path)):
            return "sitk"
    except RuntimeError:
        pass
    return "unsupported"


# ---------------------------------------------------------------------------------------- SimpleITK
def volume_from_sitk(image: sitk.Image, metadata: Optional[Dict[str, Any]] = None) -> Volume:
    """A :class:`Volume` holding a SimpleITK image's pixels and exact geometry (not validated).

    2D images become one slice (k spacing 1 mm, z origin 0); 4D/5D images are accepted only when the
    extra axes have size 1; vector pixels become grey (:func:`to_grey`).
    """
    meta = dict(metadata or {})
    name = meta.get("source") or "the image"
    dim = image.GetDimension()
    size = image.GetSize()
    if dim > 3 and any(s > 1 for s in size[3:]):
        raise InputError(
            f"{name} has {dim} dimensions (a time series?); BreastDLR reads 2D images and 3D volumes, "
            "so save one time point as its own file."
        )
    arr = sitk.GetArrayFromImage(image)
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        if ncomp > 4:
            raise InputError(
                f"{name} has {ncomp} values per voxel (a vector or multi-channel image); "
                "BreastDLR reads grey or colour images only."
            )
        arr = to_grey(arr)
    spacing = np.ones(3)
    origin = np.zeros(3)
    direction = np.eye(3)
    n = min(dim, 3)
    spacing[:n] = image.GetSpacing()[:n]
    origin[:n] = image.GetOrigin()[:n]
    direction[:n, :n] = np.asarray(image.GetDirection(), dtype=float).reshape(dim, dim)[:n, :n]
    if dim > 3:
        arr = arr.reshape(arr.shape[dim - 3:])  # drop the leading size-1 axes (numpy order is reversed)
    if dim == 2:
        arr = arr[np.newaxis]
    return Volume(native(arr), tuple(spacing), tuple(origin), direction, meta)


def _header_text(path: Path, limit: int = 65536) -> str:
    with open(path, "rb") as fh:
        head = fh.read(limit)
    for sep in (b"\n\n", b"\r\n\r\n"):  # NRRD: header ends at the first blank line
        if sep in head:
            head = head.split(sep, 1)[0]
            break
    return head.decode("latin-1", errors="replace")


def file_has_spacing(path: Path) -> bool:
    """Whether the file states a spacing (NRRD and MetaImage may leave it out; NIfTI always has pixdim)."""
    ext = extension(path)
    if ext in (".nrrd", ".nhdr"):
        text = _header_text(path)
        return bool(re.search(r"^(space directions|spacings)\s*:", text, re.MULTILINE | re.IGNORECASE))
    if ext in (".mha", ".mhd"):
        text = _header_text(path).split("ElementDataFile", 1)[0]
        return bool(re.search(r"^\s*Element(Spacing|Size)\s*=", text, re.MULTILINE))
    return True


def read_sitk_file(path: Union[str, Path], spacing: SpacingArg = None) -> Volume:
    """Read NRRD / NIfTI / MetaImage (or another ITK format) with SimpleITK, geometry exact (LPS)."""
    p = Path(path)
    name = p.name
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _sitk_error(name, exc) from None
    dim = reader.GetDimension()
    size = reader.GetSize()
    if dim > 3 and any(s > 1 for s in size[3:]):
        raise InputError(
            f"{name} has {dim} dimensions (a time series?); BreastDLR reads 2D images and 3D volumes, "
            "so save one time point as its own file."
        )
    stored = _persisted_metadata(reader)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise _sitk_error(name, exc) from None
    meta: Dict[str, Any] = {"source": name, "modality": stored.pop("modality", "")}
    meta.update(stored)
    vol = volume_from_sitk(image, meta)
    single_plane = vol.array.shape[0] == 1
    user = user_spacing(spacing, single_plane)
    has_spacing = file_has_spacing(p) and stored.get("spacing_source") != "unknown"
    if has_spacing:
        source = stored.get("spacing_source", "file")
        vol.spacing = resolve_spacing(vol.spacing, source, user, vol.metadata)
    else:
        vol.metadata.pop("spacing_source", None)
        vol.spacing = resolve_spacing(None, "file", user, vol.metadata)
    return vol


def _sitk_error(name: str, exc: Exception) -> InputError:
    text = str(exc)
    if "spacing" in text.lower() and "zero" in text.lower():
        return InputError(
            f"{name} states a pixel spacing of zero, which is not valid; fix the spacing in the file "
            "(e.g. re-save it from Slicer) and try again."
        )
    return unreadable(name, text)


def _persisted_metadata(reader: sitk.ImageFileReader) -> Dict[str, Any]:
    """Safe BreastDLR keys a previous write_volume stored in the header (NRRD, MetaImage)."""
    out: Dict[str, Any] = {}
    keys = set(reader.GetMetaDataKeys())
    for key in PERSISTED_KEYS:
        tag = PERSISTED_PREFIX + key
        if tag not in keys:
            continue
        value = reader.GetMetaData(tag).strip()
        if key in ("is_2d", "frames_are_time"):
            out[key] = value.lower() == "true"
        elif key == "acquisition_axis":
            if value in ("0", "1", "2"):
                out[key] = int(value)
        elif key == "spacing_source":
            if value in SPACING_SOURCES:
                out[key] = value
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------- Pillow
def pil_to_array(image: Any) -> np.ndarray:
    """Grey pixels of one Pillow frame, in the image's own bit depth where Pillow keeps it."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode in ("L", "I", "F") or mode.startswith("I;16"):
        return native(np.asarray(image))
    if mode == "LA":
        return np.asarray(image)[..., 0]
    if mode in ("RGB", "RGBA", "RGBX"):
        return to_grey(np.asarray(image))
    return to_grey(np.asarray(image.convert("RGB")))  # P, PA, CMYK, YCbCr, LAB, HSV, ...


def read_pillow_file(path: Union[str, Path], spacing: SpacingArg = None) -> Volume:
    """Read PNG / JPEG / BMP / TIFF (all pages of a multi-page TIFF) as grey slices."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    frames = []
    try:
        with Image.open(p) as im:
            fmt = im.format or ""
            for index in range(getattr(im, "n_frames", 1)):
                im.seek(index)
                frames.append(pil_to_array(im))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise unreadable(p.name, exc) from None
    if len({f.shape for f in frames}) > 1:
        raise InputError(f"{p.name} holds pages of different sizes; save each page as its own image.")
    array = np.stack(frames)
    meta: Dict[str, Any] = {"source": p.name, "modality": "", "file_format": fmt}
    if len(frames) > 1:
        meta["frames"] = len(frames)
    single_plane = len(frames) == 1
    sp = resolve_spacing(None, "file", user_spacing(spacing, single_plane), meta)
    return Volume(array, sp, (0.0, 0.0, 0.0), np.eye(3), meta)


# ---------------------------------------------------------------------------------------- masks
def read_mask(path: Union[str, Path], like: Volume) -> np.ndarray:
    """A binary mask (uint8 0/1, shape of ``like.array``) from a PNG/JPEG/BMP/TIFF or a label volume.

    Picture files: a pixel is inside when it is above half the mask's maximum (0/255 and 0/1 masks both
    work).  Volume files (NRRD, NIfTI, MetaImage, DICOM): non-zero is inside, and when both the mask's and
    the image's spacing came from their files, origin, spacing and direction must match too (1e-3).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"The mask {p} was not found; check the file name.")
    if p.is_file() and p.stat().st_size == 0:
        raise InputError(f"The mask {p.name} is empty (0 bytes); save the mask again.")
    picture = p.is_file() and sniff(p) == "pillow"
    vol = read_pillow_file(p) if picture else read_volume(p)
    arr = vol.array
    if arr.shape != like.array.shape:
        raise InputError(
            f"The mask {p.name} is {_size_text(arr.shape)} but the image is {_size_text(like.array.shape)}; "
            "use the mask made for this image."
        )
    from_files = ("file", "ultrasound_regions")  # geometry is compared only where both files gave it
    if (
        not picture
        and vol.metadata.get("spacing_source") in from_files
        and like.metadata.get("spacing_source") in from_files
        and not vol.same_geometry(like, atol=1e-3)
    ):
        raise InputError(
            f"The mask {p.name} has the image's size but not its position, spacing or orientation; "
            "use the mask made for this image."
        )
    if picture:
        top = float(arr.max()) if arr.size else 0.0
        inside = arr > 0 if top <= 1 else arr > top / 2.0
    else:
        inside = arr != 0
    return inside.astype(np.uint8)


def _size_text(shape: Sequence[int]) -> str:
    k, j, i = shape
    return f"{i}×{j} pixels" if k == 1 else f"{i}×{j}×{k} voxels"
