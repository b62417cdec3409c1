"""Write volumes (NRRD, NIfTI, MetaImage) and PNG pictures, atomically.

Every writer writes to a hidden temporary file in the destination folder and then renames it over the
destination (``os.replace``), so a failure or a cancel never leaves a partial file behind.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..volume import Volume
from .readers import PERSISTED_KEYS, PERSISTED_PREFIX, extension

WRITE_EXTENSIONS = (".nrrd", ".nii", ".nii.gz", ".mha")


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """A scalar SimpleITK image with the volume's pixels and exact geometry (bool becomes uint8)."""
    arr = np.asarray(volume.array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=False)
    image.SetSpacing(tuple(float(s) for s in volume.spacing))
    image.SetOrigin(tuple(float(o) for o in volume.origin))
    image.SetDirection(tuple(float(v) for v in np.asarray(volume.direction, dtype=float).reshape(9)))
    return image


def atomic_write(path: Union[str, Path], write: Callable[[str], None]) -> Path:
    """Call ``write(temp_path)`` on a temporary file beside ``path``, then rename it to ``path``.

    The temporary name keeps the destination's extension so that format-by-extension writers work.
    On any error the temporary file is removed and the destination is left untouched.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".part{extension(dest)}", dir=dest.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return dest


def write_volume(volume: Volume, path: Union[str, Path], compress: bool = True) -> Path:
    """Write a validated volume as ``.nrrd``, ``.nii``, ``.nii.gz`` or ``.mha`` with its exact geometry.

    Safe metadata (modality, spacing source, ...) is stored in NRRD/MetaImage headers and restored by
    :func:`read_volume`; NIfTI has no place for it.  NIfTI stores geometry in float32.
    """
    dest = Path(path)
    ext = extension(dest)
    if ext not in WRITE_EXTENSIONS:
        raise InputError(f"Cannot save a volume as '{dest.name}'; use a name ending in .nrrd, .nii.gz, .nii or .mha.")
    volume.validate()
    image = volume_to_sitk(volume)
    for key in PERSISTED_KEYS:
        if key in volume.metadata and volume.metadata[key] is not None:
            value = " ".join(str(volume.metadata[key]).split())
            image.SetMetaData(PERSISTED_PREFIX + key, value)

    def _write(tmp: str) -> None:
        try:
            sitk.WriteImage(image, tmp, useCompression=bool(compress))
        except RuntimeError as exc:
            raise InputError(f"Could not save {dest.name}: {str(exc).splitlines()[-1].strip()}") from None

    return atomic_write(dest, _write)


def to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 as is; other types min–max scaled to 0–255 (a constant image becomes 0)."""
    a = np.asarray(array)
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise InputError("The picture to save contains NaN or infinite values.")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def write_png(array2d: np.ndarray, path: Union[str, Path]) -> Path:
    """Save a 2D grey array (or an ``(H, W, 3|4)`` colour array) as PNG, atomically."""
    from PIL import Image

    a = np.asarray(array2d)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise InputError(f"Cannot save an array of shape {a.shape} as a PNG picture; a 2D image is needed.")
    dest = Path(path)
    if extension(dest) != ".png":
        raise InputError(f"Cannot save a PNG picture as '{dest.name}'; use a name ending in .png.")
    picture = Image.fromarray(to_uint8(a))
    return atomic_write(dest, lambda tmp: picture.save(tmp, format="PNG"))
