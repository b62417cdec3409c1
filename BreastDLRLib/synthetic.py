"""Deterministic synthetic breast ultrasound: 2D handheld images and ABVS-like volumes with lesion truth.

For tests, the demo and training; never for clinical use.  numpy + scipy only (SimpleITK is imported
lazily by the writers).  The image model is described in ``docs/synthetic.md``; in short:

* array axes ``(k, j, i)``: k = probe sweep (slices), j = depth (row 0 = skin), i = lateral;
* tissue echogenicity in dB: skin, subcutaneous fat with Cooper's ligaments, fibroglandular tissue,
  retromammary fat, pectoral muscle, chest wall; lesions blended in with soft margins;
* posterior shadowing / enhancement proportional to the lesion path length above each voxel;
* depth attenuation partly compensated by a TGC curve, plus a focal-zone gain;
* fully developed speckle: magnitude of a spatially correlated complex Gaussian (Rayleigh), correlated
  between slices by an AR(1) process along the sweep;
* log compression to 8-bit grey: ``image`` is **uint8** (0..255), ``mask`` is uint8 labels 0..n.

The same seed gives byte-identical arrays; every random draw comes from ``np.random.default_rng(seed)``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from .volume import Volume

KINDS = ("benign", "malignant")
SHAPES = ("oval", "round", "irregular")
MARGINS = ("circumscribed", "angular", "spiculated", "microlobulated")
ORIENTATIONS = ("parallel", "not parallel")
POSTERIORS = ("enhancement", "shadowing", "none")
BIRADS_ORDER = ("1", "2", "3", "4a", "4b", "4c", "5")
TISSUE_COMPOSITIONS = (
    "homogeneous: fat",
    "heterogeneous: predominantly fat",
    "heterogeneous: predominantly fibroglandular",
    "homogeneous: fibroglandular",
)
MANIFEST_COLUMNS = (
    "dataset", "case_id", "patient_id", "image", "mask", "label", "birads", "age", "pixel_spacing_mm",
    "device", "view", "histology", "tissue_composition", "signs", "symptoms", "shape", "margin",
    "echogenicity", "posterior_features", "halo", "calcifications", "skin_thickening", "verification",
    "lesion_area_px", "width", "height", "sha256",
)

# display: grey = 255 * (dB - _DB_LOW) / _DB_RANGE, clipped.  Glandular tissue is 0 dB.
_DB_LOW = -30.0
_DB_RANGE = 55.0
_MARGIN_MM = 0.3  # lesions keep this distance from the glandular layer's boundaries
_GAP_MM = 1.0  # and at least this distance from each other


# ----------------------------------------------------------------------------------------- data
@dataclass
class SyntheticLesion:
    """Ground truth of one lesion.  ``centre_kji`` is in voxels (array order); ``radii_mm`` are the
    semi-axes (k, j, i) in mm before rotation and margin perturbation (k is 0 for 2D images)."""

    label: int
    kind: str
    shape: str
    margin: str
    orientation: str
    posterior: str
    calcifications: bool
    centre_kji: Tuple[float, float, float]
    radii_mm: Tuple[float, float, float]
    birads: str
    echo: str = "hypoechoic"
    halo: bool = False


@dataclass
class SyntheticCase:
    """A synthetic image or volume with its truth.  ``layers`` holds per-column depths in mm (arrays of
    shape (k, i)): ``skin``, ``fat`` and ``gland`` are the bottoms of those layers (the glandular layer
    lies between ``fat`` and ``gland``), ``muscle`` the top of the pectoral muscle."""

    image: Volume
    mask: Volume
    lesions: List[SyntheticLesion]
    clinical: Dict[str, Any]
    label: str
    seed: int = 0
    layers: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def birads(self) -> str:
        """Case-level BI-RADS: the highest of the lesions', "1" for a normal case (an assessment, not an input)."""
        return max((les.birads for les in self.lesions), key=BIRADS_ORDER.index, default="1")


# ---------------------------------------------------------------------------------- random fields
class _SmoothField:
    """Unit-variance Gaussian random field: white noise on a coarse grid, interpolated with separable
    Gaussian kernels of width ``corr`` mm.  Evaluated slab by slab along k to keep memory low."""

    def __init__(self, rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], corr: Sequence[float]):
        self._w: List[np.ndarray] = []
        for n, h, c in zip(shape, spacing, corr):
            if n == 1:
                w = np.ones((1, 1))
            else:
                step = 0.7 * c
                p = -3 * c + step * np.arange(int(np.ceil(((n - 1) * h + 6 * c) / step)) + 1)
                w = np.exp(-0.5 * ((h * np.arange(n)[:, None] - p[None, :]) / c) ** 2)
                w /= np.sqrt((w**2).sum(axis=1, keepdims=True))
            self._w.append(w.astype(np.float32))
        wk, wj, wi = self._w
        self._coarse = rng.standard_normal((wk.shape[1], wj.shape[1], wi.shape[1]), dtype=np.float32)

    def slab(self, k0: int, k1: int) -> np.ndarray:
        wk, wj, wi = self._w
        t = np.tensordot(wk[k0:k1], self._coarse, axes=(1, 0))  # (s, cj, ci)
        t = np.matmul(wj, t)  # (s, J, ci)
        return np.matmul(t, wi.T)  # (s, J, I)


