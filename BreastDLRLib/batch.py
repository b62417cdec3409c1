"""``breastdlr predict``: many 2D images from a manifest, one row of predictions each.

A row that fails (unreadable image, bad clinical value, ...) gets its error message and does not stop the
others.  Per image, the largest lesion found is the one reported; when none is found the classifiers see
the whole image (``lesion_found`` is False, so an evaluation can tell).

``outline="manifest"`` takes the lesion from the row's ``mask`` (a reader's outline: the morphology models then
score it too); rows with no mask, or a mask that draws nothing, fall back to the segmenter, and a mask that cannot
be read or does not fit the image is that row's error.  The ``outline`` column says which outline each row used;
``outline_uncertain`` is true where the segmenter was unsure of its outline (its manifest's
``thresholds.uncertain_outline_below``): those rows' scores are less reliable.
"""
from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from .errors import BreastDLRError, InputError
from .progress import CancelCheck, ProgressCallback, check_cancel, no_progress

COLUMNS = ("case_id", "probability_malignant", "probability_high_risk", "recommendation", "lesion_found",
           "n_lesions", "outline", "outline_uncertain", "error")
OUTLINES = ("auto", "manifest")


def _fmt(p: Optional[float]) -> str:
    return "" if p is None else f"{p:.6f}"


def predict_manifest(manifest: str | Path, out_csv: str | Path, *, masks_out: Optional[str | Path] = None,
                     device: str = "auto", model_paths: Optional[Sequence[str]] = None, outline: str = "auto",
                     progress: ProgressCallback = no_progress, cancel: Optional[CancelCheck] = None,
                     optional_roles: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    from .io import read_mask, read_volume, write_png
    from .pipeline import OPTIONAL_ROLES, Pipeline
    from .recommend import normalise_birads
    from .training.data import read_manifest_csv

    if outline not in OUTLINES:
        raise InputError(f"outline must be one of {', '.join(OUTLINES)}, not {outline!r}.")
    cases = read_manifest_csv(manifest)
    if not cases:
        raise InputError(f"The manifest {Path(manifest).name} lists no images.")
    if optional_roles is None:   # every installed default model that 2D images can use
        optional_roles = tuple(r for r in OPTIONAL_ROLES if r != "abvs-malignancy")
    pipe = Pipeline.from_paths(model_paths, device=device, roles=("segmenter", "malignancy"),
                               optional_roles=tuple(optional_roles))
    schema = pipe.clinical_schema()
    if masks_out:
        Path(masks_out).mkdir(parents=True, exist_ok=True)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_csv.name}.", suffix=".part", dir=out_csv.parent)
    n_ok = n_err = 0
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for idx, case in enumerate(cases):
                check_cancel(cancel)
                row = {c: "" for c in COLUMNS}
                row["case_id"] = case.case_id
                try:
                    spacing = case.row.get("pixel_spacing_mm") or None
                    vol = read_volume(case.image, spacing=float(spacing) if spacing else None)
                    if not vol.is_2d:
                        raise InputError(f"{case.image.name} is a volume; predict takes 2D images (use analyze).")
                    clinical = {n: case.row[n] for n in schema.names if case.row.get(n, "") != ""}
                    birads = normalise_birads(case.birads) if case.birads else None
                    cleaned, _ = pipe.parse_clinical(schema, clinical)
                    drawn = None
                    if outline == "manifest" and case.mask is not None:
                        drawn = read_mask(case.mask, vol)
                    seg = pipe.reader_outline(vol, vol.with_array(drawn)) if drawn is not None and drawn.any() \
                        else pipe.segment(vol)
                    found = bool(seg.lesions)
                    lr = seg.lesions[0] if found else pipe.whole_image_lesion(vol)
                    pipe.classify_lesion(vol, lr, schema, cleaned, birads)
                    p_mal = pipe.decision_probability(lr)
                    row.update(probability_malignant=_fmt(p_mal), probability_high_risk=_fmt(pipe.risk_probability(lr)),
                               lesion_found=str(found).lower(), n_lesions=str(len(seg.lesions)), outline=lr.outline,
                               outline_uncertain=str(lr.outline_uncertain).lower() if found else "")
                    rec = lr.recommendation
                    if rec is not None and rec.action != "not applicable":
                        row["recommendation"] = f"{rec.action}:{rec.birads_out}"
                    if masks_out:
                        write_png((seg.labels.array[0] > 0).astype(np.uint8) * 255, Path(masks_out) / f"{case.case_id}_mask.png")
                    n_ok += 1
                except BreastDLRError as exc:
                    row["error"] = str(exc)
                    n_err += 1
                except Exception as exc:  # noqa: BLE001 - one bad row must not stop the batch
                    row["error"] = f"internal error: {type(exc).__name__}: {exc}"
                    n_err += 1
                w.writerow(row)
                progress("predict", (idx + 1) / len(cases), case.case_id)
        os.replace(tmp, out_csv)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"rows": len(cases), "ok": n_ok, "errors": n_err, "predictions": str(out_csv)}
