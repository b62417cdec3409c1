"""Run the BreastDLR worker (``python -m BreastDLRLib.worker``) as a child process and follow it.

No Qt and no Slicer here: a reader thread puts the worker's JSON lines in a queue; the module drains it from a
QTimer (:meth:`WorkerMonitor.poll`) or waits for it (:meth:`WorkerMonitor.wait`).  Cancel ends the whole
process tree (the worker and anything it started): a new session/process group at start, then
``os.killpg`` on POSIX, ``taskkill /T`` on Windows.  The process class is injectable (the Logic's
``processFactory``), so tests can run a stand-in worker.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

try:  # inside Slicer
    from slicer.i18n import tr as _
except ImportError:  # plain Python (tests, PythonSlicer)
    def _(text: str) -> str:
        return text

ProgressCallback = Callable[[str, float, str], None]


# --------------------------------------------------------------------------------------------- command
def python_executable() -> str:
    """Slicer's own Python (PythonSlicer) when it is on PATH (inside Slicer), else this interpreter;
    ``BREASTDLR_PYTHON`` overrides."""
    return os.environ.get("BREASTDLR_PYTHON") or shutil.which("PythonSlicer") or sys.executable


def engine_root() -> Path:
    """The folder holding the ``BreastDLRLib`` package."""
    import BreastDLRLib

    return Path(BreastDLRLib.__file__).resolve().parent.parent


def worker_command(request_path: os.PathLike, python: Optional[str] = None) -> List[str]:
    return [python or python_executable(), "-m", "BreastDLRLib.worker", str(request_path)]


def child_environment(base: Optional[Dict[str, str]] = None, root: Optional[os.PathLike] = None) -> Dict[str, str]:
    """The environment of the worker: the engine importable, unbuffered UTF-8 output."""
    env = dict(os.environ if base is None else base)
    root_s = str(root if root is not None else engine_root())
    env["PYTHONPATH"] = root_s + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def parse_line(line: str) -> Dict[str, Any]:
    """A worker line as a message dict; anything that is not a JSON object with a type becomes a log line."""
    text = line.strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return {"type": "log", "message": text}
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        return {"type": "log", "message": text}
    return obj


# --------------------------------------------------------------------------------------------- killing
def kill_process_tree(proc: Optional[subprocess.Popen], grace_s: float = 5.0) -> None:
    """End ``proc`` and its descendants: SIGTERM to its process group, SIGKILL after ``grace_s``
    (POSIX); ``taskkill /T /F`` on Windows.  Safe to call on a finished process."""
    if proc is None:
        return
    if os.name == "nt":
        if proc.poll() is None:
            subprocess.run(["taskkill", "/PID", str(proc.pid), "/T", "/F"], capture_output=True, check=False)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
        return
    pgid = proc.pid  # the worker leads its own session (start_new_session=True)
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:  # whatever is left of the group (children that ignored SIGTERM, or the worker itself)
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass


# --------------------------------------------------------------------------------------------- process
class WorkerProcess:
    """One run of the worker: writes ``request.json`` and ``worker.log`` (stderr) in ``work_dir``."""

    def __init__(self, request: Dict[str, Any], work_dir: os.PathLike, command: Optional[List[str]] = None,
                 env: Optional[Dict[str, str]] = None) -> None:
        self.request = dict(request)
        self.work_dir = Path(work_dir)
        self.request_path = self.work_dir / "request.json"
        self.log_path = self.work_dir / "worker.log"
        self.messages: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self.process: Optional[subprocess.Popen] = None
        self.cancelled = False
        self._command = command
        self._env = env
        self._reader: Optional[threading.Thread] = None

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.request_path.write_text(json.dumps(self.request, indent=1), encoding="utf-8")
        cmd = list(self._command) if self._command else worker_command(self.request_path)
        kwargs: Dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        log = open(self.log_path, "w", encoding="utf-8")
        try:
            self.process = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                env=self._env if self._env is not None else child_environment(), cwd=str(self.work_dir),
                text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
            )
        finally:
            log.close()  # the child holds its own handle
        self._reader = threading.Thread(target=self._read, name="BreastDLR worker reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        proc = self.process
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            if line.strip():
                self.messages.put(parse_line(line))
        self.messages.put({"type": "exit", "returncode": proc.wait()})

    def drain(self) -> List[Dict[str, Any]]:
        """Every message received since the last call (never blocks)."""
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cancel(self, grace_s: float = 5.0) -> None:
        self.cancelled = True
        kill_process_tree(self.process, grace_s)

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except OSError:
            return ""


# --------------------------------------------------------------------------------------------- outcome
@dataclass
class Outcome:
    """How a run ended: ``status`` is done, error, cancelled or crashed."""

    status: str
    message: str = ""
    findings: Optional[Path] = None
    returncode: Optional[int] = None
    log: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "done"


class WorkerMonitor:
    """Follows a started worker: relays progress, returns an :class:`Outcome` once it has exited."""

    def __init__(self, process: Any, progress: Optional[ProgressCallback] = None) -> None:
        self.process = process
        self.progress = progress
        self.findings: Optional[str] = None
        self.error: Optional[str] = None
        self.last: Dict[str, Any] = {"stage": "", "fraction": 0.0, "message": ""}
        self.outcome: Optional[Outcome] = None

    def _handle(self, msg: Dict[str, Any]) -> Optional[Outcome]:
        kind = msg.get("type")
        if kind == "progress":
            try:
                fraction = min(1.0, max(0.0, float(msg.get("fraction", 0.0))))
            except (TypeError, ValueError):
                fraction = self.last["fraction"]
            self.last = {"stage": str(msg.get("stage", "")), "fraction": fraction, "message": str(msg.get("message", ""))}
            if self.progress is not None:
                self.progress(self.last["stage"], fraction, self.last["message"])
        elif kind == "done":
            self.findings = msg.get("findings")
        elif kind == "error":
            self.error = str(msg.get("message", "")) or _("The analysis failed without a message.")
        elif kind == "exit":
            return self._finish(msg.get("returncode"))
        return None

    def _finish(self, returncode: Optional[int]) -> Outcome:
        log = self.process.log_tail() if hasattr(self.process, "log_tail") else ""
        if getattr(self.process, "cancelled", False):
            return Outcome("cancelled", _("Cancelled; no results were loaded."), None, returncode, log)
        if self.findings and returncode == 0:
            return Outcome("done", "", Path(self.findings), returncode, log)
        if self.error:
            return Outcome("error", self.error, None, returncode, log)
        where = getattr(self.process, "log_path", None)
        return Outcome(
            "crashed",
            _("The analysis stopped unexpectedly (exit code {code}). Details are in {log}.").format(code=returncode, log=where),
            None, returncode, log,
        )

    def poll(self) -> Optional[Outcome]:
        """Handle what arrived; the outcome once the worker has exited, else None."""
        if self.outcome is None:
            for msg in self.process.drain():
                out = self._handle(msg)
                if out is not None:
                    self.outcome = out
                    break
        return self.outcome

    def wait(self, idle: Optional[Callable[[], None]] = None, poll_s: float = 0.1,
             timeout_s: Optional[float] = None) -> Outcome:
        """Block until the worker exits, calling ``idle`` (e.g. ``slicer.app.processEvents``) between polls."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            out = self.poll()
            if out is not None:
                return out
            if deadline is not None and time.monotonic() > deadline:
                deadline = None
                self.cancel()  # then wait for the exit message of the killed process
            if idle is not None:
                idle()
            time.sleep(poll_s)

    def cancel(self) -> None:
        self.process.cancel()


__all__ = ["Outcome", "WorkerMonitor", "WorkerProcess", "child_environment", "engine_root", "kill_process_tree",
           "parse_line", "python_executable", "worker_command"]
