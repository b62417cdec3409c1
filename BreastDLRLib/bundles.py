"""Model bundles: safetensors weights + a JSON manifest + a model card.  No pickle anywhere.

A bundle is a folder::

    <name>/
      manifest.json        what the model needs and promises (architecture, input, labels, thresholds,
                           clinical variables, provenance, metrics, licence, sha256 of the weights)
      weights.safetensors  the tensors (fp16 or fp32)
      MODEL_CARD.md        data, metrics, intended use (research only), limits

Loading checks the manifest's format and fields, the weights' sha256, and that the tensors fit the network
the manifest describes (names and shapes, strict); anything else is refused with a
:class:`~BreastDLRLib.errors.ModelBundleError` that says what to do.  The models shipped in
``Resources/Models`` are also listed in ``Resources/Models/models.json`` with the sha256 of each manifest, so
an edited manifest (a changed threshold, say) is caught too.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from .errors import ModelBundleError

BUNDLE_FORMAT = "breastdlr-bundle/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
MODEL_CARD = "MODEL_CARD.md"
INDEX = "models.json"
ROLES = ("segmenter", "malignancy", "risk", "fusion", "abvs-malignancy", "morphology-malignancy", "morphology-risk")
REQUIRED = ("format", "name", "version", "role", "architecture", "arguments", "input", "labels", "thresholds",
            "weights", "provenance", "metrics", "licence", "intended_use")


def sha256_file(path: os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    """A verified bundle: its folder, manifest and (once built) its network."""

    path: Path
    manifest: Dict[str, Any]
    _model: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def role(self) -> str:
        return self.manifest["role"]

    @property
    def thresholds(self) -> Dict[str, float]:
        return self.manifest["thresholds"]

    @property
    def input(self) -> Dict[str, Any]:
        return self.manifest["input"]

    @property
    def clinical_variables(self) -> List[Dict[str, Any]]:
        return list(self.manifest.get("clinical_variables", []))

    def describe(self) -> Dict[str, Any]:
        return {"role": self.role, "name": self.name, "version": self.version,
                "sha256": self.manifest["weights"]["sha256"]}

    def model(self, device: str = "cpu"):
        """The network with the bundle's weights, in eval mode, float32, on ``device`` (built once)."""
        if self._model is None:
            if self.is_head:
                from .clinical import head_from_dict

                self._model = head_from_dict(json.loads((self.path / self.manifest["weights"]["file"]).read_text("utf-8")))
                return self._model
            self._model = build_network(self.manifest, load_weights(self))
        return self._model if self.is_head else self._model.to(device)

    @property
    def is_head(self) -> bool:
        """A scikit-learn style fusion head stored as JSON arrays (no tensors, no pickle)."""
        return str(self.manifest["weights"].get("file", "")).endswith(".json")


# ---------------------------------------------------------------------------------------------- builders
def _builders() -> Dict[str, Callable[..., Any]]:
    from .networks.segmenter import build_segmenter

    table: Dict[str, Callable[..., Any]] = {"Unet": build_segmenter}
    try:
        from .networks.classifiers import build_classifier

        for arch in ("ThreePlaneFusion", "EmbeddingNet", "EnsembleNet"):
            table[arch] = (lambda a: (lambda **kw: build_classifier(a, **kw)))(arch)
    except ImportError:  # pragma: no cover - classifiers are part of the package
        pass
    return table


