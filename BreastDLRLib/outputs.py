"""Writers of results: label map, lesions.json, findings.json, heatmap volume, PNG previews, HTML report.

Everything is first written into a hidden staging folder beside ``out_dir`` and moved into ``out_dir`` only
when all of it is complete, so an error or a cancel never leaves partial results that look good.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator

import numpy as np

from . import __version__
from .io import write_png, write_volume
from .pipeline import Analysis, LesionResult
from .volume import Volume

SCHEMA_VERSION = "1.0"
INTENDED_USE = "Research use only. Not a medical device; results must be reviewed by a qualified radiologist."


# what an earlier run may have left in the output folder: removed before new results move in, so a folder never
# mixes two runs (e.g. lesion7_*.png of an earlier run beside a new findings.json with 2 lesions)
RESULT_PATTERNS = ("findings.json", "lesions.json", "labels.nrrd", "labels.png", "heatmap.nrrd", "report.html",
                   "preview.png", "lesion[0-9]*_*.png")


@contextlib.contextmanager
def staged_output(out_dir: str | Path) -> Iterator[Path]:
    """Yield a staging folder; on success earlier BreastDLR results in ``out_dir`` are removed (nothing else) and
    the new files move in."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}-staging-", dir=out.parent))
    try:
        yield stage
        out.mkdir(parents=True, exist_ok=True)
        for pattern in RESULT_PATTERNS:
            for old in out.glob(pattern):
                if old.is_file():
                    old.unlink()
        for item in sorted(stage.rglob("*")):
            if item.is_file():
                dest = out / item.relative_to(stage)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(item, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _clean(v: Any) -> Any:
    """JSON-safe values: NaN/inf become None, numpy scalars plain numbers, tuples lists."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def input_record(volume: Volume) -> Dict[str, Any]:
    md = volume.metadata
    return {"source": md.get("source"), "shape_kji": list(volume.shape), "spacing_mm": list(volume.spacing),
            "spacing_source": md.get("spacing_source", "unknown"), "is_2d": bool(volume.is_2d),
            "modality": md.get("modality"), "acquisition_axis": int(md.get("acquisition_axis", 0))}


def header(result: Analysis) -> Dict[str, Any]:
    """What every result file starts with: schema, software, intended use, input and models."""
    return {"schema_version": SCHEMA_VERSION, "software": {"name": "BreastDLR", "version": __version__},
            "intended_use": INTENDED_USE, "input": input_record(result.volume), "models": result.models}


def segmentation_record(result: Analysis) -> Dict[str, Any]:
    """How the lesions were outlined: the segmenter's precision and test-time augmentation."""
    return {"precision": result.precision, "test_time_augmentation": list(result.segmentation_tta)}


def lesion_record(lr: LesionResult, volume: Volume) -> Dict[str, Any]:
    les = lr.lesion
    rec = lr.recommendation
    return {
        "id": les.id,
        "bbox_kji": [list(b) for b in les.bbox_kji],
        "bbox_mm": les.bbox_mm(volume.spacing),
        "centre_kji": list(les.centre_kji),
        "centre_ras": list(les.centre_ras),
        "measurements": les.measurements(),
        "probabilities": dict(lr.probabilities),
        "frame_probabilities": dict(lr.frame_probabilities),
        "thresholds": dict(lr.thresholds),
        "recommendation": None if rec is None else rec.to_dict(),
        "heatmap": None,
        "heatmap_class": lr.heatmap_class,
        "previews": {},
        "outline": lr.outline,
        "outline_uncertain": bool(lr.outline_uncertain),
        "outline_features": dict(lr.features),
    }


# ---------------------------------------------------------------------------------------------- previews
def _contour(mask2d: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask2d & ~ndimage.binary_erosion(mask2d, border_value=0)


def _grey_uint8(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    lo, hi = np.percentile(a, [0.5, 99.5]) if a.size else (0, 1)
    return (np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def transverse_preview(volume: Volume, labels: Volume, k: int, path: Path) -> Path:
    """The transverse slice ``k`` with every lesion's outline (yellow) as an RGB PNG."""
    axis = int(volume.metadata.get("acquisition_axis", 0))
    img = _grey_uint8(np.take(volume.array, k, axis=axis))
    lab = np.take(labels.array, k, axis=axis)
    rgb = np.repeat(img[..., None], 3, axis=2)
    edge = _contour(lab > 0)
    rgb[edge] = (255, 220, 0)
    return write_png(rgb, path)


# ---------------------------------------------------------------------------------------------- writers
def write_segmentation(out_dir: str | Path, result: Analysis) -> Dict[str, Any]:
    """``labels.nrrd`` (input geometry, value = lesion id), ``lesions.json``, ``preview.png`` (+ one PNG per
    lesion) and, for a 2D image, ``labels.png`` (0/255)."""
    with staged_output(out_dir) as stage:
        return _segmentation_files(stage, result)


def _segmentation_files(stage: Path, result: Analysis) -> Dict[str, Any]:
    vol = result.volume
    write_volume(result.labels.with_array(result.labels.array.astype(np.uint16)), stage / "labels.nrrd")
    if vol.is_2d:
        write_png((result.labels.array[0] > 0).astype(np.uint8) * 255, stage / "labels.png")
    records = []
    axis = int(vol.metadata.get("acquisition_axis", 0))
    for lr in result.lesions:
        rec = lesion_record(lr, vol)
        k = int(round(lr.lesion.centre_kji[axis]))
        transverse_preview(vol, result.labels, k, stage / f"lesion{lr.lesion.id}_transverse.png")
        rec["previews"] = {"transverse": f"lesion{lr.lesion.id}_transverse.png"}
        records.append(rec)
    k_best = int(round(result.lesions[0].lesion.centre_kji[axis])) if result.lesions else vol.shape[axis] // 2
    transverse_preview(vol, result.labels, k_best, stage / "preview.png")
    doc = {
        **header(result),
        "precision": result.precision,
        "segmentation": segmentation_record(result),
        "lesions": [{k: v for k, v in r.items() if k not in ("probabilities", "frame_probabilities", "thresholds",
                                                              "recommendation", "heatmap", "heatmap_class")} for r in records],
        "outputs": {"label_map": "labels.nrrd", "preview": "preview.png"},
        "timings_s": result.timings,
    }
    (stage / "lesions.json").write_text(json.dumps(_clean(doc), indent=2) + "\n", encoding="utf-8")
    return doc


def write_analysis(out_dir: str | Path, result: Analysis, report: bool = True) -> Dict[str, Any]:
    """Everything of :func:`write_segmentation` plus ``heatmap.nrrd``, per-lesion Grad-CAM overlays,
    ``findings.json`` (validated against its schema) and a self-contained ``report.html``."""
    from .explain import overlay_png

    vol = result.volume
    with staged_output(out_dir) as stage:
        seg_doc = _segmentation_files(stage, result)
        records = []
        for lr, seg_rec in zip(result.lesions, seg_doc["lesions"]):
            rec = lesion_record(lr, vol)
            rec["previews"] = dict(seg_rec["previews"])
            for plane, frames in (lr.crops or {}).items():
                crop = frames[len(frames) // 2]
                name = f"lesion{lr.lesion.id}_{plane}_crop.png"
                write_png((crop.image * 255).astype(np.uint8), stage / name)
                rec["previews"][f"{plane}_crop"] = name
                if plane in lr.cams:
                    oname = f"lesion{lr.lesion.id}_{plane}_gradcam.png"
                    overlay_png(crop.image, lr.cams[plane], stage / oname)
                    rec["previews"][f"{plane}_gradcam"] = oname
            if result.heatmap is not None:
                rec["heatmap"] = "heatmap.nrrd"
            records.append(rec)
        if result.heatmap is not None:
            write_volume(result.heatmap, stage / "heatmap.nrrd")
        findings = {
            **header(result),
            "clinical": result.clinical,
            "clinical_notes": result.clinical_notes,
            "birads": result.birads,
            "lesions": records,
            "outputs": {"label_map": "labels.nrrd", "heatmap": "heatmap.nrrd" if result.heatmap is not None else None,
                        "report": "report.html" if report else None, "lesions_json": "lesions.json",
                        "preview": "preview.png"},
            "segmentation": segmentation_record(result),
            "timings_s": result.timings,
        }
        findings = _clean(findings)
        validate_findings(findings)
        (stage / "findings.json").write_text(json.dumps(findings, indent=2) + "\n", encoding="utf-8")
        if report:
            from .report import write_report

            write_report(stage / "report.html", findings, stage)
    return findings


def findings_schema() -> Dict[str, Any]:
    return json.loads((Path(__file__).parent / "schemas" / "findings.schema.json").read_text(encoding="utf-8"))


def validate_findings(findings: Dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if ``findings`` does not follow the published schema."""
    import jsonschema

    jsonschema.validate(findings, findings_schema())
