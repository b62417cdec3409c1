"""The analysis as a separate process, for Slicer (run by PythonSlicer) or any Python::

    python -m BreastDLRLib.worker REQUEST.json

``REQUEST.json``: ``{"input": path, "out_dir": path, "clinical": {...} | null, "birads": "4a" | null,
"model_paths": [...] | null, "device": "auto" | "cpu" | "cuda", "spacing": null | mm | [si, sj, sk]}``.

Standard output carries only JSON lines, one object each:
``{"type": "progress", "stage", "fraction", "message"}`` while working, then either
``{"type": "done", "findings": "<out_dir>/findings.json"}`` (exit 0) or
``{"type": "error", "message": "<one line a clinician understands>"}`` (exit 1).
Anything else the libraries print goes to standard error (file descriptor 1 is redirected there), so the
stream stays parseable.  SIGTERM (the module's Cancel) stops the work at once: files and folders the run
created in ``out_dir`` are removed, so nothing is left that looks like a result.

No Slicer, no Qt: this runs in plain Python.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TextIO

from .errors import BreastDLRError

REQUIRED = ("input", "out_dir")
DEVICES = ("auto", "cpu", "cuda")


class Terminated(BaseException):
    """Raised from the SIGTERM handler; a BaseException so that ``except Exception`` in the pipeline does not
    swallow it."""


def one_line(text: str, limit: int = 600) -> str:
    """Collapse whitespace and newlines; cut very long messages."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


class Emitter:
    """Writes the JSON lines to the real standard output."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def send(self, obj: Dict[str, Any]) -> None:
        self.stream.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")
        self.stream.flush()

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        f = float(fraction)
        f = 0.0 if f != f else min(1.0, max(0.0, f))
        self.send({"type": "progress", "stage": str(stage), "fraction": f, "message": one_line(message)})

    def error(self, message: str) -> None:
        self.send({"type": "error", "message": one_line(message)})


def read_request(path: os.PathLike) -> Dict[str, Any]:
    """The request dict, checked; raises :class:`BreastDLRError` with a readable message."""
    try:
        request = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BreastDLRError(f"The analysis request could not be read ({exc}); start the analysis again.") from exc
    if not isinstance(request, dict):
        raise BreastDLRError("The analysis request is not a JSON object; start the analysis again.")
    missing = [k for k in REQUIRED if not request.get(k)]
    if missing:
        raise BreastDLRError(f"The analysis request lacks {', '.join(missing)}; start the analysis again.")
    device = request.get("device") or "auto"
    if device not in DEVICES:
        raise BreastDLRError(f"Unknown device '{device}'; choose auto, cpu or cuda.")
    request["device"] = device
    return request


def check_input(path: Path) -> None:
    """Refuse an input that cannot be an image before loading any model."""
    from .errors import InputError

    if not path.exists():
        raise InputError(f"The input file '{path.name}' does not exist; check the path or export the image again.")
    if path.is_dir():
        if not any(path.iterdir()):
            raise InputError(f"The input folder '{path.name}' is empty; choose the folder of a DICOM series.")
        return
    if path.stat().st_size == 0:
        raise InputError(f"The input file '{path.name}' is empty (0 bytes); export the image again.")


def _snapshot(folder: Path) -> Optional[set]:
    return set(os.listdir(folder)) if folder.is_dir() else None


def remove_new_entries(folder: Path, before: Optional[set]) -> None:
    """Remove what this run created in ``folder`` (the folder itself if it did not exist)."""
    if not folder.exists():
        return
    if before is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for name in set(os.listdir(folder)) - before:
        p = folder / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except OSError:
                pass


def _redirect_stdout() -> TextIO:
    """Keep a private handle on the real stdout for JSON, and send fd 1 (and sys.stdout) to stderr."""
    sys.stdout.flush()
    real = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return real


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated()


def run(request: Dict[str, Any], emit: Emitter, analyze: Optional[Callable[..., Dict[str, Any]]] = None) -> Path:
    """Run one analysis; returns the path of findings.json.  ``analyze`` defaults to the pipeline's
    ``analyze_file`` (tests pass a stand-in)."""
    in_path = Path(request["input"]).expanduser()
    out_dir = Path(request["out_dir"]).expanduser()
    check_input(in_path)  # before importing torch and loading models
    if analyze is None:
        from .pipeline import analyze_file as analyze
    analyze(
        str(in_path),
        str(out_dir),
        clinical=request.get("clinical"),
        birads=request.get("birads"),
        model_paths=request.get("model_paths"),
        device=request.get("device", "auto"),
        spacing=request.get("spacing"),
        outline_path=request.get("outline"),
        outline_source=request.get("outline_source") or "reader",
        progress=emit.progress,
        cancel=None,
    )
    findings = out_dir / "findings.json"
    if not findings.is_file():
        raise BreastDLRError("The analysis finished without writing its findings; run it again and report this if it repeats.")
    return findings


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    emit = Emitter(_redirect_stdout())
    if len(args) != 1:
        emit.error("Usage: python -m BreastDLRLib.worker REQUEST.json")
        return 1
    signal.signal(signal.SIGTERM, _on_sigterm)
    out_dir: Optional[Path] = None
    before: Optional[set] = None

    def fail(message: str) -> int:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second Cancel must not interrupt the clean-up
        if out_dir is not None:
            remove_new_entries(out_dir, before)
        emit.error(message)
        return 1

    try:
        request = read_request(args[0])
        out_dir = Path(request["out_dir"]).expanduser()
        before = _snapshot(out_dir)
        findings = run(request, emit)
    except (Terminated, KeyboardInterrupt):
        return fail("Cancelled by the user; no results were written.")
    except BreastDLRError as exc:  # includes Cancelled, InputError, ModelBundleError, ClinicalInputError
        return fail(str(exc))
    except MemoryError:
        return fail("The computer ran out of memory; close other programs, choose the CPU device or a smaller volume.")
    except Exception as exc:  # a bug: one readable line on stdout, the traceback on stderr
        traceback.print_exc(file=sys.stderr)
        return fail(f"BreastDLR stopped on an internal error ({type(exc).__name__}: {exc}). "
                    "Please report it with the worker log.")
    emit.send({"type": "done", "findings": str(findings)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
