"""Model choice for the module: which bundles to offer, which clinical inputs they declare, importing one.

Plain Python on top of :mod:`BreastDLRLib.bundles` (tested without Slicer).  Bundles are the dicts of
``BreastDLRLib.bundles.list_bundles``: name, version, role, path, manifest (with ``clinical_variables``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

try:
    from slicer.i18n import tr as _
except ImportError:
    def _(text: str) -> str:
        return text

#: Roles a user picks; the segmenter is always the shipped default (or the one a classifier names).
SELECTABLE_ROLES = ("malignancy", "fusion", "risk", "abvs-malignancy")


def user_models_dir(settings_dir: os.PathLike) -> Path:
    """Where imported models are kept: ``<Slicer settings folder>/BreastDLR/Models``."""
    return Path(settings_dir) / "BreastDLR" / "Models"


def model_choices(bundles: Sequence[Dict[str, Any]]) -> List[Tuple[str, str]]:
    """(label, path) pairs for the model selector; the first, with an empty path, means the shipped defaults."""
    choices = [(_("Default models"), "")]
    for b in sorted((b for b in bundles if b.get("role") in SELECTABLE_ROLES),
                    key=lambda b: (not b.get("default", False), b["role"], b["name"], str(b["version"]))):
        choices.append((f"{b['name']} {b['version']} ({b['role']})", str(b["path"])))
    return choices


def clinical_variables_for(bundles: Sequence[Dict[str, Any]], selected_path: str) -> List[Dict[str, Any]]:
    """Clinical variables the form must ask for: the selected bundle's, or (defaults) those of every default
    bundle, each name once, in declaration order."""
    if selected_path:
        chosen = [b for b in bundles if str(b["path"]) == str(selected_path)]
    else:
        chosen = [b for b in bundles if b.get("default")]
    seen, out = set(), []
    for b in chosen:
        for var in (b.get("manifest") or {}).get("clinical_variables", []) or []:
            key = str(var.get("name", "")).strip().lower()
            if key and key not in seen:
                seen.add(key)
                out.append(dict(var))
    return out


def model_paths_for(selected_path: str) -> Optional[List[str]]:
    """The pipeline's ``model_paths``: None for the shipped defaults."""
    return [str(selected_path)] if selected_path else None


def import_bundle(source: os.PathLike, models_dir: os.PathLike, overwrite: bool = False) -> Path:
    """Verify the bundle folder ``source`` (manifest, weights checksum) and copy it into ``models_dir``.

    The copy is made in a temporary folder and renamed, so a failed copy leaves nothing half-written.
    Raises ``ModelBundleError`` for a bad bundle and ``FileExistsError`` when a model of that folder name is
    there already and ``overwrite`` is false.  A model that uses the trunk of a sibling (``weights.parts`` with
    ``bundle``) brings that sibling along, unless the very release it needs is imported already."""
    from BreastDLRLib.bundles import open_bundle, sha256_file, weight_files

    source = Path(source).expanduser().resolve()
    bundle = open_bundle(source, verify=True)
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / source.name
    if target.resolve() == source:
        return target
    for wf in weight_files(bundle.manifest):
        have = models_dir / wf.bundle / wf.file
        if wf.bundle and not (have.is_file() and sha256_file(have) == wf.sha256):
            import_bundle(source.parent / wf.bundle, models_dir, overwrite=overwrite)
    if target.exists() and not overwrite:
        raise FileExistsError(_("A model named '{name}' is already imported.").format(name=source.name))
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.name}-", dir=models_dir))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        open_bundle(tmp, verify=True)  # the copy is intact
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    del bundle
    return target
