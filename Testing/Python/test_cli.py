"""End-to-end runs of the ``breastdlr`` command on real and synthetic files (small real bundles, see conftest)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from BreastDLRLib.cli import main
from BreastDLRLib.io import read_volume, write_volume
from BreastDLRLib.synthetic import make_image, make_volume


def models(tiny_bundles):
    out = []
    for p in tiny_bundles.values():
        out += ["--model", str(p)]
    return out


def run_cli(*args):
    """The installed console entry point in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "BreastDLRLib.cli", *map(str, args)], capture_output=True, text=True)


def test_segment_png_with_spacing(tiny_bundles, tmp_path, shared_data):
    img = shared_data / "breast-us" / "breastlesions" / "images" / "breast_025.png"
    out = tmp_path / "seg"
    rc = main(["segment", str(img), "--out", str(out), "--spacing", "0.109768", "--device", "cpu", "--quiet",
               "--model", str(tiny_bundles["segmenter"])])
    assert rc == 0
    doc = json.loads((out / "lesions.json").read_text())
    assert doc["input"]["spacing_mm"][:2] == [0.109768, 0.109768] and doc["input"]["spacing_source"] == "user"
    w, h = Image.open(img).size
    les = doc["lesions"][0]["measurements"]
    assert les["extent_mm"]["lateral"] == pytest.approx(w * 0.109768)  # all-lesion test segmenter
    assert np.asarray(Image.open(out / "labels.png")).shape == (h, w)


def test_segment_dicom_uses_ultrasound_regions(tiny_bundles, tmp_path, shared_data):
    out = tmp_path / "dcm"
    rc = main(["segment", str(shared_data / "us-dicom" / "OBXXXX1A.dcm"), "--out", str(out), "--device", "cpu",
               "--quiet", "--model", str(tiny_bundles["segmenter"])])
    assert rc == 0
    doc = json.loads((out / "lesions.json").read_text())
    assert doc["input"]["spacing_source"] == "ultrasound_regions"
    assert doc["input"]["spacing_mm"][0] == pytest.approx(0.2623, abs=1e-3)  # PhysicalDeltaX 0.0262 cm (rounded in the README)
    assert read_volume(out / "labels.nrrd").shape == (1, 600, 800)


def test_analyze_volume_end_to_end(tiny_bundles, tmp_path):
    src = tmp_path / "vol.nrrd"
    write_volume(make_volume(seed=5, shape_kji=(16, 64, 80), n_lesions=1).image, src)
    out = tmp_path / "an"
    rc = main(["analyze", str(src), "--out", str(out), "--birads", "4a", "--device", "cpu", "--quiet", *models(tiny_bundles)])
    assert rc == 0
    f = json.loads((out / "findings.json").read_text())
    assert f["birads"] == "4a" and len(f["lesions"]) == 1
    assert f["lesions"][0]["recommendation"]["action"] in ("downgrade", "keep", "upgrade")
    heat = read_volume(out / f["outputs"]["heatmap"])
    assert heat.same_geometry(read_volume(src))


def test_analyze_with_a_reader_outline(tiny_bundles, tmp_path):
    """The reader's two drawn regions become the lesions (largest first), whatever the segmenter would find;
    the shipped morphology models were fitted on another image model's scores, so they are not applied to the
    test bundles' and the findings say so."""
    img, mask = tmp_path / "img.png", tmp_path / "outline.png"
    Image.fromarray(make_image(seed=2).image.array[0]).save(img)
    drawn = np.zeros(read_volume(img).shape[1:], np.uint8)
    drawn[10:30, 10:40] = 255
    drawn[50:58, 60:66] = 255
    Image.fromarray(drawn).save(mask)
    out = tmp_path / "o"
    rc = main(["analyze", str(img), "--outline", str(mask), "--out", str(out), "--device", "cpu", "--quiet", *models(tiny_bundles)])
    assert rc == 0
    f = json.loads((out / "findings.json").read_text())
    les = f["lesions"]
    assert [l["outline"] for l in les] == ["reader", "reader"] and les[0]["measurements"]["voxels"] == 600
    assert les[1]["measurements"]["voxels"] == 48
    assert all("malignancy_morphology" not in l["probabilities"] for l in les)
    assert any("was fitted on the scores of breastdlr-malignancy-2d" in n for n in f["clinical_notes"])
    labels = np.asarray(Image.open(out / "labels.png"))
    assert ((labels > 0) == (drawn > 0)).all()
    bad = np.zeros((5, 5), np.uint8)
    bad[1:3, 1:3] = 255
    Image.fromarray(bad).save(mask)
    r = run_cli("analyze", img, "--outline", mask, "--out", tmp_path / "bad", *models(tiny_bundles))
    assert r.returncode == 2 and "made for this image" in r.stderr and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("content,name", [(b"", "empty.nrrd"), (b"\x00garbage" * 50, "junk.nrrd"), (None, "missing.png")])
