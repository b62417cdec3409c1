"""Training data from a manifest (the columns of the BreastDLR manifest format) and patient-level splits."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError

MANIFEST_COLUMNS = ("dataset", "case_id", "patient_id", "image", "mask", "label", "birads", "age", "pixel_spacing_mm")
RISK_HIGH = {"4", "4a", "4b", "4c", "5"}
RISK_LOW = {"2", "3"}


@dataclass
class Case:
    case_id: str
    patient_id: str
    dataset: str
    image: Path
    mask: Optional[Path]
    label: str
    birads: str
    row: Dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def malignant(self) -> Optional[int]:
        return {"malignant": 1, "benign": 0}.get(self.label)

    @property
    def high_risk(self) -> Optional[int]:
        b = self.birads.lower()
        return 1 if b in RISK_HIGH else 0 if b in RISK_LOW else None


def read_manifest_csv(path: str | Path) -> List[Case]:
    """Read a manifest; paths are relative to the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Manifest {path} not found.")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in ("case_id", "image") if c not in cols]
        if missing:
            raise InputError(f"Manifest {path.name} lacks the column(s) {', '.join(missing)}; see the README for the format.")
        rows = list(reader)
    base = path.parent
    out = []
    for r in rows:
        mask = r.get("mask") or ""
        out.append(Case(
            case_id=r["case_id"], patient_id=r.get("patient_id") or r["case_id"], dataset=r.get("dataset", ""),
            image=base / r["image"], mask=(base / mask) if mask else None, label=(r.get("label") or "").lower(),
            birads=(r.get("birads") or "").lower(), row=r,
        ))
    return out


def split_seed_of(cfg: Any) -> int:
    """The seed of a run's patient split: ``split_seed``, else ``seed`` (a config or its dict)."""
    get = cfg.get if isinstance(cfg, Mapping) else (lambda k: getattr(cfg, k, None))
    return get("seed") if get("split_seed") is None else get("split_seed")


def patient_folds(cases: Sequence[Case], k: int = 5, seed: int = 0, stratify: str = "label") -> np.ndarray:
    """Fold index per case; every patient's cases fall in one fold, folds balanced per stratum.

    Patients are grouped by (dataset, stratum of their first case) and dealt round-robin after a seeded shuffle,
    so each fold gets a similar share of every dataset and class (stratified group k-fold).
    """
    rng = np.random.default_rng(seed)
    patients: Dict[str, List[int]] = {}
    for idx, c in enumerate(cases):
        patients.setdefault(f"{c.dataset}/{c.patient_id}", []).append(idx)
    strata: Dict[Tuple[str, str], List[str]] = {}
    for pid, idxs in patients.items():
        c = cases[idxs[0]]
        strata.setdefault((c.dataset, str(getattr(c, stratify))), []).append(pid)
    folds = np.full(len(cases), -1, dtype=int)
    offset = 0
    for key in sorted(strata):
        pids = strata[key]
        rng.shuffle(pids)
        for n, pid in enumerate(pids):
            folds[patients[pid]] = (n + offset) % k
        offset += len(pids)
    return folds


def load_grey(path: Path, size: Optional[int] = None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L")
        if size:
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def load_mask(path: Optional[Path], shape_hw: Tuple[int, int], size: Optional[int] = None) -> np.ndarray:
    from PIL import Image

    if path is None or not path.is_file():
        return np.zeros((size, size) if size else shape_hw, dtype=np.uint8)
    with Image.open(path) as im:
        im = im.convert("L")
        if size:
            im = im.resize((size, size), Image.NEAREST)
        return (np.asarray(im) > 127).astype(np.uint8)