def _gauss_var(sigma: float) -> float:
    """Sum of squared weights of scipy's 1D Gaussian filter (variance gain on white noise)."""
    if sigma <= 0:
        return 1.0
    r = int(4.0 * sigma + 0.5)
    d = np.zeros(2 * r + 1)
    d[r] = 1.0
    return float((ndimage.gaussian_filter1d(d, sigma, mode="constant") ** 2).sum())


# --------------------------------------------------------------------------------- clinical truth
def _pick(rng: np.random.Generator, values: Sequence[str], p: Sequence[float]) -> str:
    p = np.asarray(p, dtype=float)
    return str(values[int(rng.choice(len(values), p=p / p.sum()))])


def _draw_clinical(rng: np.random.Generator, label: str) -> Dict[str, Any]:
    mean = {"benign": 45.0, "malignant": 55.0, "normal": 45.0}[label]
    age = int(round(float(np.clip(rng.normal(mean, 12.0), 18, 90))))
    p_meno = 0.03 if age < 45 else 0.97 if age >= 55 else 0.2 + 0.7 * (age - 45) / 10.0
    menopause = bool(rng.random() < p_meno)
    family = bool(rng.random() < (0.20 if label == "malignant" else 0.10))
    palpable = bool(rng.random() < {"benign": 0.35, "malignant": 0.6, "normal": 0.03}[label])
    p_comp = [0.1, 0.45, 0.25, 0.2] if menopause else [0.03, 0.27, 0.35, 0.35]
    composition = _pick(rng, TISSUE_COMPOSITIONS, p_comp)
    side = "left" if rng.random() < 0.5 else "right"
    return {"age": age, "family_history": family, "menopause": menopause, "palpable": palpable,
            "tissue_composition": composition, "side": side}


# ------------------------------------------------------------------------------------ lesion model
@dataclass
class _LesionModel:
    truth: SyntheticLesion
    base_radii: np.ndarray  # (rk, rj, ri) mm
    rot: np.ndarray  # 3x3, columns = lesion axes in (k, j, i) mm coordinates
    bumps: List[Tuple[str, np.ndarray, float, float]]  # (profile, unit dir (3,), amplitude, width)
    surface: np.ndarray  # f(u) * u on fixed probe directions, to bound the lesion's extent
    echo_db: float
    texture_db: float
    edge_sigma_mm: float
    halo_db: float
    posterior_db_per_mm: float  # < 0 shadowing, > 0 enhancement
    posterior_cap_db: float
    n_calc: int
    # set by placement
    bbox: Tuple[slice, slice, slice] = (slice(0), slice(0), slice(0))
    mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), bool))
    calcs: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), int))


def _unit_dirs(rng: np.random.Generator, n: int, is_2d: bool) -> np.ndarray:
    if is_2d:
        a = rng.uniform(0, 2 * np.pi, n)
        return np.stack([np.zeros(n), np.sin(a), np.cos(a)], axis=1)
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _probe_dirs(is_2d: bool, n: int = 4000) -> np.ndarray:
    """Evenly spread unit directions (circle or Fibonacci sphere) to bound a lesion's extent."""
    if is_2d:
        a = np.linspace(0, 2 * np.pi, n, endpoint=False)
        return np.stack([np.zeros(n), np.sin(a), np.cos(a)], axis=1)
    t = np.arange(n) + 0.5
    z = 1 - 2 * t / n
    phi = np.pi * (1 + 5**0.5) * t
    rho = np.sqrt(1 - z**2)
    return np.stack([z, rho * np.sin(phi), rho * np.cos(phi)], axis=1)


def _bump(profile: str, cosang: np.ndarray, width: float) -> np.ndarray:
    if profile == "vmf":  # broad smooth bump (low-order, spherical-harmonic-like)
        return np.exp(width * (cosang - 1.0))
    theta = np.arccos(np.clip(cosang, -1.0, 1.0))
    if profile == "tent":  # pointed: angular corners or spicules
        return np.maximum(0.0, 1.0 - theta / width)
    return np.sqrt(np.maximum(0.0, 1.0 - (theta / width) ** 2))  # "lobe": rounded microlobule


def _radius_factor(bumps: List[Tuple[str, np.ndarray, float, float]], u: np.ndarray) -> np.ndarray:
    """Perturbed radius f(u) for unit directions u (..., 3) in the lesion's normalised frame (dtype of u)."""
    f = np.ones(u.shape[:-1], dtype=u.dtype)
    for profile, d, amp, width in bumps:
        f += (amp * _bump(profile, u @ d.astype(u.dtype), width)).astype(u.dtype)
    return f


