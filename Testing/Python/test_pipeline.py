"""The pipeline and its writers on small real bundles whose segmenter has a known answer (see conftest)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from BreastDLRLib.errors import Cancelled, ClinicalInputError, InputError
from BreastDLRLib.io import read_volume, write_volume
from BreastDLRLib.outputs import validate_findings, write_analysis, write_segmentation
from BreastDLRLib.pipeline import Pipeline, analyze_file
from BreastDLRLib.synthetic import make_image, make_volume
from BreastDLRLib.volume import Volume
from conftest import make_tiny_bundles


@pytest.fixture(scope="module")
def pipe(tiny_bundles):
    return Pipeline.from_paths([str(p) for p in tiny_bundles.values()], device="cpu")


@pytest.fixture(scope="module")
def empty_pipe(tmp_path_factory, tiny_bundles):
    none = make_tiny_bundles(tmp_path_factory.mktemp("none"), seg_bias=-5.0)
    return Pipeline.from_paths([str(none["segmenter"]), str(tiny_bundles["malignancy"]), str(tiny_bundles["risk"])], device="cpu")


def oblique_volume(shape=(6, 40, 48)) -> Volume:
    th = np.deg2rad(20)
    d = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    rng = np.random.default_rng(0)
    return Volume(rng.integers(0, 255, shape).astype(np.uint8), spacing=(0.2, 0.3, 0.7), origin=(5.0, -3.0, 12.0),
                  direction=d, metadata={"spacing_source": "file", "source": "oblique.nrrd"})


def test_all_lesion_segmenter_on_an_image(pipe, tmp_path):
    case = make_image(seed=2)
    res = pipe.analyze(case.image, birads="4A")
    assert len(res.lesions) == 1
    les = res.lesions[0].lesion
    assert les.voxels == case.image.array.size and les.touches_edge
    p = res.lesions[0].probabilities
    assert 0 <= p["malignancy"] <= 1 and 0 <= p["high_risk"] <= 1
    rec = res.lesions[0].recommendation
    expected = {(False, False): "downgrade", (True, True): "upgrade"}.get(
        (p["high_risk"] >= 0.5, p["malignancy"] >= 0.5), "keep")
    assert rec.action == expected and rec.birads_in == "4a"
    assert res.heatmap.shape == case.image.shape and 0 <= res.heatmap.array.min() and res.heatmap.array.max() <= 1
    assert res.heatmap.array.max() > 0  # Grad-CAM painted something inside the crop
    findings = write_analysis(tmp_path / "out", res)
    validate_findings(findings)
    out = tmp_path / "out"
    for name in ("findings.json", "lesions.json", "labels.nrrd", "labels.png", "heatmap.nrrd", "report.html", "preview.png"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "findings.json").read_text())
    assert on_disk == findings and on_disk["birads"] == "4a"
    assert "Research use only" in (out / "report.html").read_text()
    labels = read_volume(out / "labels.nrrd")
    assert labels.same_geometry(case.image) and labels.array.max() == 1
    heat = read_volume(out / "heatmap.nrrd")
    np.testing.assert_allclose(heat.array, res.heatmap.array, atol=1e-6)


def test_no_lesion(empty_pipe, tmp_path):
    case = make_image(seed=3)
    res = empty_pipe.analyze(case.image, birads="4a")
    assert res.lesions == []
    findings = write_analysis(tmp_path / "o", res)
    assert findings["lesions"] == []
    assert "No lesion found" in (tmp_path / "o" / "report.html").read_text()
    assert read_volume(tmp_path / "o" / "labels.nrrd").array.max() == 0


def test_oblique_volume_keeps_geometry(pipe, tmp_path):
    vol = oblique_volume()
    res = pipe.segment(vol)
    doc = write_segmentation(tmp_path / "seg", res)
    labels = read_volume(tmp_path / "seg" / "labels.nrrd")
    assert labels.same_geometry(vol)
    centre = doc["lesions"][0]["centre_ras"]
    k, j, i = [(n - 1) / 2 for n in vol.shape]
    np.testing.assert_allclose(centre, vol.array_index_to_ras((k, j, i)), atol=1e-6)


def test_three_planes_used_for_volumes_with_a_three_plane_model(tmp_path, tiny_bundles):
    import torch

    from BreastDLRLib.bundles import save_bundle
    from BreastDLRLib.networks.classifiers import build_classifier

    torch.manual_seed(0)
    net = build_classifier("ThreePlaneFusion", backbone="resnet18")
    b = save_bundle(tmp_path / "abvs", net, {
        "name": "t3", "version": "0", "role": "abvs-malignancy", "architecture": "ThreePlaneFusion",
        "arguments": {"backbone": "resnet18"}, "input": {"size": [48, 48], "frames": 3}, "labels": ["b", "m"],
        "thresholds": {"probability": 0.5}, "provenance": {}, "metrics": {}, "licence": "x", "intended_use": "tests"}, "c")
    p = Pipeline.from_paths([str(tiny_bundles["segmenter"]), str(tiny_bundles["malignancy"]), str(b.path)], device="cpu")
    case = make_volume(seed=1, shape_kji=(12, 48, 64), n_lesions=1)
    res = p.analyze(case.image)
    lr = res.lesions[0]
    assert set(lr.crops) == {"transverse", "sagittal", "coronal"}
    assert len(lr.frame_probabilities["malignancy"]) == 3
    assert set(lr.cams) == {"transverse", "sagittal", "coronal"}
    # the heatmap is painted on the three slabs through the lesion centre, nowhere else
    nz = np.argwhere(res.heatmap.array > 0)
    k, j, i = (int(np.floor(c + 0.5)) for c in lr.lesion.centre_kji)
    assert np.all((nz[:, 0] == k) | (nz[:, 1] == j) | (nz[:, 2] == i))
    # a 2D image with the same models falls back to the 2D model
    img = p.analyze(make_image(seed=5).image)
    assert set(img.lesions[0].crops) == {"transverse"}


def test_clinical_values_without_a_clinical_model_are_refused(pipe):
    with pytest.raises(ClinicalInputError, match="age"):
        pipe.analyze(make_image(seed=1).image, clinical={"age": "52"})


def test_bad_birads_is_refused(pipe):
    with pytest.raises(ClinicalInputError):
        pipe.analyze(make_image(seed=1).image, birads="7x")


def test_cancel_writes_nothing(tiny_bundles, tmp_path):
    src = tmp_path / "in.nrrd"
    write_volume(make_volume(seed=2, shape_kji=(20, 64, 64), n_lesions=1).image, src)
    out = tmp_path / "cancelled"
    with pytest.raises(Cancelled):
        analyze_file(src, out, model_paths=[str(p) for p in tiny_bundles.values()], device="cpu", cancel=lambda: True)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_corrupt_input_writes_nothing(tiny_bundles, tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"DICM" * 40)
    out = tmp_path / "o"
    with pytest.raises(InputError):
        analyze_file(bad, out, model_paths=[str(p) for p in tiny_bundles.values()], device="cpu")
    assert not out.exists()


def test_nan_volume_refused(pipe):
    a = np.zeros((2, 32, 32), np.float32)
    a[0, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        pipe.segment(Volume(a))


def test_progress_is_reported_in_order(pipe):
    seen = []
    pipe.analyze(make_volume(seed=4, shape_kji=(10, 48, 48), n_lesions=1).image,
                 progress=lambda s, f, m="": seen.append((s, f)))
    stages = [s for s, _ in seen]
    assert stages[0] == "segment" and stages[-1] == "classify"
    fr = [f for _, f in seen]
    assert fr == sorted(fr) and fr[-1] == 1.0


def test_cuda_is_refused_without_a_gpu(tiny_bundles):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: see test_gpu_agrees_with_cpu")
    with pytest.raises(InputError, match="no CUDA GPU"):
        Pipeline.from_paths([str(tiny_bundles["segmenter"])], device="cuda")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (none on the project's CI)")
def test_gpu_agrees_with_cpu(tiny_bundles):
    """Tolerance: probabilities within 1e-3 (fp32 on both; bf16 is used only on the CPU and off here)."""
    case = make_image(seed=9)
    paths = [str(p) for p in tiny_bundles.values()]
    cpu = Pipeline.from_paths(paths, device="cpu", bf16=False).analyze(case.image, explain=False)
    gpu = Pipeline.from_paths(paths, device="cuda", bf16=False).analyze(case.image, explain=False)
    for a, b in zip(cpu.lesions, gpu.lesions):
        for k in a.probabilities:
            assert abs(a.probabilities[k] - b.probabilities[k]) < 1e-3


def test_a_rerun_leaves_no_stale_results_and_keeps_other_files(pipe, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "lesion7_transverse_crop.png").write_bytes(b"old run")
    write_analysis(out, pipe.analyze(make_image(seed=2).image))
    assert not (out / "lesion7_transverse_crop.png").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "lesion1_transverse_crop.png").is_file()


def test_an_ensemble_with_mirror_tta_through_the_pipeline(tiny_bundles, tmp_path):
    """An ensemble bundle (two tiny members, mirror TTA declared) in the one pipeline: its probability is the
    mean over members and mirror computed here by hand, and Grad-CAM paints a finite heatmap."""
    import torch

    from BreastDLRLib.bundles import open_bundle, save_bundle, save_ensemble_bundle
    from BreastDLRLib.networks.classifiers import build_classifier
    from BreastDLRLib.planes import crop_planes

    first = open_bundle(tiny_bundles["malignancy"])
    torch.manual_seed(7)
    other = save_bundle(tmp_path / "m1", build_classifier("EmbeddingNet", backbone="resnet18", embedding_dim=16),
                        {k: v for k, v in first.manifest.items() if k not in ("weights", "format")}, "card")
    ens = save_ensemble_bundle(tmp_path / "ens", [first.path, other.path],
                               {**{k: v for k, v in first.manifest.items() if k not in ("weights", "format")},
                                "input": {**first.input, "test_time_augmentation": ["hflip"]}}, "card")
    pipe = Pipeline.from_paths([str(tiny_bundles["segmenter"]), str(ens.path)], device="cpu")
    case = make_image(seed=3)
    res = pipe.analyze(case.image)
    lr = res.lesions[0]
    crops = crop_planes(case.image, lr.lesion.bbox_kji, lr.lesion.centre_kji, size=64, margin=0.3,
                        margin_of="shorter", mask=lr.lesion.mask, planes=("transverse",))
    x = torch.from_numpy(np.stack([c.image for c in crops["transverse"]])[:, None].repeat(3, 1)).float()
    with torch.no_grad():
        want = np.mean([torch.softmax(m.model()(v), 1)[:, 1].mean().item()
                        for m in (first, other) for v in (x, torch.flip(x, dims=(-1,)))])
    assert lr.probabilities["malignancy"] == pytest.approx(want, abs=1e-5)
    assert res.heatmap is not None and np.isfinite(res.heatmap.array).all() and res.heatmap.array.max() > 0
    assert {m["name"] for m in res.models} >= {first.name}


def _apart_and_shared(segmenter, tmp_path):
    """Analyse one image with the BM/LH bundles in ``tmp_path / "apart"`` and with a copy of them whose LH takes its
    trunks from BM (bundles.share_weights).  Returns, per kind, the lesions' (probabilities, frame probabilities,
    thresholds, recommendation, embedding) and how often each member's trunk ran ("malignancy 0", "risk 1", ...)."""
    import shutil

    from BreastDLRLib.bundles import share_weights

    shutil.copytree(tmp_path / "apart", tmp_path / "shared")
    share_weights(tmp_path / "shared" / "bm", tmp_path / "shared" / "lh")
    case = make_image(seed=3)
    out = {}
    for kind in ("apart", "shared"):
        pipe = Pipeline.from_paths([str(segmenter), str(tmp_path / kind / "bm"), str(tmp_path / kind / "lh")], device="cpu")
        assert pipe.risk_shares_trunk == (kind == "shared")
        calls = []
        for role in ("malignancy", "risk"):
            model = pipe.bundles[role].model()
            for k, member in enumerate(getattr(model, "members", [model])):
                member.trunk.register_forward_hook(lambda *a, r=f"{role} {k}": calls.append(r))
        res = pipe.analyze(case.image, birads="4a", explain=False)
        assert res.lesions
        out[kind] = ([(lr.probabilities, lr.frame_probabilities, lr.thresholds, lr.recommendation.to_dict(), lr.embedding)
                      for lr in res.lesions], {c: calls.count(c) for c in set(calls)})
    return out


