"""Where the shared resources (sample data, shipped models) are.

``Resources/`` sits at the top of a source checkout, next to ``BreastDLRLib/``; in an installed Slicer
extension the CMake build puts ``BreastDLRLib/`` and the shared ``Resources/`` side by side in the module
folder (``lib/Slicer-X.Y/qt-scripted-modules``), where the module's own ``Resources/UI`` and ``Icons`` live
too.  ``BREASTDLR_RESOURCES`` overrides both.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from .errors import InputError

ENV_VAR = "BREASTDLR_RESOURCES"
_PACKAGE_DIR = Path(__file__).resolve().parent


def candidate_dirs() -> List[Path]:
    """Resource folders in the order they are tried."""
    dirs: List[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(_PACKAGE_DIR.parent / "Resources")  # checkout root, or the installed module folder
    dirs.append(_PACKAGE_DIR.parent / "BreastDLR" / "Resources")  # module folder of a checkout
    return dirs


def resources_dir() -> Optional[Path]:
    """The first candidate folder holding ``Samples`` or ``Models``; else the first that exists; else None."""
    existing = [d for d in candidate_dirs() if d.is_dir()]
    for d in existing:
        if (d / "Samples").is_dir() or (d / "Models").is_dir():
            return d
    return existing[0] if existing else None


def sample_path(name: str) -> Path:
    """Path of a shipped sample (e.g. ``"synthetic_abvs.nrrd"``); refuses a missing one with a clear message."""
    res = resources_dir()
    path = (res / "Samples" / name) if res is not None else None
    if path is None or not path.is_file():
        where = res / "Samples" if res is not None else "Resources/Samples"
        raise InputError(
            f"The sample '{name}' is not installed (looked in {where}); reinstall BreastDLR or set {ENV_VAR}."
        )
    return path