def _draw_lesion(rng: np.random.Generator, kind: str, is_2d: bool) -> _LesionModel:
    n_scale = 1 if is_2d else 3
    bumps: List[Tuple[str, np.ndarray, float, float]] = []

    def add(profile: str, n: int, amp: Tuple[float, float], width: Tuple[float, float], signed: bool = False) -> None:
        for d in _unit_dirs(rng, n, is_2d):
            a = rng.uniform(*amp) * (rng.choice([-1.0, 1.0]) if signed else 1.0)
            bumps.append((profile, d, float(a), float(rng.uniform(*width))))

    cyst = kind == "benign" and rng.random() < 0.25
    if kind == "benign":
        shape = "oval" if cyst else _pick(rng, SHAPES, [0.75, 0.15, 0.10])
        margin = "circumscribed" if cyst else _pick(rng, MARGINS, [0.75, 0.08, 0.02, 0.15])
        orientation = "parallel" if (cyst or rng.random() < 0.9) else "not parallel"
        posterior = "enhancement" if cyst else _pick(rng, POSTERIORS, [0.35, 0.05, 0.60])
        calc = bool(not cyst and rng.random() < 0.05)
        birads = _pick(rng, ["2", "3", "4a"], [0.6, 0.4, 0.0]) if cyst else _pick(
            rng, ["3", "4a", "4b"], [0.55, 0.35, 0.10])
        echo = "anechoic" if cyst else "hypoechoic"
        echo_db = rng.uniform(-30, -26) if cyst else rng.uniform(-18, -13)
        texture_db = 0.5 if cyst else 1.5
        halo = False
    else:
        shape = _pick(rng, SHAPES, [0.1, 0.1, 0.8])
        margin = _pick(rng, MARGINS, [0.0, 0.3, 0.45, 0.25])
        orientation = _pick(rng, ORIENTATIONS, [0.3, 0.7])
        posterior = _pick(rng, POSTERIORS, [0.1, 0.65, 0.25])
        calc = bool(rng.random() < 0.45)
        p5 = 0.5 if margin == "spiculated" else 0.3
        birads = _pick(rng, ["4a", "4b", "4c", "5"], [0.05, 0.25, 0.7 - p5, p5])
        echo = "hypoechoic"
        echo_db = rng.uniform(-24, -18)
        texture_db = 3.5
        halo = bool(rng.random() < 0.4)

    # semi-axes (mm) before the placement's shrinking; the long axis is lateral (i) when parallel
    size = rng.uniform(3.0, 6.0)
    ratio = rng.uniform(1.12, 1.25) if shape == "round" else rng.uniform(1.4, 1.9)
    long_, short = size, size / ratio
    if orientation == "parallel":
        rj, ri = short, long_
        rk = ri * rng.uniform(0.75, 1.0)
    else:
        rj, ri = long_, short
        rk = ri * rng.uniform(0.9, 1.15)
    radii = np.array([rk, rj, ri])
    probe = _probe_dirs(is_2d)
    for _ in range(100):  # redraw tilt and margin until the shape's extents agree with its orientation
        bumps.clear()
        tilt = np.deg2rad(rng.uniform(-12, 12) if orientation == "parallel" else rng.uniform(-10, 10))
        yaw = 0.0 if is_2d else np.deg2rad(rng.uniform(-30, 30))
        c, s = math.cos(tilt), math.sin(tilt)
        r_ji = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])  # rotation in the (j, i) image plane
        c, s = math.cos(yaw), math.sin(yaw)
        r_ki = np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])  # rotation in the (k, i) plane
        rot = r_ki @ r_ji
        if shape == "irregular":
            add("vmf", 4 * n_scale, (0.12, 0.25), (2.0, 4.0), signed=True)
        else:
            add("vmf", 3 * n_scale, (0.0, 0.03), (2.0, 3.0), signed=True)
        if margin == "angular":
            add("tent", int(rng.integers(4, 8)) * n_scale, (0.18, 0.35), (0.35, 0.6))
        elif margin == "spiculated":
            # spicules: narrow cones; in 3D more and wider ones so that they cross the image planes
            add("tent", int(rng.integers(8, 16)) * (1 if is_2d else 5), (0.35, 0.7), (0.08, 0.16) if is_2d else (0.12, 0.22))
        elif margin == "microlobulated":
            add("lobe", int(rng.integers(14, 24)) * n_scale, (0.05, 0.1), (0.15, 0.25))
        surface = _radius_factor(bumps, probe)[:, None] * probe
        _, hj, hi = np.abs((surface * radii[None, :]) @ rot.T).max(axis=0)
        need = 1.08 if shape == "round" else 1.15
        if (hi > need * hj) if orientation == "parallel" else (hj > need * hi):
            break

    edge_sigma = 0.08 if margin == "circumscribed" else 0.2
    if posterior == "shadowing":
        post, cap = -rng.uniform(0.9, 1.5), 14.0
    elif posterior == "enhancement":
        post, cap = (rng.uniform(1.0, 1.6) if cyst else rng.uniform(0.8, 1.3)), 9.0
    else:
        post, cap = 0.0, 0.0
    truth = SyntheticLesion(0, kind, shape, margin, orientation, posterior, calc, (0.0, 0.0, 0.0),
                            (0.0 if is_2d else float(rk), float(rj), float(ri)), birads, echo, halo)
    return _LesionModel(truth, np.array([rk, rj, ri]), rot, bumps, surface, float(echo_db), texture_db,
                        edge_sigma, 6.0 if halo else 0.0, float(post), cap,
                        int(rng.integers(3, 10)) if calc else 0)


