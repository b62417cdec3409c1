"""Image and volume input/output: every file enters and leaves the engine as a :class:`Volume`."""
from __future__ import annotations

from .dicom_us import read_dicom_file, read_dicom_series, ultrasound_region_spacing  # noqa: F401
from .readers import read_mask, read_volume, to_grey, volume_from_sitk  # noqa: F401
from .writers import volume_to_sitk, write_png, write_volume  # noqa: F401

__all__ = [
    "read_volume",
    "read_mask",
    "read_dicom_file",
    "read_dicom_series",
    "ultrasound_region_spacing",
    "to_grey",
    "volume_from_sitk",
    "volume_to_sitk",
    "write_volume",
    "write_png",
]