def build_network(manifest: Dict[str, Any], state: Dict[str, Any]):
    import torch

    arch = manifest["architecture"]
    builders = _builders()
    if arch not in builders:
        raise ModelBundleError(
            f"Model '{manifest.get('name')}' needs the architecture '{arch}', which this version of BreastDLR does not "
            f"have (known: {', '.join(sorted(builders))}); update BreastDLR or use a matching model."
        )
    args = dict(manifest.get("arguments", {}))
    for k, v in list(args.items()):
        if isinstance(v, list):
            args[k] = tuple(v)
        elif isinstance(v, dict):  # nested arguments (an ensemble's members)
            args[k] = {kk: tuple(vv) if isinstance(vv, list) else vv for kk, vv in v.items()}
    try:
        net = builders[arch](**args)
    except TypeError as exc:
        raise ModelBundleError(f"Model '{manifest.get('name')}': its arguments do not fit '{arch}' ({exc}).") from exc
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or extra or wrong:
        detail = "; ".join(
            s for s in (
                f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else "",
                f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "",
                f"{len(wrong)} of the wrong shape (e.g. {wrong[0]})" if wrong else "",
            ) if s
        )
        raise ModelBundleError(
            f"Model '{manifest.get('name')}': the weights do not match the network its manifest describes ({detail}); "
            "the bundle is damaged or mixed up with another model: reinstall it."
        )
    net.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(torch.float32)


# ---------------------------------------------------------------------------------------------- reading
def read_manifest(path: os.PathLike) -> Dict[str, Any]:
    folder = Path(path)
    mpath = folder / MANIFEST if folder.is_dir() else folder
    if not mpath.is_file():
        raise ModelBundleError(f"No model bundle at {folder}: {MANIFEST} is missing. Choose a folder made by 'breastdlr train'.")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelBundleError(f"The model manifest {mpath} is not valid JSON ({exc}); the bundle is damaged: reinstall it.") from exc
    if not isinstance(manifest, dict):
        raise ModelBundleError(f"The model manifest {mpath} is not a JSON object; the bundle is damaged: reinstall it.")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ModelBundleError(
            f"{mpath} is a '{manifest.get('format')}' bundle; this BreastDLR reads '{BUNDLE_FORMAT}'. Update BreastDLR or re-export the model."
        )
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ModelBundleError(f"The model manifest {mpath} lacks {', '.join(missing)}; the bundle is incomplete: reinstall it.")
    if manifest["role"] not in ROLES:
        raise ModelBundleError(f"The model manifest {mpath} has an unknown role '{manifest['role']}' (known: {', '.join(ROLES)}).")
    w = manifest["weights"]
    if not isinstance(w, dict) or not isinstance(w.get("sha256"), str) or len(w["sha256"]) != 64:
        raise ModelBundleError(f"The model manifest {mpath} carries no sha256 of its weights; it cannot be verified and is refused.")
    return manifest


def _index_entry(folder: Path) -> Optional[Dict[str, Any]]:
    index = folder.parent / INDEX
    if not index.is_file():
        return None
    try:
        entries = json.loads(index.read_text(encoding="utf-8")).get("models", [])
    except json.JSONDecodeError as exc:
        raise ModelBundleError(f"The list of models {index} is damaged ({exc}); reinstall BreastDLR's models.") from exc
    for e in entries:
        if e.get("folder") == folder.name:
            return e
    return None


def open_bundle(path: os.PathLike, verify: bool = True) -> Bundle:
    """Read and verify a bundle folder; the network is built lazily by :meth:`Bundle.model`."""
    folder = Path(path).expanduser().resolve()
    manifest = read_manifest(folder)
    if verify:
        entry = _index_entry(folder)
        if entry is not None and entry.get("manifest_sha256") != sha256_file(folder / MANIFEST):
            raise ModelBundleError(
                f"The manifest of model '{manifest['name']}' was changed after it was released (its checksum differs "
                f"from {INDEX}); it is refused. Reinstall the model."
            )
        for wf in weight_files(manifest):
            wfile = folder / wf.relpath
            whose = "" if not wf.bundle else f" of the model '{wf.bundle}', whose trunk it uses,"
            if not wfile.is_file():
                raise ModelBundleError(
                    f"Model '{manifest['name']}': the weights file {wf.file}{whose} is missing; "
                    + (f"install '{wf.bundle}' in the same folder (the two models come together)." if wf.bundle
                       else "reinstall the model."))
            if sha256_file(wfile) != wf.sha256:
                raise ModelBundleError(
                    f"Model '{manifest['name']}': the weights file {wf.file}{whose} does not match its checksum; it was "
                    "altered, damaged or replaced by another release and is refused. Reinstall "
                    + (f"'{manifest['name']}' and '{wf.bundle}' together." if wf.bundle else "the model."))
    return Bundle(folder, manifest)