def _lesion_mask(m: _LesionModel, radii: np.ndarray, centre_mm: np.ndarray, bbox: Tuple[slice, ...],
                 spacing_kji: np.ndarray, is_2d: bool) -> np.ndarray:
    """Boolean mask of the lesion inside ``bbox`` (array index slices)."""
    axes = [(np.arange(b.start, b.stop) * h - c).astype(np.float32) for b, h, c in zip(bbox, spacing_kji, centre_mm)]
    x = np.stack(np.broadcast_arrays(axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]), -1)
    q = x @ m.rot.astype(np.float32)  # coordinates along the lesion axes
    if is_2d:
        q[..., 0] = 0.0
        q[..., 1:] /= radii[1:].astype(np.float32)
    else:
        q /= radii.astype(np.float32)
    r = np.sqrt((q**2).sum(-1))
    u = q / np.maximum(r, 1e-6)[..., None]
    return r <= _radius_factor(m.bumps, u)


# ------------------------------------------------------------------------------------- geometry
@dataclass
class _Layers:
    skin: np.ndarray
    fat: np.ndarray
    gland: np.ndarray
    retro: np.ndarray
    muscle: np.ndarray
    lig_f: np.ndarray
    lig_t: np.ndarray
    lig_c: np.ndarray

    def public(self) -> Dict[str, np.ndarray]:
        return {"skin": self.skin, "fat": self.fat, "gland": self.gland, "muscle": self.retro}


def _draw_layers(rng: np.random.Generator, shape: Tuple[int, int, int], sp: np.ndarray, composition: str) -> _Layers:
    K, J, I = shape
    depth = J * sp[1]
    col = lambda corr: _SmoothField(rng, (K, 1, I), sp, (corr, 1.0, corr)).slab(0, K)[:, 0, :]  # noqa: E731
    skin = rng.uniform(1.4, 2.0) + 0.15 * col(10.0)
    fatty = "fat" in composition.split(":")[1] if ":" in composition else False
    fat_frac = rng.uniform(0.2, 0.27) if fatty else rng.uniform(0.13, 0.19)
    lig_f = col(2.5)  # zero set = ligament attachment ridges on the gland surface
    fat = skin + depth * fat_frac + 1.2 * col(12.0) + 0.8 * np.abs(lig_f)
    gland = depth * rng.uniform(0.68, 0.74) + 1.2 * col(12.0)
    gland = np.maximum(gland, fat + 0.3 * depth)
    retro = gland + rng.uniform(0.8, 1.8) + 0.3 * col(8.0)
    muscle = retro + depth * rng.uniform(0.12, 0.17) + 0.6 * col(15.0)
    lig_t, lig_c = 0.9 * col(10.0), 0.8 * col(6.0)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return _Layers(f32(skin), f32(fat), f32(gland), f32(retro), f32(muscle), f32(lig_f), f32(lig_t), f32(lig_c))


