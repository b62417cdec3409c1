"""BreastDLR's sample data in Slicer's Sample Data module.

The samples are listed, with the SHA-256 of each file, in ``Resources/Samples/samples.json`` (refreshed by the
script that makes the samples, :func:`update_samples_json`); registration reads the checksums from there and
never computes them, so Sample Data really verifies the files it loads.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

FORMAT = "breastdlr-samples/1"
CATEGORY = "BreastDLR"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def samples_dir() -> Optional[Path]:
    from BreastDLRLib.resources import resources_dir

    res = resources_dir()
    return None if res is None else res / "Samples"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_samples(folder: Path) -> List[Dict[str, Any]]:
    """Entries of ``folder/samples.json`` (name, file, node_name, sha256, optional thumbnail, description)."""
    data = json.loads((Path(folder) / "samples.json").read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise ValueError(f"samples.json has format {data.get('format')!r}, expected {FORMAT!r}")
    entries = data.get("samples", [])
    for e in entries:
        missing = [k for k in ("name", "file", "node_name", "sha256") if k not in e]
        if missing:
            raise ValueError(f"samples.json entry {e.get('name', '?')!r} lacks {', '.join(missing)}")
    return entries


def registration_args(entry: Dict[str, Any], folder: Path, category: str = CATEGORY) -> Optional[Dict[str, Any]]:
    """Keyword arguments of ``SampleDataLogic.registerCustomSampleDataSource`` for one entry; None (and a
    warning) when the file is missing or its checksum was never recorded."""
    path = Path(folder) / entry["file"]
    digest = str(entry.get("sha256") or "").lower()
    if not _HEX64.match(digest):
        logging.warning("BreastDLR sample %s has no SHA-256 in samples.json; not registered.", entry["name"])
        return None
    if not path.is_file():
        logging.warning("BreastDLR sample file %s is missing; not registered.", path)
        return None
    thumb = entry.get("thumbnail")
    thumb_path = Path(folder) / thumb if thumb else None
    return {
        "category": category,
        "sampleName": entry["name"],
        "uris": [path.resolve().as_uri()],
        "fileNames": [path.name],
        "nodeNames": [entry["node_name"]],
        "checksums": [f"SHA256:{digest}"],
        "thumbnailFileName": str(thumb_path) if thumb_path is not None and thumb_path.is_file() else None,
    }


def register_samples(folder: Optional[Path] = None) -> List[str]:
    """Register every sample of ``samples.json`` with Sample Data; returns the registered names."""
    import SampleData

    folder = Path(folder) if folder is not None else samples_dir()
    if folder is None or not (folder / "samples.json").is_file():
        logging.warning("BreastDLR: no Resources/Samples/samples.json found; no sample data registered.")
        return []
    names = []
    for entry in read_samples(folder):
        args = registration_args(entry, folder)
        if args is not None:
            SampleData.SampleDataLogic.registerCustomSampleDataSource(**args)
            names.append(entry["name"])
    return names


def update_samples_json(folder: Path, entries: Optional[List[Dict[str, Any]]] = None) -> Path:
    """(Re)write ``folder/samples.json`` with the current SHA-256 of each listed file (for the sample script)."""
    folder = Path(folder)
    if entries is None:
        entries = read_samples(folder)
    out = []
    for e in entries:
        e = dict(e)
        e["sha256"] = sha256_of(folder / e["file"])
        out.append(e)
    path = folder / "samples.json"
    path.write_text(json.dumps({"format": FORMAT, "samples": out}, indent=2) + "\n", encoding="utf-8")
    return path