@dataclass(frozen=True)
class WeightFile:
    """One weights file of a bundle: ``file`` in the bundle's folder, or in the sibling bundle folder ``bundle``
    (a model that uses another's trunk); its tensors are named ``prefix`` + their stored name, and with ``only``
    just those whose stored name starts with one of its prefixes are taken."""

    file: str
    sha256: str
    prefix: str = ""
    bundle: str = ""
    only: tuple = ()

    @property
    def relpath(self) -> Path:
        """Its path relative to the bundle's folder."""
        return Path(self.file) if not self.bundle else Path("..") / self.bundle / self.file


def _plain_name(v: Any) -> bool:
    return isinstance(v, str) and bool(v) and v not in (".", "..") and "/" not in v and "\\" not in v


def weight_files(manifest: Dict[str, Any]) -> List[WeightFile]:
    """Every weights file: the main one, then ``weights.parts``.

    A part holds some of the network's tensors under names without ``prefix`` (an ensemble's second member, say,
    stored apart so that the first member's file stays as it was released).  A part with ``bundle`` lies in that
    sibling bundle's folder (the risk model taking the malignancy model's trunk: one trunk stored once) and takes
    only the tensors named by ``only``; its sha256 pins the sibling's release."""
    w = manifest["weights"]
    files = [WeightFile(str(w.get("file", WEIGHTS)), w["sha256"], str(w.get("prefix", "")))]
    parts = w.get("parts", [])
    if not isinstance(parts, list):
        raise ModelBundleError(f"Model '{manifest.get('name')}': 'weights.parts' must be a list; the bundle is damaged.")
    for part in parts:
        if not isinstance(part, dict) or not isinstance(part.get("sha256"), str) or len(part["sha256"]) != 64 \
                or not _plain_name(part.get("file")):
            raise ModelBundleError(f"Model '{manifest.get('name')}': a weights part lacks its file name or sha256; it "
                                   "cannot be verified and is refused.")
        bundle, only = part.get("bundle", ""), part.get("only", [])
        if bundle and (not _plain_name(bundle) or not isinstance(only, list) or not only
                       or not all(isinstance(o, str) and o for o in only)):
            raise ModelBundleError(f"Model '{manifest.get('name')}': a weights part taken from another model must name "
                                   "that model's folder and the tensors it takes ('only'); the bundle is damaged.")
        files.append(WeightFile(part["file"], part["sha256"], str(part.get("prefix", "")), bundle, tuple(only)))
    return files