def _place_lesions(rng: np.random.Generator, models: List[_LesionModel], shape: Tuple[int, int, int],
                   sp: np.ndarray, layers: _Layers, allow_edge: bool, is_2d: bool) -> np.ndarray:
    """Place lesions one by one (rejection sampling); returns the label array and fills each model."""
    K, J, I = shape
    labels = np.zeros(shape, np.uint8)
    extent = (np.array(shape) - 1) * sp
    share = max(1.0, len(models) if is_2d else math.sqrt(len(models)))  # lateral room shared by the lesions
    room = np.array([extent[0] / share, float(np.median(layers.gland - layers.fat)) - 2 * _MARGIN_MM, extent[2] / share])
    for n, m in enumerate(models, start=1):
        half0 = _half_extent(m, m.base_radii)
        fit = 0.85 * room / (2 * np.maximum(half0, 1e-6))
        scale = min(1.0, fit[1], fit[2], 1.0 if is_2d else fit[0])  # start from a size that can fit
        for attempt in range(400):
            radii = m.base_radii * scale * max(0.3, 0.93 ** (attempt // 10))
            half = _half_extent(m, radii)
            if is_2d:
                half[0] = 0.0
            ck = 0.0 if is_2d else rng.uniform(0, extent[0])
            ci = rng.uniform(0, extent[2])
            if not allow_edge and (not is_2d and (ck - half[0] < 0 or ck + half[0] > extent[0])
                                   or ci - half[2] < 0 or ci + half[2] > extent[2]):
                continue
            kk, ii = int(round(ck / sp[0])), int(round(ci / sp[2]))
            lo = layers.fat[kk, ii] + half[1] + _MARGIN_MM
            hi = layers.gland[kk, ii] - half[1] - _MARGIN_MM
            if hi <= lo:
                continue
            centre = np.array([ck, rng.uniform(lo, hi), ci])
            bbox = tuple(slice(max(0, int(np.floor((c - h) / s))), min(nn, int(np.ceil((c + h) / s)) + 1))
                         for c, h, s, nn in zip(centre, half, sp, shape))
            mask = _lesion_mask(m, radii, centre, bbox, sp, is_2d)
            if not mask.any():
                continue
            kji = np.nonzero(mask)
            gk, gj, gi = kji[0] + bbox[0].start, kji[1] + bbox[1].start, kji[2] + bbox[2].start
            z = gj * sp[1]
            if np.any(z < layers.fat[gk, gi] + _MARGIN_MM) or np.any(z > layers.gland[gk, gi] - _MARGIN_MM):
                continue
            width = (gi.max() - gi.min() + 1) * sp[2]
            height = (gj.max() - gj.min() + 1) * sp[1]
            wide = width > 1.05 * height if m.truth.orientation == "parallel" else height > 1.05 * width
            if not wide:
                continue
            if _too_close(labels, mask, bbox, sp):
                continue
            labels[bbox][mask] = n
            m.bbox, m.mask = bbox, mask
            m.truth.label = n
            m.truth.centre_kji = tuple(float(c / s) for c, s in zip(centre, sp))  # type: ignore[assignment]
            m.truth.radii_mm = (0.0 if is_2d else float(radii[0]), float(radii[1]), float(radii[2]))
            if m.n_calc:
                pick = rng.choice(len(gk), size=min(m.n_calc, len(gk)), replace=False)
                m.calcs = np.stack([gk[pick], gj[pick], gi[pick]], axis=1)
            break
        else:
            raise ValueError(
                f"could not fit {len(models)} lesion(s) into the glandular layer of a {shape} image; "
                "use a larger shape or fewer lesions")
    return labels


def _half_extent(m: _LesionModel, radii: np.ndarray) -> np.ndarray:
    """Half-extent (k, j, i) in mm of the perturbed, rotated lesion, with a 5 % safety margin."""
    return 1.05 * np.abs((m.surface * radii[None, :]) @ m.rot.T).max(axis=0)


def _too_close(labels: np.ndarray, mask: np.ndarray, bbox: Tuple[slice, ...], sp: np.ndarray) -> bool:
    pad = [int(np.ceil(_GAP_MM / s)) for s in sp]
    big = tuple(slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(bbox, pad, labels.shape))
    region = labels[big]
    if not region.any():
        return False
    local = np.zeros(region.shape, bool)
    local[tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(bbox, big))] = mask
    dist = ndimage.distance_transform_edt(~local, sampling=sp)
    return bool(np.any((dist < _GAP_MM) & (region > 0)))


# --------------------------------------------------------------------------------------- render
@dataclass
class _LesionRender:
    bbox: Tuple[slice, slice, slice]  # padded
    soft: np.ndarray
    halo: np.ndarray
    echo_db: float
    texture_db: float
    shift: np.ndarray  # posterior dB shift inside the padded bbox (cumulative along depth)


def _prepare_lesions(models: List[_LesionModel], shape: Tuple[int, int, int], sp: np.ndarray) -> List[_LesionRender]:
    out = []
    for m in models:
        pad = [0 if shape[0] == 1 and a == 0 else int(np.ceil(2.0 / s)) for a, s in enumerate(sp)]
        big = tuple(slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(m.bbox, pad, shape))
        local = np.zeros(tuple(b.stop - b.start for b in big), np.float32)
        local[tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(m.bbox, big))] = m.mask
        sig = [0.0 if local.shape[a] == 1 else m.edge_sigma_mm / sp[a] for a in range(3)]
        soft = ndimage.gaussian_filter(local, sig, mode="constant")
        halo = np.zeros_like(soft)
        if m.halo_db:
            wide = ndimage.gaussian_filter(local, [0.0 if s == 0 else 0.6 / sp[a] for a, s in enumerate(sig)], mode="constant")
            halo = np.clip(wide - soft, 0, None) * np.float32(2.0 * m.halo_db)  # echogenic rim, dB
        shift = np.cumsum(soft, axis=1) * np.float32(sp[1] * m.posterior_db_per_mm)
        if m.posterior_db_per_mm:
            shift = np.clip(shift, -m.posterior_cap_db, m.posterior_cap_db)
            lat = [0.0 if shift.shape[a] == 1 else 0.3 / sp[a] for a in (0, 2)]
            shift = ndimage.gaussian_filter(shift, [lat[0], 0.0, lat[1]], mode="nearest").astype(np.float32)
        out.append(_LesionRender(big, soft, halo.astype(np.float32), m.echo_db, m.texture_db, shift))
    return out


def _line(z: np.ndarray, b: np.ndarray, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((z - b) / np.float32(width)) ** 2)


