"""From a lesion-probability volume to lesions: threshold → 3D connected components → drop specks → measure.

Measurements follow what the clinical papers tabulate.  Geometry conventions (see ``volume.py``): array axes
(k, j, i); the depth axis (away from the transducer / skin) is array axis ``metadata["depth_axis"]`` (1 = rows
by default: row 0 touches the skin), the lateral axis is i.  For a 2D image, sizes are areas (mm²) and the
elevation extent is not defined.  When the spacing is unknown (``spacing_source == "unknown"``) every "mm"
is a pixel and ``units`` says so.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .errors import InputError
from .volume import Volume

BBox = Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]


@dataclass
class Lesion:
    id: int
    mask: np.ndarray = field(repr=False)          # bool, cropped to bbox
    bbox_kji: BBox
    centre_kji: Tuple[float, float, float]
    centre_ras: Tuple[float, float, float]
    voxels: int
    volume_mm3: Optional[float]                   # None for a 2D image
    area_mm2: float                               # largest cross-section in the transverse plane
    max_diameter_mm: float
    extent_mm: Dict[str, float]                   # depth, lateral, elevation (None in 2D)
    depth_from_skin_mm: float
    aspect_ratio: float                           # depth extent / lateral extent ("taller than wide" > 1)
    orientation: str                              # "parallel" | "not parallel"
    touches_edge: bool
    mean_probability: float
    units: str = "mm"

    def full_mask(self, shape: Sequence[int]) -> np.ndarray:
        out = np.zeros(tuple(shape), dtype=bool)
        (k0, k1), (j0, j1), (i0, i1) = self.bbox_kji
        out[k0:k1, j0:j1, i0:i1] = self.mask
        return out

    def bbox_mm(self, spacing: Sequence[float]) -> List[float]:
        """Size of the bounding box in mm, in array order (k, j, i)."""
        sk, sj, si = spacing[2], spacing[1], spacing[0]
        return [(b - a) * s for (a, b), s in zip(self.bbox_kji, (sk, sj, si))]

    def measurements(self) -> Dict[str, Any]:
        d = asdict(self)
        for k in ("mask", "id", "bbox_kji", "centre_kji", "centre_ras"):
            d.pop(k)
        return d


def max_feret_diameter(mask: np.ndarray, spacing_kji: Sequence[float]) -> float:
    """Largest distance (mm) across the union of the mask's voxels, measured between voxel corners.

    Exact for the voxelised shape: a 10×4 rectangle of 1 mm pixels measures √(10² + 4²) mm.
    """
    if not mask.any():
        return 0.0
    # the first and last voxel of every row along the last axis suffice: every voxel between them lies in the
    # convex hull of their corners (memory O(rows), not O(voxels), for large or noisy masks)
    has = mask.any(axis=2)
    first = np.argmax(mask, axis=2)
    last = mask.shape[2] - 1 - np.argmax(mask[:, :, ::-1], axis=2)
    kk, jj = np.nonzero(has)
    pts = np.concatenate([np.stack([kk, jj, first[kk, jj]], 1), np.stack([kk, jj, last[kk, jj]], 1)]).astype(float)
    flat = [a for a in range(3) if mask.shape[a] == 1]
    offsets = np.array(np.meshgrid(*[[0.0] if a in flat else [-0.5, 0.5] for a in range(3)], indexing="ij")).reshape(3, -1).T
    corners = (pts[:, None, :] + offsets[None]).reshape(-1, 3) * np.asarray(spacing_kji, dtype=float)
    corners = np.unique(corners, axis=0)
    keep = [a for a in range(3) if a not in flat]
    corners = corners[:, keep]
    if len(corners) > 64:
        try:
            from scipy.spatial import ConvexHull

            corners = corners[ConvexHull(corners).vertices]
        except Exception:  # degenerate (collinear / coplanar) sets: fall back to all points
            pass
    if len(corners) > 4000:  # bound the O(n²) step for very large, irregular lesions
        corners = corners[np.linspace(0, len(corners) - 1, 4000).astype(int)]
    from scipy.spatial.distance import pdist

    return float(pdist(corners).max()) if len(corners) > 1 else 0.0


def _measure(lid: int, region: np.ndarray, offset: Tuple[int, int, int], prob: Optional[np.ndarray],
             volume: Volume) -> Lesion:
    shape = volume.shape
    spacing_kji = volume.spacing_kji()
    is_2d = volume.is_2d or shape[0] == 1
    depth_axis = int(volume.metadata.get("depth_axis", 1))
    lateral_axis = 2
    axial_axis = int(volume.metadata.get("acquisition_axis", 0))
    # per-axis projections instead of np.argwhere: a huge component would need 24 bytes per voxel there
    proj = [region.sum(axis=tuple(b for b in range(3) if b != a), dtype=np.int64) for a in range(3)]
    n_vox = int(proj[0].sum())
    nz = [np.flatnonzero(p) for p in proj]
    lo = np.array([z[0] for z in nz]) + offset
    hi = np.array([z[-1] for z in nz]) + offset + 1
    bbox = tuple((int(a), int(b)) for a, b in zip(lo, hi))
    centre = tuple(float((p * np.arange(len(p))).sum() / n_vox + o) for p, o in zip(proj, offset))
    ext = (hi - lo) * np.asarray(spacing_kji)
    # cross-sections in the transverse plane (perpendicular to the acquisition axis)
    areas = region.sum(axis=tuple(a for a in range(3) if a != axial_axis)) * float(
        np.prod([spacing_kji[a] for a in range(3) if a != axial_axis]))
    depth, lateral = float(ext[depth_axis]), float(ext[lateral_axis])
    aspect = depth / lateral if lateral > 0 else float("inf")
    touches = any(
        (lo[a] == 0 or hi[a] == shape[a]) for a in range(3) if not (is_2d and a == 0)
    )
    units = "pixels" if volume.metadata.get("spacing_source") == "unknown" else "mm"
    if prob is not None:
        window = prob[tuple(slice(o, o + n) for o, n in zip(offset, region.shape))]
        mean_p = float(np.sum(window, where=region, dtype=np.float64) / n_vox)  # no copy of the lesion's voxels
    else:
        mean_p = float("nan")
    return Lesion(
        id=lid, mask=region, bbox_kji=bbox, centre_kji=centre,
        centre_ras=tuple(float(v) for v in volume.array_index_to_ras(centre)),
        voxels=n_vox,
        volume_mm3=None if is_2d else float(n_vox * volume.voxel_volume_mm3),
        area_mm2=float(areas.max()),
        max_diameter_mm=max_feret_diameter(region, spacing_kji),
        extent_mm={"depth": depth, "lateral": lateral, "elevation": None if is_2d else float(ext[axial_axis])},
        depth_from_skin_mm=float(lo[depth_axis] * spacing_kji[depth_axis]),
        aspect_ratio=float(aspect), orientation="parallel" if aspect <= 1.0 else "not parallel",
        touches_edge=bool(touches), mean_probability=mean_p, units=units,
    )


def find_lesions(
    probability: Volume,
    threshold: float = 0.5,
    min_size_mm3: float = 1.0,
    min_size_mm2: float = 2.0,
    min_fraction: float = 0.0,
    max_lesions: Optional[int] = None,
    min_extent_mm: float = 0.0,
) -> Tuple[Volume, List[Lesion]]:
    """Threshold, label 3D connected components (26-connectivity), drop specks, measure.

    Specks are components smaller than ``min_size_mm3`` (volumes) or ``min_size_mm2`` (2D images), or than
    ``min_fraction`` of the image (useful when the spacing is unknown).  In a volume, a component thinner than
    ``min_extent_mm`` along any axis (its bounding box: voxels x spacing) is dropped too: a sheet seen on one
    or two fine slices is not a lesion, while on slices as thick as ``min_extent_mm`` one slice suffices.
    Lesions are numbered by size, largest first; the returned label map has the probability's geometry and
    value ``id`` per lesion.
    """
    arr = probability.array
    if arr.ndim != 3:
        raise InputError(f"expected a 3D probability volume, got {arr.ndim} dimensions")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise InputError("The lesion probability map contains NaN values; the model output is unusable (check the input image).")
    binary = arr > threshold
    # uint16 labels where they fit (half the memory of int32 on a full-size ABVS volume), reused as the output
    structure = np.ones((3, 3, 3), dtype=bool)
    try:
        labels, n = ndimage.label(binary, structure=structure, output=np.uint16)
    except RuntimeError:  # more than 65535 components
        labels, n = ndimage.label(binary, structure=structure)
    del binary
    is_2d = probability.is_2d or arr.shape[0] == 1
    flat = labels.reshape(-1)
    step = 1 << 23  # np.bincount casts to int64: count in chunks so a full-size volume needs no 1 GB temporary
    sizes = sum(np.bincount(flat[i:i + step], minlength=n + 1) for i in range(0, flat.size, step))[1:]
    unit = probability.voxel_volume_mm3 if not is_2d else probability.spacing[0] * probability.spacing[1]
    min_size = min_size_mm2 if is_2d else min_size_mm3
    keep = [c + 1 for c in np.argsort(-sizes, kind="stable")
            if sizes[c] * unit >= min_size and sizes[c] >= min_fraction * arr.size]
    slices = ndimage.find_objects(labels)
    if min_extent_mm > 0 and not is_2d:
        sp_kji = (probability.spacing[2], probability.spacing[1], probability.spacing[0])
        keep = [c for c in keep
                if min((s.stop - s.start) * sp for s, sp in zip(slices[c - 1], sp_kji)) >= min_extent_mm]
    if max_lesions is not None:
        keep = keep[:max_lesions]
    prob = arr if np.issubdtype(arr.dtype, np.floating) else None
    regions = [(labels[slices[old - 1]] == old, slices[old - 1]) for old in keep]
    # renumber in place: kept components become 1..len(keep) by size, everything else 0
    lut = np.zeros(n + 1, dtype=np.uint16 if len(keep) < 65535 else np.uint32)
    lut[keep] = np.arange(1, len(keep) + 1)
    # (chunk by chunk: numpy turns index arrays into int64, a 1 GB temporary on a full-size volume)
    out = labels if lut.dtype == labels.dtype else np.empty(labels.shape, dtype=lut.dtype)
    out_flat = out.reshape(-1)
    for i in range(0, flat.size, step):
        out_flat[i:i + step] = lut[flat[i:i + step]]
    lesions: List[Lesion] = []
    for new_id, (region, sl) in enumerate(regions, start=1):
        lesions.append(_measure(new_id, region, tuple(s.start for s in sl), prob, probability))
    return probability.with_array(out), lesions


def lesions_from_labels(labels: Volume) -> List[Lesion]:
    """Measure every non-zero label of an existing label map (e.g. a user's own segmentation)."""
    arr = labels.array
    lesions = []
    for sl_idx, sl in enumerate(ndimage.find_objects(arr.astype(np.int64))):
        if sl is None:
            continue
        region = arr[sl] == sl_idx + 1
        lesions.append(_measure(sl_idx + 1, region, tuple(s.start for s in sl), None, labels))
    return lesions