def load_weights(bundle: Bundle) -> Dict[str, Any]:
    """Tensors of the bundle, read with safetensors (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: Dict[str, Any] = {}
    for wf in weight_files(bundle.manifest):
        try:
            tensors = load_file(str(bundle.path / wf.relpath))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelBundleError(f"Model '{bundle.name}': the weights in {wf.file} cannot be read ({exc}); reinstall "
                                   "the model.") from exc
        prefix = wf.prefix
        for k, v in tensors.items():
            if wf.only and not k.startswith(wf.only):
                continue
            if prefix + k in state:
                raise ModelBundleError(f"Model '{bundle.name}': the tensor {prefix + k} is stored twice; the bundle is "
                                       "damaged: reinstall the model.")
            state[prefix + k] = v
    return state


# ---------------------------------------------------------------------------------------------- writing
def _publish(tmp: Path, folder: Path) -> None:
    """Make the staged bundle readable by everyone (mkdtemp makes it private) and move it into place."""
    import shutil

    tmp.chmod(0o755)
    for f in tmp.iterdir():
        f.chmod(0o644)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    if (folder.parent / INDEX).is_file():   # a release into an indexed models folder: its entry follows
        _update_index_entry(folder)


def _index_row(sub: Path) -> Dict[str, Any]:
    m = read_manifest(sub)
    return {"folder": sub.name, "name": m["name"], "version": m["version"], "role": m["role"],
            "manifest_sha256": sha256_file(sub / MANIFEST), "weights_sha256": m["weights"]["sha256"],
            "default": bool(m.get("default", False))}


def _update_index_entry(folder: Path) -> None:
    """Re-list one bundle in its folder's ``models.json`` (the other entries stay as they were, so a manifest
    edited by hand elsewhere in the folder is still caught)."""
    index = folder.parent / INDEX
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelBundleError(f"The list of models {index} is damaged ({exc}); reinstall BreastDLR's models.") from exc
    rows = [e for e in doc.get("models", []) if e.get("folder") != folder.name] + [_index_row(folder)]
    doc["models"] = sorted(rows, key=lambda e: e["folder"])
    index.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def save_bundle(
    folder: os.PathLike,
    model: Any,
    manifest: Dict[str, Any],
    model_card: str,
    half: bool = False,
) -> Bundle:
    """Write a bundle atomically (a temporary folder renamed at the end) and return it verified."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if half:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    save_file(state, str(tmp / WEIGHTS))
    m = dict(manifest)
    m["format"] = BUNDLE_FORMAT
    m["weights"] = {"file": WEIGHTS, "sha256": sha256_file(tmp / WEIGHTS),
                    "dtype": "float16" if half else str(next(iter(state.values())).dtype).replace("torch.", ""),
                    "bytes": (tmp / WEIGHTS).stat().st_size}
    m.setdefault("model_card", MODEL_CARD)
    (tmp / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    (tmp / MODEL_CARD).write_text(model_card, encoding="utf-8")
    _publish(tmp, folder)
    return open_bundle(folder)


def save_ensemble_bundle(folder: os.PathLike, members: Sequence[os.PathLike], manifest: Dict[str, Any],
                         model_card: str) -> Bundle:
    """Write an :class:`~BreastDLRLib.networks.classifiers.EnsembleNet` bundle from member bundles.

    Every member is a verified single-network bundle of one architecture, arguments and role.  Their weights
    files are copied byte for byte: the first member's becomes ``weights.safetensors`` (prefix ``members.0.``),
    the others ``member-K.safetensors`` listed in ``weights.parts``, so re-releasing a model as the first member
    of an ensemble leaves its file unchanged.  A member that takes its trunk from a sibling (a risk model written
    by ``--task both``) is written whole; :func:`share_weights` then stores the trunks once again.  ``manifest``
    gives everything but the architecture, arguments and weights, which are filled in here.  Atomic like
    :func:`save_bundle`; returns the verified bundle.
    """
    import shutil

    from safetensors.torch import save_file

    opened = [open_bundle(m) for m in members]
    if not opened:
        raise ModelBundleError("An ensemble needs at least one member bundle.")
    first = opened[0].manifest
    for b in opened:
        own_parts = [wf for wf in weight_files(b.manifest)[1:] if not wf.bundle]
        if b.manifest["architecture"] == "EnsembleNet" or own_parts or b.is_head:
            raise ModelBundleError(f"Model '{b.name}' is not a single network and cannot be an ensemble member.")
        if b.role != opened[0].role:
            raise ModelBundleError(f"Model '{b.name}' is a '{b.role}' model and '{opened[0].name}' a "
                                   f"'{opened[0].role}' model; the members of an ensemble must have one role.")
        if (b.manifest["architecture"], b.manifest["arguments"]) != (first["architecture"], first["arguments"]):
            raise ModelBundleError(f"Model '{b.name}' has another architecture or other arguments than "
                                   f"'{opened[0].name}'; the members of an ensemble must match.")
        same_crops = lambda inp: {k: v for k, v in inp.items() if k != "test_time_augmentation"}  # noqa: E731
        if same_crops(b.manifest["input"]) != same_crops(first["input"]):
            raise ModelBundleError(f"Model '{b.name}' takes another input than '{opened[0].name}'; the members of an "
                                   "ensemble must match.")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    files = []
    for k, b in enumerate(opened):
        name = WEIGHTS if k == 0 else f"member-{k}.safetensors"
        if weight_files(b.manifest)[1:]:            # the trunk lies in a sibling's file: written whole here
            save_file({n: t.contiguous() for n, t in load_weights(b).items()}, str(tmp / name))
        else:
            shutil.copyfile(b.path / weight_files(b.manifest)[0].file, tmp / name)
        files.append({"file": name, "sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size,
                      "prefix": f"members.{k}."})
    m = dict(manifest)
    m["format"] = BUNDLE_FORMAT
    m["architecture"] = "EnsembleNet"
    m["arguments"] = {"member_architecture": first["architecture"], "member_arguments": first["arguments"],
                      "n_members": len(opened)}
    m["weights"] = {**files[0], "dtype": first["weights"].get("dtype", "float16"), "parts": files[1:]}
    m.setdefault("model_card", MODEL_CARD)
    (tmp / MANIFEST).write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
    (tmp / MODEL_CARD).write_text(model_card, encoding="utf-8")
    _publish(tmp, folder)
    return open_bundle(folder)


def share_weights(main: os.PathLike, other: os.PathLike) -> Bundle:
    """Store the trunk of two networks trained together once: rewrite the bundle ``other`` so that it keeps only
    the tensors it does not share with its sibling ``main`` (the same parent folder) and takes the others from
    ``main``'s weights files, each pinned by its sha256 (``weights.parts`` with ``bundle``, ``only`` and, for an
    ensemble's members, ``prefix``).

    Shared are whole top-level modules of a stored file (``trunk.``, ``embedding.``, ...) whose every tensor is
    identical in both; two bundles that share none, or of other architectures or arguments, are refused.  Two
    ensembles whose members were trained in pairs (the malignancy and risk models of ``--task both``, several
    seeds) share every member's trunk.  The network ``other`` builds is unchanged, tensor for tensor.  Atomic like
    :func:`save_bundle`; returns the verified bundle."""
    from safetensors.torch import load_file, save_file

    a, b = open_bundle(main), open_bundle(other)
    if a.path.parent != b.path.parent:
        raise ModelBundleError(f"Model '{b.name}' can only share the weights of a model in its own folder.")
    if (a.manifest["architecture"], a.manifest["arguments"]) != (b.manifest["architecture"], b.manifest["arguments"]):
        raise ModelBundleError(f"Models '{a.name}' and '{b.name}' are not the same network; they share no trunk.")
    files_a, files_b = weight_files(a.manifest), weight_files(b.manifest)
    if any(wf.bundle for wf in files_a + files_b) or a.is_head or b.is_head:
        raise ModelBundleError("Only two networks stored in their own files can share their trunk.")
    tb = load_weights(b)
    parts, covered, names_a = [], set(), set()
    for wf in files_a:
        ta = load_file(str(a.path / wf.file))
        names_a |= {wf.prefix + k for k in ta}
        same = lambda k: (wf.prefix + k in tb and ta[k].dtype == tb[wf.prefix + k].dtype  # noqa: E731
                          and ta[k].shape == tb[wf.prefix + k].shape and bool((ta[k] == tb[wf.prefix + k]).all()))
        modules = sorted({k.split(".")[0] + "." for k in ta})
        shared = [m for m in modules if all(same(k) for k in ta if k.startswith(m))]
        if shared:
            part = {"bundle": a.path.name, "file": wf.file, "sha256": wf.sha256, "only": shared}
            parts.append({**part, "prefix": wf.prefix} if wf.prefix else part)
            covered |= {wf.prefix + k for k in ta if k.startswith(tuple(shared))}
    if names_a != set(tb):
        raise ModelBundleError(f"Models '{a.name}' and '{b.name}' do not hold the same tensors; they share no trunk.")
    if not parts:
        raise ModelBundleError(f"Models '{a.name}' and '{b.name}' have no module in common; they share no trunk.")
    own = {k: v.contiguous() for k, v in tb.items() if k not in covered}
    if not own:
        raise ModelBundleError(f"Model '{b.name}' is the same network as '{a.name}'; nothing is left of its own.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{b.path.name}-", dir=b.path.parent))
    save_file(own, str(tmp / WEIGHTS))
    m = dict(b.manifest)
    m["weights"] = {"file": WEIGHTS, "sha256": sha256_file(tmp / WEIGHTS), "dtype": b.manifest["weights"].get("dtype"),
                    "bytes": (tmp / WEIGHTS).stat().st_size, "parts": parts}
    m["uses_weights_of"] = a.name
    (tmp / MANIFEST).write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
    for f in b.path.iterdir():
        if f.is_file() and f.name != MANIFEST and f.name not in {wf.file for wf in files_b}:
            (tmp / f.name).write_bytes(f.read_bytes())
    _publish(tmp, b.path)
    return open_bundle(b.path)