def _render(rng: np.random.Generator, shape: Tuple[int, int, int], sp: np.ndarray, layers: _Layers,
            models: List[_LesionModel], composition: str) -> np.ndarray:
    K, J, I = shape
    f = lambda corr: _SmoothField(rng, shape, sp, corr)  # noqa: E731
    fat_tex, gland_fine, gland_coarse = f((2.0, 1.0, 2.0)), f((2.5, 0.5, 2.5)), f((6.0, 3.0, 6.0))
    island, muscle_phase, lesion_tex = f((4.0, 2.0, 4.0)), f((8.0, 4.0, 8.0)), f((1.0, 0.8, 1.0))
    island_level = 0.9 if composition.startswith("heterogeneous") else 1.6
    muscle_period = rng.uniform(1.0, 1.6)
    # depth gain: attenuation partly compensated by TGC, slider wiggle, focal zone
    z1 = (np.arange(J) * sp[1]).astype(np.float32)
    depth = J * sp[1]
    slope = rng.uniform(0.25, 0.45) * 25.0 / max(depth, 25.0)  # residual dB/mm after TGC
    sliders = rng.normal(0.0, 0.8, 8)
    focus = rng.uniform(0.35, 0.55) * depth
    gain = (-slope * z1 + np.interp(z1, np.linspace(0, depth, 8), sliders)
            + 2.0 * np.exp(-0.5 * ((z1 - focus) / (0.2 * depth)) ** 2)).astype(np.float32)
    # speckle: complex Gaussian filtered in-plane (elongated laterally), AR(1) between slices
    sig_j, sig_i = max(0.6, 0.13 / sp[1]), max(0.8, 0.28 / sp[2])
    norm = np.float32(1.0 / math.sqrt(_gauss_var(sig_j) * _gauss_var(sig_i)))
    a = np.float32(math.exp(-sp[0] / 0.8)) if K > 1 else np.float32(0.0)
    b = np.float32(math.sqrt(1.0 - float(a) ** 2))
    renders = _prepare_lesions(models, shape, sp)
    out = np.empty(shape, np.uint8)
    state: Optional[np.ndarray] = None
    step = max(1, int(2_000_000 // (J * I)))
    z = z1[None, :, None]
    for k0 in range(0, K, step):
        k1 = min(K, k0 + step)
        ks = slice(k0, k1)
        L = {name: getattr(layers, name)[ks][:, None, :] for name in ("skin", "fat", "gland", "retro", "muscle", "lig_f", "lig_t", "lig_c")}
        coarse = gland_coarse.slab(k0, k1)
        db = -17.0 + 2.0 * coarse  # chest wall, then shallower layers overwrite (boundaries are ordered)
        # pectoral muscle with fibrillar striations parallel to the fascia
        stri = (0.5 + 0.5 * np.cos(2 * np.pi * (z - L["retro"]) / muscle_period + 2.5 * muscle_phase.slab(k0, k1))) ** 6
        np.copyto(db, -12.0 + 10.0 * stri + 1.5 * coarse, where=z < L["muscle"])
        np.copyto(db, -12.0 + 2.0 * coarse, where=z < L["retro"])  # retromammary fat
        # fibroglandular tissue: 0 dB, streaky and heterogeneous, with fat islands
        isl = island.slab(k0, k1)
        gl = 3.5 * gland_fine.slab(k0, k1) + 2.0 * coarse - 10.0 / (1.0 + np.exp(-(isl - island_level) / 0.15))
        np.copyto(db, gl, where=z < L["gland"])
        # subcutaneous fat with Cooper's ligaments rising from the ridges of the gland surface
        rel = (L["fat"] - z) / np.maximum(L["fat"] - L["skin"], 1.0)
        ligament = np.exp(-0.5 * ((L["lig_f"] + L["lig_t"] * rel + L["lig_c"] * rel**2) / 0.09) ** 2)
        np.copyto(db, -12.0 + 2.0 * fat_tex.slab(k0, k1) + 13.0 * ligament, where=z < L["fat"])
        np.copyto(db, np.float32(3.0), where=z < L["skin"])
        db += 9.0 * _line(z, np.float32(0.1), 0.12) + 6.0 * _line(z, L["skin"], 0.15)
        db += 4.0 * _line(z, L["fat"], 0.15) + 7.0 * _line(z, L["retro"], 0.2) + 8.0 * _line(z, L["muscle"], 0.2)
        # lesions: soft blend, halo, posterior shadowing / enhancement below
        tex = None
        for r in renders:
            kb = r.bbox[0]
            lo, hi = max(k0, kb.start), min(k1, kb.stop)
            if lo >= hi:
                continue
            if tex is None:
                tex = lesion_tex.slab(k0, k1)
            sl = slice(lo - kb.start, hi - kb.start)
            region = (slice(lo - k0, hi - k0), r.bbox[1], r.bbox[2])
            w = r.soft[sl]
            inside = np.float32(r.echo_db) + np.float32(r.texture_db) * tex[region]
            db[region] = db[region] * (1 - w) + inside * w + r.halo[sl]
            db[region] += r.shift[sl]
            below = (region[0], slice(r.bbox[1].stop, J), r.bbox[2])
            db[below] += r.shift[sl][:, -1:, :]
        db += gain[None, :, None]
        # speckle: two compounded looks of a correlated complex Gaussian's intensity (Rayleigh-like)
        noise = rng.standard_normal((4, k1 - k0, J, I), dtype=np.float32)
        noise = ndimage.gaussian_filter(noise, (0, 0, sig_j, sig_i), mode="reflect") * norm
        for s in range(k1 - k0):
            state = noise[:, s] if state is None else a * state + b * noise[:, s]
            noise[:, s] = state
        intensity = 0.5 * (noise[0] ** 2 + noise[1] ** 2 + noise[2] ** 2 + noise[3] ** 2)
        db += 10.0 * np.log10(np.maximum(intensity, np.float32(1e-12)))
        for m in models:  # microcalcifications: bright specks over the speckle
            for ck, cj, ci in m.calcs:
                if k0 <= ck < k1:
                    db[ck - k0, cj:cj + 2, ci:ci + 2] = np.float32(12.0) + gain[cj]
        grey = (db - np.float32(_DB_LOW)) * np.float32(255.0 / _DB_RANGE)
        out[ks] = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------- public API
def _decide_kinds(rng: np.random.Generator, n_lesions: Optional[int], malignant: Optional[bool],
                  kinds: Optional[Sequence[str]], p_n: Sequence[float]) -> List[str]:
    if kinds is not None:
        kinds = [str(k) for k in kinds]
        if any(k not in KINDS for k in kinds) or len(kinds) > 3:
            raise ValueError(f"kinds must be up to 3 of {KINDS}, got {kinds}")
        if n_lesions is not None and n_lesions != len(kinds):
            raise ValueError("n_lesions disagrees with kinds")
        if malignant is not None and malignant != ("malignant" in kinds):
            raise ValueError("malignant disagrees with kinds")
        return kinds
    if n_lesions is not None and not 0 <= int(n_lesions) <= 3:
        raise ValueError(f"n_lesions must be 0..3, got {n_lesions}")
    if n_lesions == 0 and malignant:
        raise ValueError("a malignant case needs at least one lesion")
    if n_lesions is None:
        n = int(rng.choice(len(p_n), p=np.asarray(p_n) / np.sum(p_n)))
        n = max(n, 1) if malignant is not None else n
    else:
        n = int(n_lesions)
    if n == 0:
        return []
    if malignant is None:
        malignant = bool(rng.random() < 0.4)
    if not malignant:
        return ["benign"] * n
    out = ["malignant"] + ["malignant" if rng.random() < 0.25 else "benign" for _ in range(n - 1)]
    return [out[i] for i in rng.permutation(n)]


def _make(seed: int, shape: Tuple[int, int, int], sp: np.ndarray, kinds_arg: Optional[Sequence[str]],
          n_lesions: Optional[int], malignant: Optional[bool], allow_edge: bool, p_n: Sequence[float]):
    if min(shape) < 1 or shape[1] < 32 or shape[2] < 32:
        raise ValueError(f"shape {shape} is too small; rows and columns need at least 32 voxels")
    if np.any(sp <= 0):
        raise ValueError(f"spacing must be positive, got {sp}")
    rng = np.random.default_rng(seed)
    is_2d = shape[0] == 1
    kinds = _decide_kinds(rng, n_lesions, malignant, kinds_arg, p_n)
    label = "normal" if not kinds else "malignant" if "malignant" in kinds else "benign"
    clinical = _draw_clinical(rng, label)
    layers = _draw_layers(rng, shape, sp, clinical["tissue_composition"])
    models = [_draw_lesion(rng, k, is_2d) for k in kinds]
    labels = _place_lesions(rng, models, shape, sp, layers, allow_edge, is_2d)
    image = _render(rng, shape, sp, layers, models, clinical["tissue_composition"])
    lesions = [m.truth for m in models]
    return image, labels, lesions, clinical, label, layers


def make_image(seed: int, shape: Tuple[int, int] = (256, 256), spacing_mm: Union[float, Sequence[float]] = 0.1,
               n_lesions: Optional[int] = None, malignant: Optional[bool] = None, *,
               kinds: Optional[Sequence[str]] = None, allow_edge: bool = False) -> SyntheticCase:
    """A handheld-like 2D image (rows = depth, row 0 = skin) as a one-slice Volume, uint8 grey.

    ``n_lesions`` None draws 0–2 lesions (mostly 1); ``malignant`` True makes at least one lesion malignant,
    False makes all benign (both imply at least one lesion unless ``n_lesions=0``), None draws it (40 %).
    ``spacing_mm`` is one value or (si, sj); ``kinds`` (e.g. ``("benign", "malignant")``) fixes the lesions'
    kinds in label order.  ``allow_edge`` lets lesions be cut by the image's lateral edges.  Raises
    ValueError when the lesions cannot fit in the glandular layer."""
    si, sj = (float(spacing_mm), float(spacing_mm)) if np.isscalar(spacing_mm) else map(float, spacing_mm)  # type: ignore[arg-type]
    sp = np.array([1.0, sj, si])
    shp = (1, int(shape[0]), int(shape[1]))
    image, labels, lesions, clinical, label, layers = _make(seed, shp, sp, kinds, n_lesions, malignant, allow_edge,
                                                            (0.1, 0.8, 0.1))
    meta = {"modality": "US", "manufacturer": "synthetic", "spacing_source": "synthetic", "acquisition_axis": 0,
            "is_2d": True, "source": f"synthetic_image_{seed}"}
    img = Volume(image, (si, sj, 1.0), metadata=meta)
    return SyntheticCase(img, img.with_array(labels), lesions, clinical, label, seed, layers.public())


def make_volume(seed: int, shape_kji: Tuple[int, int, int] = (64, 160, 200),
                spacing: Tuple[float, float, float] = (0.2, 0.2, 0.5), n_lesions: Optional[int] = None,
                malignant: Optional[bool] = None, acquisition_axis: int = 0, direction: Optional[np.ndarray] = None,
                origin: Optional[Sequence[float]] = None, *, kinds: Optional[Sequence[str]] = None,
                allow_edge: bool = False) -> SyntheticCase:
    """An ABVS-like volume, uint8 grey.  ``spacing`` is (si, sj, sk) mm (ITK order).  Rows (axis 1) are
    depth; the probe sweep is array axis ``acquisition_axis`` (0 or 2) and the lateral axis is the other.
    Lesion centres, radii and layer maps refer to the returned array's axes.  ``n_lesions``, ``malignant``,
    ``kinds`` and ``allow_edge`` as in :func:`make_image` (``n_lesions`` None draws 0–3, mostly 1–2)."""
    if acquisition_axis not in (0, 2):
        raise ValueError("acquisition_axis must be 0 or 2 (axis 1 is depth)")
    shape = tuple(int(n) for n in shape_kji)
    sp_kji = np.array([spacing[2], spacing[1], spacing[0]], dtype=float)
    swap = acquisition_axis == 2
    gen_shape = (shape[2], shape[1], shape[0]) if swap else shape
    gen_sp = sp_kji[::-1].copy() if swap else sp_kji
    image, labels, lesions, clinical, label, layers = _make(seed, gen_shape, gen_sp, kinds, n_lesions, malignant,
                                                            allow_edge, (0.05, 0.6, 0.3, 0.05))
    pub = layers.public()
    if swap:
        image, labels = np.ascontiguousarray(image.transpose(2, 1, 0)), np.ascontiguousarray(labels.transpose(2, 1, 0))
        pub = {k: np.ascontiguousarray(v.T) for k, v in pub.items()}
        for les in lesions:
            les.centre_kji = tuple(les.centre_kji[::-1])  # type: ignore[assignment]
            les.radii_mm = tuple(les.radii_mm[::-1])  # type: ignore[assignment]
    meta = {"modality": "US", "manufacturer": "synthetic", "spacing_source": "synthetic",
            "acquisition_axis": acquisition_axis, "is_2d": False, "source": f"synthetic_abvs_{seed}"}
    img = Volume(image, tuple(float(s) for s in spacing), tuple(origin) if origin is not None else (0.0, 0.0, 0.0),
                 np.eye(3) if direction is None else np.asarray(direction, float), meta)
    return SyntheticCase(img, img.with_array(labels), lesions, clinical, label, seed, pub)


# -------------------------------------------------------------------------------------- writers
def case_truth(case: SyntheticCase) -> Dict[str, Any]:
    """JSON-friendly truth: label, clinical variables, lesions (with size and RAS centre), geometry."""
    vox = case.image.voxel_volume_mm3 if not case.image.is_2d else case.image.spacing[0] * case.image.spacing[1]
    lesions = []
    for les in case.lesions:
        d = asdict(les)
        d["centre_kji"], d["radii_mm"] = list(les.centre_kji), list(les.radii_mm)
        d["centre_ras"] = [float(v) for v in case.image.array_index_to_ras(les.centre_kji)]
        n = int((case.mask.array == les.label).sum())
        d["area_mm2" if case.image.is_2d else "volume_mm3"] = round(n * vox, 3)
        lesions.append(d)
    return {
        "generator": "BreastDLRLib.synthetic",
        "seed": case.seed,
        "label": case.label,
        "birads": case.birads,
        "clinical": case.clinical,
        "lesions": lesions,
        "layers_mean_depth_mm": {k: round(float(np.mean(v)), 3) for k, v in case.layers.items()},
        "geometry": case.image.describe(),
    }


def _to_sitk(vol: Volume):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(vol.array)
    img.SetSpacing(vol.spacing)
    img.SetOrigin(vol.origin)
    img.SetDirection(tuple(vol.direction.ravel()))
    return img


def write_case(case: SyntheticCase, folder: Union[str, Path], stem: str) -> Dict[str, Path]:
    """Write ``<stem>.nrrd`` (image), ``<stem>_label.nrrd`` (labels) and ``<stem>.json`` (truth)."""
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"image": folder / f"{stem}.nrrd", "label": folder / f"{stem}_label.nrrd", "truth": folder / f"{stem}.json"}
    sitk.WriteImage(_to_sitk(case.image), str(paths["image"]), True)
    sitk.WriteImage(_to_sitk(case.mask), str(paths["label"]), True)
    paths["truth"].write_text(json.dumps(case_truth(case), indent=1))
    return paths


def write_png(array2d: np.ndarray, path: Union[str, Path]) -> None:
    """Write an 8-bit grey PNG."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(array2d, dtype=np.uint8)), str(path))


def make_dataset_2d(n: int, seed: int, folder: Union[str, Path], shape: Tuple[int, int] = (256, 256),
                    spacing_mm: float = 0.1) -> Path:
    """Write ``n`` synthetic 2D cases as ``images/<case>.png`` + ``masks/<case>_mask.png`` (0/255 union of
    lesions) and ``manifest.csv`` with the columns of the real breast-us manifest; returns its path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, size=n)
    rows = []
    for idx, s in enumerate(seeds):
        case = make_image(int(s), shape, spacing_mm)
        cid = f"synthetic_{idx:05d}"
        img_rel, mask_rel = f"images/{cid}.png", f"masks/{cid}_mask.png"
        write_png(case.image.array[0], folder / img_rel)
        write_png((case.mask.array[0] > 0).astype(np.uint8) * 255, folder / mask_rel)
        row = {c: "" for c in MANIFEST_COLUMNS}
        row.update(dataset="synthetic", case_id=cid, patient_id=cid, image=img_rel, mask=mask_rel, label=case.label,
                   birads=case.birads, age=str(case.clinical["age"]), pixel_spacing_mm=f"{spacing_mm:g}",
                   lesion_area_px=str(int((case.mask.array > 0).sum())), width=str(shape[1]), height=str(shape[0]),
                   sha256=hashlib.sha256((folder / img_rel).read_bytes()).hexdigest())
        rows.append(row)
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    return path
