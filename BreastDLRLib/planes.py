"""Three orthogonal plane crops around a lesion, each with an exact affine back to the array.

Array axes of an ABVS volume (``acquisition_axis`` = 0): k = probe sweep (slice), j = depth, i = lateral.

* ``transverse``: the (j, i) image at fixed k (the acquired B-mode slice); rows j, columns i.
* ``sagittal``: the (j, k) image at fixed i; rows j, columns k.
* ``coronal``: the (k, i) image at fixed j (parallel to the skin); rows k, columns i.

For another ``acquisition_axis`` ``a`` the transverse plane is the one perpendicular to ``a``; the two other
axes, in increasing order, play depth and lateral (see :func:`plane_axes`).

Crop geometry (per plane, per frame):

* the plane passes through the lesion centre: the fixed index is ``floor(centre_kji[fixed] + 0.5)`` (plus the
  frame offset), so every crop samples an acquired grid plane, never a blend of two;
* the crop is a square in mm centred on the centre of the lesion's bounding box in that plane; with
  ``L`` and ``l`` = the longer and shorter in-plane sides of the bounding box in mm (voxel edges:
  ``(hi - lo) * spacing``), its side is ``S = max(L + 2 * margin * R, min_side_mm)`` where ``R = l``
  (``margin_of="shorter"``, the default: the margin is 30 % of the box's shorter side, as the issue and the
  papers state) or ``R = L`` (``margin_of="longer"``: more context around flat lesions); a model's manifest
  says which one it was trained with (``input.margin_of``);
* the square is cut into ``size × size`` square pixels of ``S / size`` mm; pixel ``(r, c)`` is the
  centre of its cell, so the first and last pixel centres are ``S * (size - 1) / size`` mm apart;
* all values come from one bilinear sampling of the grid (``scipy.ndimage.map_coordinates``, order 1;
  the pixels are square in mm, so resampling to isotropic spacing and to ``size × size`` is one step, with
  no intermediate image and no prefilter), so pixel ``(r, c)`` samples exactly the continuous array index
  ``origin_kji + r * row_step_kji + c * col_step_kji``;
* pixels whose sample lies outside the grid (beyond the outermost voxel centres, index < 0 or > n - 1 on an
  axis) are 0, are False in ``valid_mask`` and are counted out of ``valid_fraction``, with a ``note``;
* the image is min-max normalised over its valid pixels to [0, 1] (a constant image gives zeros);
  ``intensity_range`` keeps the (min, max) used, so ``image * (max - min) + min`` are the sampled values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from .volume import Volume

if TYPE_CHECKING:  # torch is imported only where tensors are made
    import torch

PLANES: Tuple[str, str, str] = ("transverse", "sagittal", "coronal")
BBox = Sequence[Tuple[int, int]]


def plane_axes(acquisition_axis: int = 0) -> Dict[str, Tuple[int, int, int]]:
    """``plane -> (fixed_axis, row_axis, col_axis)`` in array axes for a sweep along ``acquisition_axis``.

    With ``d < l`` the two axes other than the sweep axis ``a`` (depth and lateral):
    transverse = (a, d, l), sagittal = (l, d, a), coronal = (d, a, l).
    """
    a = int(acquisition_axis)
    if a not in (0, 1, 2):
        raise ValueError(f"acquisition_axis must be 0, 1 or 2, got {acquisition_axis}")
    d, lat = (ax for ax in (0, 1, 2) if ax != a)
    return {"transverse": (a, d, lat), "sagittal": (lat, d, a), "coronal": (d, a, lat)}


@dataclass
class PlaneCrop:
    """One square plane image and the affine from its pixels to continuous array indices (k, j, i)."""

    plane: str
    image: np.ndarray  # float32 (size, size) in [0, 1]
    origin_kji: np.ndarray  # (3,) array index sampled by pixel (0, 0)
    row_step_kji: np.ndarray  # (3,) index step per output row
    col_step_kji: np.ndarray  # (3,) index step per output column
    frame_offset: int = 0  # fixed index of this frame minus the fixed index through the lesion centre
    fixed_axis: int = 0
    row_axis: int = 1
    col_axis: int = 2
    pixel_mm: float = 1.0  # side of one output pixel in mm
    valid_fraction: float = 1.0  # share of pixels sampled inside the grid
    valid_mask: Optional[np.ndarray] = None  # bool (size, size), True where sampled inside the grid
    intensity_range: Tuple[float, float] = (0.0, 0.0)  # sampled (min, max) mapped to (0, 1)
    note: str = ""
    extra: Dict[str, float] = field(default_factory=dict)

    @property
    def size(self) -> Tuple[int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]

    @property
    def fixed_index(self) -> int:
        return int(round(float(self.origin_kji[self.fixed_axis])))

    def crop_to_array_index(self, r: Union[float, np.ndarray], c: Union[float, np.ndarray]) -> np.ndarray:
        """Continuous array index (k, j, i) sampled at pixel (r, c); shape ``broadcast(r, c).shape + (3,)``."""
        r = np.asarray(r, dtype=float)[..., None]
        c = np.asarray(c, dtype=float)[..., None]
        return self.origin_kji + r * self.row_step_kji + c * self.col_step_kji

    def array_index_to_crop(self, kji: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Inverse of :meth:`crop_to_array_index` within the plane: (r, c) of continuous indices (..., 3)."""
        kji = np.asarray(kji, dtype=float)
        r = (kji[..., self.row_axis] - self.origin_kji[self.row_axis]) / self.row_step_kji[self.row_axis]
        c = (kji[..., self.col_axis] - self.origin_kji[self.col_axis]) / self.col_step_kji[self.col_axis]
        return r, c


