"""The plain-Python helpers of the Slicer module (BreastDLR/BreastDLRSlicerLib) and BreastDLRLib.resources.

Real subprocesses for the process runner (stand-in workers written here, and the real worker on a bad
input), real bundles for model import, the real samples.json against the real sample files.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "BreastDLR"))

from BreastDLRSlicerLib import clinical_form, dependencies, models, process, samples  # noqa: E402


def stand_in(tmp: Path, body: str) -> list:
    """A command running a small Python script as the worker."""
    script = tmp / "stand_in_worker.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


# ----------------------------------------------------------------------------------------------- process
def test_monitor_relays_progress_ignores_noise_and_finishes(tmp_path):
    cmd = stand_in(tmp_path, """
        import json, sys
        print("a library talking")
        for i, stage in enumerate(["load", "segment", "classify"]):
            print(json.dumps({"type": "progress", "stage": stage, "fraction": i / 2, "message": stage + "…"}), flush=True)
        print(json.dumps({"type": "done", "findings": "/x/findings.json"}))
        sys.stderr.write("some warning\\n")
    """)
    seen = []
    proc = process.WorkerProcess({"input": "in.nrrd"}, tmp_path / "run", command=cmd)
    proc.start()
    outcome = process.WorkerMonitor(proc, lambda s, f, m: seen.append((s, f, m))).wait(poll_s=0.02, timeout_s=30)
    assert outcome.status == "done" and outcome.ok and outcome.findings == Path("/x/findings.json")
    assert seen == [("load", 0.0, "load…"), ("segment", 0.5, "segment…"), ("classify", 1.0, "classify…")]
    assert json.loads(proc.request_path.read_text()) == {"input": "in.nrrd"}
    assert "some warning" in proc.log_tail()


def test_error_and_crash_outcomes(tmp_path):
    cmd = stand_in(tmp_path, """
        import json, sys
        print(json.dumps({"type": "error", "message": "The input file is damaged."}))
        sys.exit(1)
    """)
    proc = process.WorkerProcess({}, tmp_path / "a", command=cmd)
    proc.start()
    out = process.WorkerMonitor(proc).wait(poll_s=0.02, timeout_s=30)
    assert (out.status, out.message, out.returncode) == ("error", "The input file is damaged.", 1)

    cmd = stand_in(tmp_path, """
        import sys
        sys.stderr.write("Segmentation fault in a library\\n")
        sys.exit(3)
    """)
    proc = process.WorkerProcess({}, tmp_path / "b", command=cmd)
    proc.start()
    out = process.WorkerMonitor(proc).wait(poll_s=0.02, timeout_s=30)
    assert out.status == "crashed" and "3" in out.message and str(proc.log_path) in out.message
    assert "Segmentation fault" in out.log


def test_done_line_with_nonzero_exit_is_not_success(tmp_path):
    cmd = stand_in(tmp_path, """
        import json, sys
        print(json.dumps({"type": "done", "findings": "/x/findings.json"}))
        sys.exit(2)
    """)
    proc = process.WorkerProcess({}, tmp_path / "c", command=cmd)
    proc.start()
    assert process.WorkerMonitor(proc).wait(poll_s=0.02, timeout_s=30).status == "crashed"


@pytest.mark.skipif(os.name != "posix", reason="process groups as on POSIX")
def test_cancel_kills_the_whole_process_tree(tmp_path):
    cmd = stand_in(tmp_path, """
        import json, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stubborn worker: only SIGKILL ends it
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(json.dumps({"type": "progress", "stage": "pids", "fraction": 0.1, "message": str(child.pid)}), flush=True)
        time.sleep(120)
    """)
    proc = process.WorkerProcess({}, tmp_path / "d", command=cmd)
    proc.start()
    pids = []
    monitor = process.WorkerMonitor(proc, lambda s, f, m: pids.append(int(m)))
    t0 = time.monotonic()
    while not pids and time.monotonic() - t0 < 20:
        monitor.poll()
        time.sleep(0.05)
    assert pids, "the stand-in worker did not start"
    worker_pid, child_pid = proc.process.pid, pids[0]
    assert alive(worker_pid) and alive(child_pid)
    t0 = time.monotonic()
    proc.cancel(grace_s=1.0)
    out = monitor.wait(poll_s=0.02, timeout_s=30)
    assert time.monotonic() - t0 < 10
    assert out.status == "cancelled"
    deadline = time.monotonic() + 5
    while alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker_pid) and not alive(child_pid)


def test_real_worker_through_the_runner(tmp_path):
    request = {"input": str(tmp_path / "absent.nrrd"), "out_dir": str(tmp_path / "out"), "device": "cpu"}
    proc = process.WorkerProcess(request, tmp_path / "e", command=process.worker_command(tmp_path / "e" / "request.json", sys.executable))
    proc.start()
    out = process.WorkerMonitor(proc).wait(poll_s=0.05, timeout_s=60)
    assert out.status == "error" and "absent.nrrd" in out.message
    assert not (tmp_path / "out").exists()


def test_command_and_environment():
    env = process.child_environment({"PYTHONPATH": "/elsewhere"}, root="/engine")
    assert env["PYTHONPATH"] == "/engine" + os.pathsep + "/elsewhere"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert process.engine_root() == REPO
    assert process.worker_command("r.json", "/py") == ["/py", "-m", "BreastDLRLib.worker", "r.json"]
    assert process.parse_line("plain text") == {"type": "log", "message": "plain text"}
    assert process.parse_line('[1, 2]')["type"] == "log"
    assert process.parse_line('{"type": "done", "findings": "f"}') == {"type": "done", "findings": "f"}


# ----------------------------------------------------------------------------------------------- dependencies
def test_runtime_constraints_pin_installed_versions(tmp_path):
    import numpy

    path = dependencies.write_runtime_constraints(["numpy", "surely-not-installed-pkg"], tmp_path / "c.txt")
    lines = dependencies.read_lines(path)
    assert lines == [f"numpy=={numpy.__version__}"]


def test_protected_and_required_packages():
    res = REPO / "BreastDLR" / "Resources"
    protected = {dependencies.canonical(n) for n in dependencies.read_lines(res / "constraints.txt")}
    assert {"numpy", "simpleitk", "vtk", "pydicom", "torch"} <= protected
    from packaging.requirements import Requirement

    required = [Requirement(r) for r in dependencies.read_lines(res / "requirements.txt")]
    names = {dependencies.canonical(r.name) for r in required}
    assert names and not (names & protected), "a package Slicer ships must not be installed by BreastDLR"
    assert all(str(r.specifier) and "==" not in str(r.specifier) for r in required)


def test_unsatisfied_checks_presence_and_versions():
    versions = {"a": "1.2.0", "b": "0.9"}
    missing = dependencies.unsatisfied(["a>=1.0", "b>=1.0", "c", "a<1.1"], version_of=versions.get)
    assert missing == ["b>=1.0", "c", "a<1.1"]


# ----------------------------------------------------------------------------------------------- samples
def test_samples_json_checksums_match_the_shipped_files():
    folder = REPO / "Resources" / "Samples"
    entries = samples.read_samples(folder)
    assert any(e["file"] == "synthetic_abvs.nrrd" for e in entries)
    for e in entries:
        args = samples.registration_args(e, folder)
        assert args is not None, e["name"]
        assert args["checksums"] == ["SHA256:" + samples.sha256_of(folder / e["file"])], \
            f"{e['file']} changed: refresh samples.json with BreastDLRSlicerLib.samples.update_samples_json"
        assert Path(args["uris"][0].replace("file://", "")).resolve() == (folder / e["file"]).resolve()
        assert args["nodeNames"] == [e["node_name"]] and args["sampleName"] == e["name"]


def test_sample_without_checksum_is_not_registered(tmp_path):
    (tmp_path / "s.nrrd").write_bytes(b"data")
    entry = {"name": "S", "file": "s.nrrd", "node_name": "S", "sha256": ""}
    assert samples.registration_args(entry, tmp_path) is None
    samples.update_samples_json(tmp_path, [entry])
    args = samples.registration_args(samples.read_samples(tmp_path)[0], tmp_path)
    import hashlib

    assert args["checksums"] == ["SHA256:" + hashlib.sha256(b"data").hexdigest()]


# ----------------------------------------------------------------------------------------------- models
def manifest(name, role, default=False, variables=()):
    return {"name": name, "version": "1.0", "role": role, "default": default, "path": f"/m/{name}",
            "manifest": {"clinical_variables": list(variables)}}


AGE = {"name": "age", "type": "number", "unit": "years", "min": 18, "max": 100, "missing": "impute_median", "median": 50}
FH = {"name": "family_history", "type": "bool", "missing": "indicator"}
COMP = {"name": "composition", "type": "category", "categories": ["fatty", "dense"], "missing": "refuse"}


def test_model_choices_and_clinical_variables():
    bundles = [
        {**manifest("seg", "segmenter", True)},
        {**manifest("fusion", "fusion", True, [AGE, FH])},
        {**manifest("other", "malignancy", False, [COMP, {**AGE, "unit": "y"}])},
        {**manifest("risk", "risk", True, [{**FH}])},
    ]
    choices = models.model_choices(bundles)
    assert choices[0] == ("Default models", "")
    assert [p for _, p in choices[1:]] == ["/m/fusion", "/m/risk", "/m/other"]  # defaults first, no segmenter
    assert [v["name"] for v in models.clinical_variables_for(bundles, "")] == ["age", "family_history"]
    other = models.clinical_variables_for(bundles, "/m/other")
    assert [v["name"] for v in other] == ["composition", "age"] and other[1]["unit"] == "y"
    assert models.model_paths_for("") is None and models.model_paths_for("/m/x") == ["/m/x"]


def make_bundle(folder: Path) -> Path:
    torch = pytest.importorskip("torch")
    from BreastDLRLib.bundles import save_bundle

    man = {"name": "tiny", "version": "0.0.1", "role": "malignancy", "architecture": "Tiny", "arguments": {},
           "input": {}, "labels": ["benign", "malignant"], "thresholds": {"malignancy": 0.5}, "provenance": {},
           "metrics": {}, "licence": "Apache-2.0", "intended_use": "Research use only."}
    save_bundle(folder, torch.nn.Linear(2, 1), man, "# tiny\n")
    return folder


def test_import_bundle_verifies_and_copies(tmp_path):
    from BreastDLRLib.errors import ModelBundleError

    src = make_bundle(tmp_path / "src" / "tiny")
    dest_dir = tmp_path / "user" / "Models"
    copied = models.import_bundle(src, dest_dir)
    assert copied == dest_dir / "tiny"
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in src.iterdir())
    assert (copied / "weights.safetensors").read_bytes() == (src / "weights.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        models.import_bundle(src, dest_dir)
    assert models.import_bundle(src, dest_dir, overwrite=True) == copied

    bad = make_bundle(tmp_path / "bad" / "broken")
    data = bytearray((bad / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelBundleError):
        models.import_bundle(bad, dest_dir)
    assert sorted(p.name for p in dest_dir.iterdir()) == ["tiny"]  # nothing half-copied


# ----------------------------------------------------------------------------------------------- clinical form
def test_clinical_form_spec_and_values():
    spec = clinical_form.form_spec([AGE, FH, COMP])
    age, fh, comp = spec
    assert (age["type"], age["unit"], age["min"], age["max"], age["required"]) == ("number", "years", 18.0, 100.0, False)
    assert fh["choices"] == ["yes", "no"] and comp["choices"] == ["fatty", "dense"] and comp["required"]
    lo, hi = clinical_form.spin_limits(age, 1.0)
    assert (lo, hi) == (17.0, 100.0)  # one step below the minimum reads "unknown"
    assert clinical_form.value_from_widget_state(age, number=lo, step=1.0) is None
    assert clinical_form.value_from_widget_state(age, number=52.0, step=1.0) == 52.0
    assert [clinical_form.value_from_widget_state(fh, index=i) for i in (0, 1, 2)] == [None, True, False]
    assert [clinical_form.value_from_widget_state(comp, index=i) for i in (0, 1, 2)] == [None, "fatty", "dense"]
    assert clinical_form.step_for({"min": 0, "max": 5}) == 0.1 and clinical_form.step_for(age) == 1.0


# ----------------------------------------------------------------------------------------------- resources
def test_resources_dir_and_sample_path(tmp_path, monkeypatch):
    from BreastDLRLib import resources
    from BreastDLRLib.errors import InputError

    monkeypatch.delenv(resources.ENV_VAR, raising=False)
    assert resources.resources_dir() == REPO / "Resources"
    assert resources.sample_path("synthetic_abvs.nrrd") == REPO / "Resources" / "Samples" / "synthetic_abvs.nrrd"
    (tmp_path / "Samples").mkdir()
    (tmp_path / "Samples" / "x.nrrd").write_bytes(b"1")
    monkeypatch.setenv(resources.ENV_VAR, str(tmp_path))
    assert resources.resources_dir() == tmp_path
    assert resources.sample_path("x.nrrd") == tmp_path / "Samples" / "x.nrrd"
    with pytest.raises(InputError, match="not installed"):
        resources.sample_path("absent.nrrd")
