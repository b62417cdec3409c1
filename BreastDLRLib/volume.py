"""The one image type of the engine: a 3D array with its exact geometry.

Conventions (the same as SimpleITK, so reading and writing files loses nothing):

* ``array`` has shape ``(k, j, i)`` = (slices, rows, columns).  A 2D image is a volume of one slice.
* ``spacing`` is ``(si, sj, sk)`` in mm, along the i (column), j (row) and k (slice) axes.
* ``origin`` is the LPS position in mm of the centre of voxel ``(i, j, k) = (0, 0, 0)``.
* ``direction`` is a 3×3 matrix whose columns are the LPS unit vectors of the i, j and k axes.
* physical LPS point of index ``(i, j, k)``: ``origin + direction @ (spacing * (i, j, k))``.
* RAS (Slicer's world) is LPS with the first two coordinates negated.

``metadata`` keeps only what the pipeline needs and never patient identifiers: ``modality``,
``manufacturer``, ``source`` (the file's base name), ``spacing_source`` (``"file"``,
``"ultrasound_regions"``, ``"user"``, ``"synthetic"`` or ``"unknown"``), ``acquisition_axis`` (the array
axis along which the probe swept, 0 by default) and ``is_2d``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Sequence, Tuple

import numpy as np

from .errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
SPACING_SOURCES = ("file", "ultrasound_regions", "user", "synthetic", "unknown")


@dataclass
class Volume:
    array: np.ndarray
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim == 2:
            self.array = self.array[np.newaxis]
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        self.metadata = dict(self.metadata)
        self.metadata.setdefault("spacing_source", "unknown")
        self.metadata.setdefault("acquisition_axis", 0)
        self.metadata.setdefault("is_2d", self.array.shape[0] == 1)

    # ------------------------------------------------------------------ geometry
    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def is_2d(self) -> bool:
        return bool(self.metadata.get("is_2d", self.array.shape[0] == 1))

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def ijk_to_lps(self) -> np.ndarray:
        """4×4 matrix taking homogeneous (i, j, k, 1) to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4×4 matrix taking homogeneous (i, j, k, 1) to RAS mm (Slicer's IJKToRAS)."""
        m = self.ijk_to_lps()
        m[:3, :] = LPS_TO_RAS @ m[:3, :]
        return m

    def index_to_ras(self, ijk: Sequence[float]) -> np.ndarray:
        """RAS mm of a continuous index given as (i, j, k) — note: column, row, slice."""
        return (self.ijk_to_ras() @ np.r_[np.asarray(ijk, dtype=float), 1.0])[:3]

    def array_index_to_ras(self, kji: Sequence[float]) -> np.ndarray:
        """RAS mm of a continuous array index given as (k, j, i) — the numpy order."""
        k, j, i = kji
        return self.index_to_ras((i, j, k))

    def spacing_kji(self) -> Tuple[float, float, float]:
        """Spacing in array order (slice, row, column), handy for numpy/scipy code."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    # ------------------------------------------------------------------ helpers
    def with_array(self, array: np.ndarray, **metadata: Any) -> "Volume":
        """A volume with the same geometry and a new array of the same shape."""
        array = np.asarray(array)
        if array.ndim == 2:
            array = array[np.newaxis]
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        meta = dict(self.metadata)
        meta.update(metadata)
        return Volume(array, self.spacing, self.origin, self.direction.copy(), meta)

    def same_geometry(self, other: "Volume", atol: float = 1e-6) -> bool:
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def validate(self) -> "Volume":
        """Refuse what the pipeline cannot use, with a message a clinician understands."""
        src = self.metadata.get("source") or "the image"
        a = self.array
        if a.ndim != 3:
            raise InputError(f"{src}: expected a 2D image or a 3D volume, got an array of {a.ndim} dimensions.")
        if min(a.shape) < 1 or a.shape[1] < 8 or a.shape[2] < 8:
            raise InputError(f"{src}: the image is too small ({a.shape[2]}×{a.shape[1]} pixels); at least 8×8 is needed.")
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise InputError(f"{src}: pixel type {a.dtype} is not a grey-level image.")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise InputError(f"{src}: the image contains NaN or infinite values; re-export it from the scanner or PACS.")
        sp = np.asarray(self.spacing)
        if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise InputError(
                f"{src}: pixel spacing {tuple(self.spacing)} mm is not positive; give the true spacing (e.g. --spacing 0.1)."
            )
        if not np.all(np.isfinite(self.origin)):
            raise InputError(f"{src}: the image origin is not a finite position.")
        d = self.direction
        if not np.all(np.isfinite(d)) or abs(abs(np.linalg.det(d)) - 1.0) > 1e-3:
            raise InputError(f"{src}: the image orientation matrix is not a rotation; the file's geometry is damaged.")
        return self

    def describe(self) -> Dict[str, Any]:
        """Geometry and safe metadata as JSON-friendly values (no patient identifiers are ever stored)."""
        return {
            "shape_kji": list(self.array.shape),
            "spacing_mm": list(self.spacing),
            "origin_lps": list(self.origin),
            "direction": self.direction.tolist(),
            "metadata": {k: v for k, v in self.metadata.items() if isinstance(v, (str, int, float, bool, type(None)))},
        }
