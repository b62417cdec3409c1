"""Handcrafted lesion features from a 2D ultrasound image and the lesion's outline (the radiomics half of DLR).

The features describe what BI-RADS asks a reader to look at, measured on the outline: shape (oval or
irregular), orientation (parallel or taller than wide), margin (circumscribed, angular, microlobulated,
spiculated), echo pattern (hypo- or hyperechoic to the surrounding tissue, heterogeneous) and posterior
features (shadowing or enhancement).  All are free of units and of the image's grey-level range, so pixel
spacing and scanner gain do not move them.

They are only as good as the outline: they are meant for an outline a reader drew or confirmed (a Slicer
segment, the ``mask`` column of a manifest).  The segmenter's outlines are smoother than a reader's and move
these features (measured in the model card of ``breastdlr-morphology-*``), so the pipeline applies the
morphology models to reader outlines only.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError

#: (name, what it measures), in the order models use them.
FEATURES: Tuple[Tuple[str, str], ...] = (
    ("aspect", "depth / width of the bounding box (> 1: taller than wide)"),
    ("orientation_deg", "angle of the long axis from the skin line, 0-90 degrees"),
    ("eccentricity", "eccentricity of the ellipse with the same second moments"),
    ("circularity", "4 pi area / perimeter^2 (1 for a circle)"),
    ("solidity", "area / area of the convex hull (angular or lobulated margins lower it)"),
    ("extent", "area / bounding-box area"),
    ("convex_perimeter_ratio", "convex hull perimeter / perimeter (spiculation lowers it)"),
    ("radial_sd", "standard deviation of the normalised radial length of the outline"),
    ("radial_roughness", "mean absolute step of the normalised radial length around the outline"),
    ("fourier_high", "share of the outline's radial spectrum above the 8th harmonic"),
    ("echo_contrast", "(mean inside - mean of a surrounding ring) / mean of the ring (hypoechoic < 0)"),
    ("heterogeneity", "standard deviation / mean of the intensities inside"),
    ("entropy", "entropy of the inside's intensity histogram (32 bins, bits)"),
    ("texture", "mean |Laplacian of Gaussian| inside / mean inside"),
    ("posterior", "(mean below the lesion - mean below its sides) / mean below its sides (shadowing < 0)"),
    ("margin_sharpness", "mean gradient on the outline / standard deviation of the ring"),
)
FEATURE_NAMES: Tuple[str, ...] = tuple(n for n, _ in FEATURES)
MIN_PIXELS = 16


def _normalised(image: np.ndarray) -> np.ndarray:
    """The image on a 0-255 scale between its 0.5th and 99.5th percentiles (any dtype, any gain)."""
    img = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(img, (0.5, 99.5))
    if hi <= lo:
        raise InputError("The image is blank (one grey level): no lesion features can be measured.")
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0) * 255.0


def largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = ndi.sum(mask, lab, range(1, n + 1))
    return ndi.binary_fill_holes(lab == 1 + int(np.argmax(sizes)))


def lesion_features(image: np.ndarray, mask: np.ndarray) -> Dict[str, float]:
    """The :data:`FEATURES` of the largest region of ``mask`` (H, W) on ``image`` (H, W; rows = depth).

    Raises :class:`InputError` with a reader's explanation for a missing, tiny or mismatched outline and for
    images with NaNs or a single grey level.
    """
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.ndim != 2 or mask.ndim != 2:
        raise InputError(f"Lesion features need one 2D image and its 2D outline, not arrays of shape "
                         f"{image.shape} and {mask.shape}.")
    if image.shape != mask.shape:
        raise InputError(f"The lesion outline ({mask.shape[1]}×{mask.shape[0]} pixels) does not match the image "
                         f"({image.shape[1]}×{image.shape[0]}); it was drawn on another image.")
    if not np.all(np.isfinite(image)):
        raise InputError("The image contains invalid values (NaN or infinite); lesion features cannot be measured.")
    m = largest_component(mask > 0)
    area = float(m.sum())
    if area == 0:
        raise InputError("The lesion outline is empty: no lesion was drawn on this image.")
    if area < MIN_PIXELS:
        raise InputError(f"The lesion outline covers {int(area)} pixel(s); at least {MIN_PIXELS} are needed to "
                         "describe its shape. Draw the lesion's outline, not a point.")
    img = _normalised(image)
    H, W = m.shape
    ys, xs = np.nonzero(m)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    edge = m & ~ndi.binary_erosion(m)
    by, bx = np.nonzero(edge)
    # perimeter from the pixel edges between inside and outside, corrected for the 4-connected staircase
    perim = float(np.sum(m[1:] != m[:-1]) + np.sum(m[:, 1:] != m[:, :-1])
                  + m[0].sum() + m[-1].sum() + m[:, 0].sum() + m[:, -1].sum()) * np.pi / 4
    hull_area, hull_perim = _convex_hull(np.c_[bx, by].astype(float), area, perim)
    cy, cx = ys.mean(), xs.mean()
    cov = np.cov(np.c_[xs - cx, ys - cy].T)          # at least MIN_PIXELS points
    ev, evec = np.linalg.eigh(cov)
    ecc = float(np.sqrt(max(0.0, 1.0 - ev[0] / ev[1]))) if ev[1] > 0 else 0.0
    ang = abs(np.degrees(np.arctan2(evec[1, 1], evec[0, 1])))
    ang = min(ang, 180.0 - ang)
    r = np.hypot(bx - cx, by - cy)
    th = np.arctan2(by - cy, bx - cx)
    order = np.argsort(th)
    r, th = r[order], th[order]
    rmean = max(r.mean(), 1e-6)
    nrl = r / rmean
    grid = np.linspace(-np.pi, np.pi, 128, endpoint=False)
    rr = np.interp(grid, th, r, period=2 * np.pi) / rmean
    spec = np.abs(np.fft.rfft(rr - rr.mean()))
    ring = ndi.binary_dilation(m, iterations=max(2, int(0.3 * np.sqrt(area / np.pi)))) & ~m
    inner = img[m]
    outer = img[ring] if ring.any() else inner
    mu_in, mu_out = inner.mean(), outer.mean()
    q = np.clip((inner / 8).astype(int), 0, 31)
    p = np.bincount(q, minlength=32) / len(q)
    entropy = float(-np.sum(p[p > 0] * np.log2(p[p > 0])))
    log = np.abs(ndi.gaussian_laplace(img, 1.0))[m].mean()
    y1, band = ys.max(), max(3, int(0.5 * h))
    x0, x1 = xs.min(), xs.max() + 1

    def below(a: int, b: int) -> float:
        reg = img[y1 + 1:min(H, y1 + 1 + band), max(0, a):min(W, b)]
        return float(reg.mean()) if reg.size else np.nan

    post = below(x0, x1)
    side_vals = [v for v in (below(x0 - w, x0), below(x1, x1 + w)) if np.isfinite(v)]
    sides = float(np.mean(side_vals)) if side_vals else np.nan
    posterior = (post - sides) / (sides + 1.0) if np.isfinite(post) and np.isfinite(sides) else 0.0
    gy, gx = np.gradient(ndi.gaussian_filter(img, 1.5))
    sharp = np.hypot(gx, gy)[edge].mean() / (outer.std() + 1.0)
    out = {
        "aspect": h / w, "orientation_deg": ang, "eccentricity": ecc,
        "circularity": min(4 * np.pi * area / perim ** 2, 1.5), "solidity": min(area / hull_area, 1.0),
        "extent": area / (h * w), "convex_perimeter_ratio": hull_perim / perim,
        "radial_sd": nrl.std(), "radial_roughness": np.mean(np.abs(np.diff(nrl))),
        "fourier_high": spec[8:].sum() / (spec[1:].sum() + 1e-6),
        "echo_contrast": (mu_in - mu_out) / (mu_out + 1.0), "heterogeneity": inner.std() / (mu_in + 1.0),
        "entropy": entropy, "texture": log / (mu_in + 1.0), "posterior": posterior, "margin_sharpness": sharp,
    }
    return {k: float(out[k]) for k in FEATURE_NAMES}


def _convex_hull(points: np.ndarray, area: float, perim: float) -> Tuple[float, float]:
    """(area, perimeter) of the convex hull of the outline's pixel centres, grown by half a pixel."""
    from scipy.spatial import ConvexHull, QhullError

    try:
        hull = ConvexHull(points)
    except (QhullError, ValueError):  # a line of pixels: the region is its own hull
        return area, perim
    # the pixel centres' hull misses half a pixel all round: add it (area + perimeter/2)
    return max(hull.volume + hull.area / 2 + 1.0, area), hull.area + np.pi / 2


def feature_vector(features: Dict[str, float]) -> np.ndarray:
    return np.array([features[n] for n in FEATURE_NAMES], dtype=np.float64)


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def head_inputs(image_probability, features: np.ndarray) -> np.ndarray:
    """A morphology head's input rows: [logit of the image model's probability, features]."""
    return np.c_[logit(image_probability), np.atleast_2d(features)]