def save_head_bundle(folder: os.PathLike, head_state: Dict[str, Any], manifest: Dict[str, Any], model_card: str) -> Bundle:
    """Write a fusion-head bundle: the head's fitted arrays as JSON (checksummed like weights)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    (tmp / "head.json").write_text(json.dumps(head_state) + "\n", encoding="utf-8")
    m = dict(manifest)
    m["format"] = BUNDLE_FORMAT
    m["weights"] = {"file": "head.json", "sha256": sha256_file(tmp / "head.json"), "dtype": "float64",
                    "bytes": (tmp / "head.json").stat().st_size}
    m.setdefault("model_card", MODEL_CARD)
    (tmp / MANIFEST).write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
    (tmp / MODEL_CARD).write_text(model_card, encoding="utf-8")
    _publish(tmp, folder)
    return open_bundle(folder)


def write_index(models_dir: os.PathLike) -> Path:
    """(Re)write ``models.json`` listing every bundle under ``models_dir`` with its checksums."""
    models_dir = Path(models_dir)
    entries = [_index_row(sub) for sub in sorted(p for p in models_dir.iterdir() if (p / MANIFEST).is_file())]
    out = models_dir / INDEX
    out.write_text(json.dumps({"format": "breastdlr-models/1", "models": entries}, indent=2) + "\n", encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------- discovery
def models_dirs(extra_dirs: Iterable[os.PathLike] = ()) -> List[Path]:
    from .resources import resources_dir

    dirs = [Path(d) for d in extra_dirs]
    user = os.environ.get("BREASTDLR_MODELS")
    if user:
        dirs.extend(Path(p) for p in user.split(os.pathsep) if p)
    res = resources_dir()
    if res is not None:
        dirs.append(res / "Models")
    return [d for d in dirs if d.is_dir()]


def list_bundles(extra_dirs: Iterable[os.PathLike] = ()) -> List[Dict[str, Any]]:
    """Every readable bundle in the known model folders: name, version, role, path, default, manifest."""
    found = []
    for d in models_dirs(extra_dirs):
        for sub in sorted(p for p in d.iterdir() if (p / MANIFEST).is_file()):
            try:
                m = read_manifest(sub)
            except ModelBundleError:
                continue
            found.append({"name": m["name"], "version": m["version"], "role": m["role"], "path": str(sub),
                          "default": bool(m.get("default", False)), "manifest": m})
    return found


def default_bundle(role: str, extra_dirs: Iterable[os.PathLike] = ()) -> Bundle:
    """The shipped default model for ``role`` (e.g. "segmenter"), verified."""
    cands = [b for b in list_bundles(extra_dirs) if b["role"] == role]
    if not cands:
        raise ModelBundleError(
            f"No {role} model is installed (BreastDLR looks in Resources/Models and in $BREASTDLR_MODELS); reinstall "
            "BreastDLR or give a model bundle (--model on the command line, 'Import model…' in Slicer)."
        )
    cands.sort(key=lambda b: (not b["default"],))
    return open_bundle(cands[0]["path"])