def _assert_same_results(out):
    for (pa, fa, ta, ra, ea), (ps, fs, ts, rs, es) in zip(out["apart"][0], out["shared"][0]):
        assert pa.keys() == ps.keys() and ta == ts and ra == rs
        np.testing.assert_allclose(es, ea, rtol=1e-5, atol=1e-6)
        for k in pa:
            assert ps[k] == pytest.approx(pa[k], abs=1e-6)
            assert fs[k] == pytest.approx(fa[k], abs=1e-6)


def test_risk_ensemble_on_the_malignancy_ensembles_trunks_runs_each_once_with_the_same_results(tiny_bundles, tmp_path):
    """Two ensembles of BM/LH pairs (bundles.save_ensemble_bundle, then share_weights): the pipeline runs each
    member's trunk once per crop for both models, and the probabilities equal those of the ensembles run apart."""
    import torch

    from BreastDLRLib.bundles import open_bundle, save_bundle, save_ensemble_bundle
    from BreastDLRLib.networks.classifiers import build_classifier
    from BreastDLRLib.training.classifier import task_model

    first = open_bundle(tiny_bundles["malignancy"])
    man = {k: v for k, v in first.manifest.items() if k not in ("weights", "format", "architecture", "arguments")}
    man["input"] = {**first.input, "test_time_augmentation": ["hflip"]}
    pairs = []
    for seed in (5, 6):
        torch.manual_seed(seed)
        joint = build_classifier("EmbeddingNet", backbone="resnet18", embedding_dim=16, num_classes=4).eval()
        arch = {"architecture": "EmbeddingNet", "arguments": {"backbone": "resnet18", "embedding_dim": 16}}
        pairs.append([save_bundle(tmp_path / f"pair{seed}" / name, task_model(joint, t), {**man, **arch, "name": name, "role": role},
                                  "card").path for t, (name, role) in enumerate((("bm", "malignancy"), ("lh", "risk")))])
    save_ensemble_bundle(tmp_path / "apart" / "bm", [p[0] for p in pairs], {**man, "name": "bm"}, "card")
    save_ensemble_bundle(tmp_path / "apart" / "lh", [p[1] for p in pairs], {**man, "name": "lh", "role": "risk"}, "card")
    out = _apart_and_shared(tiny_bundles["segmenter"], tmp_path)
    for kind, (lesions, calls) in out.items():
        n = len(lesions)
        assert calls.get("risk 0", 0) == calls.get("risk 1", 0) == (0 if kind == "shared" else n)
        # one pass to classify, the embedding kept from it (apart as shared)
        assert calls["malignancy 0"] == calls["malignancy 1"] == n
        assert all(les[4].shape == (32,) for les in lesions)       # both members' embeddings side by side
    _assert_same_results(out)