def test_bad_input_one_line_no_files(tiny_bundles, tmp_path, content, name):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "out"
    r = run_cli("segment", path, "--out", out, "--device", "cpu", "--quiet", "--model", tiny_bundles["segmenter"])
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("breastdlr: error:") and "Traceback" not in r.stderr
    assert name in lines[0]
    assert not out.exists()


def test_4d_image_refused(tiny_bundles, tmp_path):
    import SimpleITK as sitk

    img = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((3, 16, 16), np.uint8))] * 2)  # a real 4D image
    p = tmp_path / "cine4d.nii.gz"
    sitk.WriteImage(img, str(p))
    r = run_cli("segment", p, "--out", tmp_path / "o", "--device", "cpu", "--model", tiny_bundles["segmenter"])
    assert r.returncode == 2 and "4 dimensions" in r.stderr and not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(tiny_bundles, tmp_path):
    p = tmp_path / "junk.nrrd"
    p.write_bytes(b"\x01" * 100)
    r = run_cli("--debug", "segment", p, "--out", tmp_path / "o", "--model", tiny_bundles["segmenter"])
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_tampered_model_refused_by_the_cli(tiny_bundles, tmp_path):
    import shutil

    bad = tmp_path / "seg"
    shutil.copytree(tiny_bundles["segmenter"], bad)
    w = bad / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 1
    w.write_bytes(bytes(data))
    img = tmp_path / "x.png"
    Image.fromarray(make_image(seed=1).image.array[0]).save(img)
    r = run_cli("segment", img, "--out", tmp_path / "o", "--model", bad)
    assert r.returncode == 2 and "checksum" in r.stderr and not (tmp_path / "o").exists()


def test_predict_manifest_with_a_broken_row(tiny_bundles, tmp_path, shared_data):
    src = shared_data / "breast-us"
    with open(src / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["dataset"] == "breastlesions"][:3]
    folder = tmp_path / "m"
    (folder / "images").mkdir(parents=True)
    for r in rows:
        (folder / "images" / Path(r["image"]).name).write_bytes((src / r["image"]).read_bytes())
        r["image"] = "images/" + Path(r["image"]).name
        r["mask"] = ""
    broken = dict(rows[0], case_id="broken_1", image="images/broken.png")
    (folder / "images" / "broken.png").write_bytes(b"not a png")
    rows.insert(1, broken)
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "pred.csv"
    rc = main(["predict", str(folder / "manifest.csv"), "--out", str(out), "--masks-out", str(tmp_path / "masks"),
               "--device", "cpu", "--quiet", *models(tiny_bundles)])
    assert rc == 0
    with open(out, newline="") as f:
        pred = list(csv.DictReader(f))
    assert [p["case_id"] for p in pred] == [r["case_id"] for r in rows]
    bad = pred[1]
    assert bad["error"] and "broken.png" in bad["error"] and bad["probability_malignant"] == ""
    for p, r in zip(pred, rows):
        if p is bad:
            continue
        assert p["error"] == "" and 0 <= float(p["probability_malignant"]) <= 1 and 0 <= float(p["probability_high_risk"]) <= 1
        assert p["lesion_found"] == "true"
        if r["birads"] == "4a":
            assert p["recommendation"].split(":")[0] in ("downgrade", "keep", "upgrade")
        else:
            assert p["recommendation"] == ""
        m = np.asarray(Image.open(tmp_path / "masks" / f"{p['case_id']}_mask.png"))
        assert m.shape == (int(r["height"]), int(r["width"])) and set(np.unique(m)) <= {0, 255}
    assert not (tmp_path / "masks" / "broken_1_mask.png").exists()


def test_models_lists_extra_dir(tiny_bundles, capsys):
    assert main(["models", "--dir", str(Path(tiny_bundles["segmenter"]).parent)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {"segmenter", "malignancy", "risk"} <= {m["role"] for m in listed}


def test_bench_takes_bundles_by_their_roles(tiny_bundles, capsys):
    """``bench --model`` names bundles whose manifests give their roles: a classifier is used as a classifier (it
    was once taken for the segmenter and crashed), and the segmenter named is the one timed alone."""
    assert main(["bench", "--json", "--quiet", "--slices", "4", "--size", "64", "--no-full-size",
                 "--model", str(tiny_bundles["malignancy"]), "--model", str(tiny_bundles["segmenter"])]) == 0
    res = json.loads(capsys.readouterr().out)
    assert "analyze_error" not in res and res["volume_shape_kji"] == [4, 64, 64]
    assert res["analyze_image_seconds"] > 0