# ---------------------------------------------------------------------------------------------- helpers
def _check_bbox(bbox_kji: BBox, shape: Tuple[int, int, int]) -> np.ndarray:
    b = np.asarray(bbox_kji, dtype=int).reshape(3, 2)
    if np.any(b[:, 1] <= b[:, 0]):
        raise ValueError(f"empty bounding box {b.tolist()}")
    return b


def _frame_positions(
    n: int,
    centre: int,
    n_frames: int,
    frame_step: int,
    fixed_axis: int,
    mask: Optional[np.ndarray],
    bbox: np.ndarray,
    shape: Tuple[int, int, int],
) -> List[int]:
    """Fixed-axis positions of the frames, ascending.

    With ``mask``: the ``n_frames`` positions with the largest lesion area in the plane (ties: nearest to the
    centre).  Without: ``centre + frame_step * m`` for ``m = -(n_frames-1)//2 ... n_frames//2``, clipped.
    """
    if n_frames <= 1:
        return [centre]
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        area = np.zeros(n, dtype=np.int64)
        other = tuple(ax for ax in range(3) if ax != fixed_axis)
        per = m.sum(axis=other)
        if m.shape == tuple(shape):
            area[:] = per
        elif m.shape == tuple(int(hi - lo) for lo, hi in bbox):
            lo, hi = int(bbox[fixed_axis, 0]), int(bbox[fixed_axis, 1])
            area[max(lo, 0):min(hi, n)] = per[max(0, -lo):per.size - max(0, hi - n)]
        else:
            raise ValueError(f"mask shape {m.shape} matches neither the volume {tuple(shape)} nor the bounding box")
        order = sorted(range(n), key=lambda p: (-int(area[p]), abs(p - centre), p))
        chosen = order[:n_frames]
        while len(chosen) < n_frames:  # fewer slices than frames: repeat the centre
            chosen.append(centre)
        return sorted(chosen)
    offsets = np.arange(n_frames) - (n_frames - 1) // 2
    return [int(np.clip(centre + frame_step * o, 0, n - 1)) for o in offsets]