def test_risk_model_on_the_malignancy_trunk_runs_it_once_with_the_same_results(tiny_bundles, tmp_path):
    """A BM/LH pair written with one trunk (bundles.share_weights): the pipeline runs the trunk once per crop for
    both models, and every probability equals that of the two models run apart (an unshared copy of the pair)."""
    import torch

    from BreastDLRLib.bundles import open_bundle, save_bundle
    from BreastDLRLib.networks.classifiers import build_classifier
    from BreastDLRLib.training.classifier import task_model

    first = open_bundle(tiny_bundles["malignancy"])
    torch.manual_seed(5)
    joint = build_classifier("EmbeddingNet", backbone="resnet18", embedding_dim=16, num_classes=4).eval()
    man = {k: v for k, v in first.manifest.items() if k not in ("weights", "format")}
    man["input"] = {**first.input, "test_time_augmentation": ["hflip"]}
    save_bundle(tmp_path / "apart" / "bm", task_model(joint, 0), man, "card")
    save_bundle(tmp_path / "apart" / "lh", task_model(joint, 1), {**man, "name": "test-risk", "role": "risk"}, "card")
    out = _apart_and_shared(tiny_bundles["segmenter"], tmp_path)
    for kind, (lesions, calls) in out.items():
        assert calls.get("risk 0", 0) == (0 if kind == "shared" else len(lesions))
        assert calls["malignancy 0"] == len(lesions)        # the embedding is kept from the classifying pass
    _assert_same_results(out)