def _sample_plane(
    array: np.ndarray, fixed_axis: int, row_axis: int, col_axis: int, fixed: int, rows: np.ndarray, cols: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """Bilinear samples of ``array`` on the plane ``fixed`` at continuous (rows, cols); (values, valid)."""
    n_r, n_c = array.shape[row_axis], array.shape[col_axis]
    valid = (rows >= 0) & (rows <= n_r - 1) & (cols >= 0) & (cols <= n_c - 1)
    out = np.zeros(rows.shape, dtype=np.float32)
    if not (0 <= fixed < array.shape[fixed_axis]) or not valid.any():
        return out, np.zeros(rows.shape, dtype=bool)
    sl = np.take(array, fixed, axis=fixed_axis)  # 2D, axes in increasing order of the two others
    if row_axis > col_axis:
        sl = sl.T
    rv, cv = rows[valid], cols[valid]
    r0 = max(int(np.floor(rv.min())), 0)
    r1 = min(int(np.ceil(rv.max())) + 1, n_r)
    c0 = max(int(np.floor(cv.min())), 0)
    c1 = min(int(np.ceil(cv.max())) + 1, n_c)
    block = np.asarray(sl[r0:r1, c0:c1], dtype=np.float32)  # only the part the crop reads
    out[valid] = ndimage.map_coordinates(block, [rv - r0, cv - c0], order=1, mode="nearest")
    return out, valid


def _normalise(values: np.ndarray, valid: np.ndarray) -> Tuple[np.ndarray, Tuple[float, float]]:
    if not valid.any():
        return np.zeros_like(values, dtype=np.float32), (0.0, 0.0)
    lo, hi = float(values[valid].min()), float(values[valid].max())
    if not hi > lo:
        return np.zeros_like(values, dtype=np.float32), (lo, hi)
    img = (values - lo) / (hi - lo)
    img[~valid] = 0.0
    return np.clip(img, 0.0, 1.0).astype(np.float32), (lo, hi)


# ---------------------------------------------------------------------------------------------- public
def available_planes(volume: Volume) -> Tuple[str, ...]:
    """Planes that exist for this image: all three for a volume, only ``transverse`` for a 2D image."""
    return ("transverse",) if (volume.is_2d or volume.shape[0] == 1) else PLANES


def crop_planes(
    volume: Volume,
    bbox_kji: BBox,
    centre_kji: Sequence[float],
    size: int = 224,
    margin: float = 0.3,
    margin_of: str = "shorter",
    n_frames: int = 1,
    frame_step: int = 1,
    planes: Optional[Sequence[str]] = None,
    mask: Optional[np.ndarray] = None,
    min_side_mm: float = 0.0,
) -> Dict[str, List[PlaneCrop]]:
    """Square ``size × size`` crops through the lesion centre in each plane (see the module docstring).

    ``bbox_kji``: half-open ``[(k0, k1), (j0, j1), (i0, i1)]``; ``centre_kji``: continuous array index.
    ``mask``: optional lesion mask, either of the volume's shape or cropped to ``bbox_kji``; used only to
    choose the ``n_frames`` positions with the largest lesion area.  Returns ``plane -> frames`` sorted by
    position; planes that do not exist (sagittal and coronal of a 2D image) are absent.
    """
    if size < 2:
        raise ValueError("size must be at least 2")
    if margin < 0:
        raise ValueError("margin must be >= 0")
    if margin_of not in ("shorter", "longer"):
        raise ValueError(f"margin_of must be 'shorter' or 'longer', got {margin_of!r}")
    shape = volume.shape
    bbox = _check_bbox(bbox_kji, shape)
    centre = np.asarray(centre_kji, dtype=float).reshape(3)
    spacing = np.asarray(volume.spacing_kji(), dtype=float)
    two_d = volume.is_2d or shape[0] == 1
    axes = plane_axes(0 if two_d else int(volume.metadata.get("acquisition_axis", 0) or 0))
    exist = available_planes(volume)
    wanted = [p for p in (planes or PLANES) if p in exist]
    unknown = [p for p in (planes or ()) if p not in PLANES]
    if unknown:
        raise ValueError(f"unknown plane(s) {unknown}; expected some of {PLANES}")

    result: Dict[str, List[PlaneCrop]] = {}
    for name in wanted:
        f, ra, ca = axes[name]
        ext_mm = np.array([(bbox[ra, 1] - bbox[ra, 0]) * spacing[ra], (bbox[ca, 1] - bbox[ca, 0]) * spacing[ca]])
        ref = float(ext_mm.min() if margin_of == "shorter" else ext_mm.max())
        side = max(float(ext_mm.max()) + 2.0 * margin * ref, float(min_side_mm))
        h = side / size  # mm per output pixel
        # continuous centre of the bounding box (voxel centres lo .. hi-1)
        mid = np.array([(bbox[ra, 0] + bbox[ra, 1] - 1) / 2.0, (bbox[ca, 0] + bbox[ca, 1] - 1) / 2.0])
        row_step = np.zeros(3)
        col_step = np.zeros(3)
        row_step[ra] = h / spacing[ra]
        col_step[ca] = h / spacing[ca]
        half = (size - 1) / 2.0
        centre_f = int(np.clip(np.floor(centre[f] + 0.5), 0, shape[f] - 1))
        positions = _frame_positions(shape[f], centre_f, n_frames, frame_step, f, mask, bbox, shape)
        rr, cc = np.meshgrid(np.arange(size, dtype=float), np.arange(size, dtype=float), indexing="ij")
        frames: List[PlaneCrop] = []
        for pos in positions:
            origin = np.zeros(3)
            origin[f] = pos
            origin[ra] = mid[0] - half * row_step[ra]
            origin[ca] = mid[1] - half * col_step[ca]
            rows = origin[ra] + rr * row_step[ra]
            cols = origin[ca] + cc * col_step[ca]
            values, valid = _sample_plane(volume.array, f, ra, ca, int(pos), rows, cols)
            image, rng = _normalise(values, valid)
            vf = float(valid.mean())
            note = "" if vf == 1.0 else f"{100 * (1 - vf):.1f}% of the crop lies outside the image and is set to 0"
            if rng[1] <= rng[0] and vf > 0:
                note = (note + "; " if note else "") + "constant image region"
            frames.append(
                PlaneCrop(
                    plane=name,
                    image=image,
                    origin_kji=origin,
                    row_step_kji=row_step.copy(),
                    col_step_kji=col_step.copy(),
                    frame_offset=int(pos - centre_f),
                    fixed_axis=f,
                    row_axis=ra,
                    col_axis=ca,
                    pixel_mm=h,
                    valid_fraction=vf,
                    valid_mask=valid,
                    intensity_range=rng,
                    note=note,
                    extra={"side_mm": side, "bbox_row_mm": float(ext_mm[0]), "bbox_col_mm": float(ext_mm[1])},
                )
            )
        result[name] = frames
    return result


def to_tensor_batch(
    crops: Mapping[str, Union[PlaneCrop, Sequence[PlaneCrop]]],
    planes: Sequence[str] = PLANES,
) -> "Tuple[torch.Tensor, torch.Tensor]":
    """Stack crops as ``(F, P, 3, H, W)`` float32 (grey copied to 3 channels) and a ``(P,)`` bool plane mask.

    Missing planes are zeros with mask False.  ``F`` is the largest number of frames among the planes; a
    plane with fewer frames repeats its last frame.
    """
    import torch

    lists: Dict[str, List[PlaneCrop]] = {}
    for p in planes:
        v = crops.get(p)
        if v is None:
            continue
        lst = [v] if isinstance(v, PlaneCrop) else list(v)
        if lst:
            lists[p] = lst
    if not lists:
        raise ValueError(f"no crops for any of the planes {tuple(planes)}")
    shapes = {c.image.shape for lst in lists.values() for c in lst}
    if len(shapes) != 1:
        raise ValueError(f"crops have different sizes {sorted(shapes)}")
    h, w = shapes.pop()
    n_f = max(len(lst) for lst in lists.values())
    out = np.zeros((n_f, len(planes), 3, h, w), dtype=np.float32)
    present = np.zeros(len(planes), dtype=bool)
    for pi, p in enumerate(planes):
        lst = lists.get(p)
        if not lst:
            continue
        present[pi] = True
        for fi in range(n_f):
            out[fi, pi] = lst[min(fi, len(lst) - 1)].image[None]
    return torch.from_numpy(out), torch.from_numpy(present)