def test_an_uncertain_segmenter_outline_is_flagged_said_and_written(tiny_bundles, tmp_path):
    """The segmenter's manifest sets the mean lesion probability under which its outline is flagged: the tiny
    segmenter gives every pixel sigmoid(5) = 0.9933, so 0.995 flags it and 0.99 does not.  The flag reaches the
    notes, findings.json, the console summary's data and predict's CSV; a reader's outline and volumes are not
    flagged."""
    import csv

    from BreastDLRLib.batch import predict_manifest
    from BreastDLRLib.bundles import open_bundle, save_bundle
    from BreastDLRLib.io import write_png

    first = open_bundle(tiny_bundles["segmenter"])
    man = {k: v for k, v in first.manifest.items() if k not in ("weights", "format")}
    case = make_image(seed=2)
    src = tmp_path / "img.png"
    write_png(case.image.array[0].astype(np.uint8), src)
    (tmp_path / "m.csv").write_text(f"case_id,image\nc1,{src}\n")
    for name, below in (("unsure", 0.995), ("sure", 0.99)):
        seg = save_bundle(tmp_path / name, first.model("cpu"),
                          {**man, "thresholds": {**first.thresholds, "uncertain_outline_below": below}}, "card").path
        paths = [str(seg), str(tiny_bundles["malignancy"]), str(tiny_bundles["risk"])]
        pipe = Pipeline.from_paths(paths, device="cpu")
        res = pipe.analyze(case.image, explain=False)
        (lr,) = res.lesions
        assert lr.lesion.mean_probability == pytest.approx(0.9933, abs=1e-3)   # stored at half precision
        assert lr.outline_uncertain is (name == "unsure")
        said = [n for n in res.clinical_notes if "outline is uncertain" in n]
        assert len(said) == (name == "unsure") and (not said or "0.99, below 0.99" not in said[0])
        findings = write_analysis(tmp_path / f"out_{name}", res)
        validate_findings(findings)
        assert findings["lesions"][0]["outline_uncertain"] is (name == "unsure")
        predict_manifest(tmp_path / "m.csv", tmp_path / f"pred_{name}.csv", model_paths=paths, device="cpu")
        (row,) = csv.DictReader(open(tmp_path / f"pred_{name}.csv"))
        assert row["outline_uncertain"] == ("true" if name == "unsure" else "false") and not row["error"]
        # a reader's outline is the reader's: not flagged
        drawn = pipe.analyze(case.image, explain=False, outline=case.image.with_array(np.ones(case.image.shape, np.uint8)))
        assert not drawn.lesions[0].outline_uncertain
        if name == "unsure":   # volumes: the threshold was measured on 2D images only
            vol = pipe.segment(oblique_volume())
            assert vol.lesions and not any(x.outline_uncertain for x in vol.lesions)
