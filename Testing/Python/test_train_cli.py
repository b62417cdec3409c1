"""``breastdlr train`` on a tiny synthetic manifest (32-pixel inputs, one epoch, one thread), run in-process
through ``BreastDLRLib.cli.main``: bundles, cards, patient-level folds, cross-validation and resume."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from BreastDLRLib.bundles import open_bundle
from BreastDLRLib.cli import main
from BreastDLRLib.evaluation import roc_auc
from BreastDLRLib.training import cli as train_cli
from BreastDLRLib.training.data import patient_folds, read_manifest_csv

N_IMAGES = 20
FAST = ["--size", "32", "--epochs", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """20 synthetic images; two images per patient so that a split by image would mix patients."""
    from BreastDLRLib.synthetic import make_dataset_2d

    folder = tmp_path_factory.mktemp("synthetic")
    path = make_dataset_2d(N_IMAGES, 3, folder, shape=(96, 96), spacing_mm=0.25)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    for n, r in enumerate(rows):
        r["patient_id"] = f"patient{n // 2}"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    labels = [r["label"] for r in rows]
    assert labels.count("malignant") >= 4 and labels.count("benign") >= 4, labels
    return path


def _train(*args: str) -> int:
    return main(["train", *args])


def _labelled(manifest: Path):
    """The cases the malignancy classifier can use: a pathology label and a non-empty mask."""
    from PIL import Image

    def has_lesion(c):
        with Image.open(c.mask) as im:
            return np.asarray(im).any()

    return [c for c in read_manifest_csv(manifest) if c.malignant is not None and has_lesion(c)]


def test_preset_names_match_the_training_presets():
    from BreastDLRLib.training.classifier import PRESETS

    assert set(train_cli.PRESET_NAMES) == set(PRESETS)


@pytest.mark.slow
def test_malignancy_bundle_holds_out_whole_patients(manifest, tmp_path, capsys):
    out = tmp_path / "mal"
    assert _train("malignancy", "--manifest", str(manifest), "--out", str(out), "--backbone", "resnet18",
                  "--folds", "2", *FAST) == 0
    b = open_bundle(out)
    assert b.role == "malignancy" and b.manifest["default"] is False
    assert b.manifest["weights"]["dtype"] == "float16"
    b.model("cpu")                                              # the weights fit the network the manifest names
    prov = b.manifest["provenance"]
    assert "--backbone resnet18" in prov["command"] and "--folds 2" in prov["command"]
    if not __import__("torch").cuda.is_available():
        assert b.manifest["metrics"]["trained_on"] == "cpu"          # where the default "auto" trained
    card = (out / "MODEL_CARD.md").read_text()
    assert f"manifest.csv: synthetic ({N_IMAGES} images)" in card and "ResNet18 trunk" in card
    assert "BUS-BRA" not in card                                # the card describes the data actually used
    # the held-out images are fold 0 of the patient-level split, and no patient is on both sides
    with open(out / "validation_predictions.csv", newline="") as f:
        val = {r["case_id"] for r in csv.DictReader(f)}
    usable = _labelled(manifest)
    folds = patient_folds(usable, 2, 0, stratify="label")
    assert val == {c.case_id for c, k in zip(usable, folds) if k == 0}
    patients = {c.case_id: c.patient_id for c in usable}
    assert not {patients[c] for c in val} & {patients[c.case_id] for c in usable if c.case_id not in val}
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("\n{") + 1:])     # epoch lines, then the JSON summary
    assert summary["bundle"] == str(out) and summary["validation_fold"] == 0 and summary["cv"] is None
    assert "[train] malignancy epoch 1/1" in printed


@pytest.mark.slow
def test_cross_validation_reports_every_fold(manifest, tmp_path):
    out = tmp_path / "cv"
    assert _train("malignancy", "--manifest", str(manifest), "--out", str(out), "--backbone", "resnet18",
                  "--folds", "2", "--cv", *FAST) == 0
    cv = json.loads((out / "cv_metrics.json").read_text())
    assert cv["summary"]["folds"] == 2 and len(cv["per_fold"]) == 2
    usable = {c.case_id: c for c in _labelled(manifest)}
    val_sets = [set(f["val_case_ids"]) for f in cv["per_fold"]]
    assert not val_sets[0] & val_sets[1] and val_sets[0] | val_sets[1] == set(usable)
    pats = [{usable[c].patient_id for c in s} for s in val_sets]
    assert not pats[0] & pats[1]                                 # no patient in two folds
    # pooled out-of-fold AUC = AUC of every fold's held-out probabilities, from cv_predictions.csv
    with open(out / "cv_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.array([usable[r["case_id"]].malignant for r in rows])
    p = np.array([float(r["probability_malignant"]) for r in rows])
    ref = roc_auc(y, p)
    pooled = cv["summary"]["pooled_out_of_fold"]
    assert pooled["auc"] == pytest.approx(ref.auc, abs=1e-5) and pooled["n"] == len(usable)
    aucs = [f["auc"] for f in cv["per_fold"]]
    assert cv["summary"]["auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert cv["summary"]["auc"]["sd"] == pytest.approx(np.std(aucs, ddof=1))
    # the bundle is the fold-0 model: its validation predictions are fold 0's
    with open(out / "validation_predictions.csv", newline="") as f:
        assert {r["case_id"] for r in csv.DictReader(f)} == val_sets[0]
    assert "fold-0 model" in (out / "MODEL_CARD.md").read_text()
    assert open_bundle(out).manifest["metrics"]["cross_validation"]["folds"] == 2


@pytest.mark.slow
def test_segmenter_cross_validation(manifest, tmp_path):
    out = tmp_path / "seg"
    assert _train("segmenter", "--manifest", str(manifest), "--out", str(out), "--folds", "2", "--cv", *FAST) == 0
    b = open_bundle(out)
    assert b.role == "segmenter" and b.input["size"] == [32, 32]
    assert b.manifest["provenance"]["config"]["device"] == "auto"
    if not __import__("torch").cuda.is_available():
        assert b.manifest["metrics"]["trained_on"] == "cpu"          # where "auto" trained, recorded in the bundle
    b.model("cpu")
    cv = json.loads((out / "cv_metrics.json").read_text())
    ids = [set(f["val_case_ids"]) for f in cv["per_fold"]]
    cases = {c.case_id: c.patient_id for c in read_manifest_csv(manifest)}
    assert ids[0] | ids[1] == set(cases) and not ids[0] & ids[1]
    assert not {cases[c] for c in ids[0]} & {cases[c] for c in ids[1]}
    # the fold-0 Dice recomputed by the command equals the one the training measured on the same model
    assert cv["per_fold"][0]["dice_mean_lesion_images"] == pytest.approx(
        b.manifest["metrics"]["dice_mean_lesion_images_fp32"], abs=1e-6)
    assert cv["summary"]["pooled_out_of_fold"]["n_images"] == N_IMAGES
    assert "2-fold" in (out / "MODEL_CARD.md").read_text()


@pytest.mark.slow
def test_resume_reuses_finished_work_and_fresh_runs_clear_it(manifest, tmp_path, capsys):
    out, work = tmp_path / "mal", tmp_path / "work"

    def args(epochs: int):
        return ["malignancy", "--manifest", str(manifest), "--out", str(out), "--work", str(work), "--backbone",
                "resnet18", "--folds", "2", "--size", "32", "--threads", "1", "--epochs", str(epochs)]

    work.mkdir()
    (work / "checkpoint_malignancy.pt").write_bytes(b"not a checkpoint")  # a fresh run must delete it
    assert _train(*args(1)) == 0
    sha = open_bundle(out).manifest["weights"]["sha256"]
    capsys.readouterr()
    assert _train(*args(1), "--resume") == 0
    assert "already finished" in capsys.readouterr().out
    assert open_bundle(out).manifest["weights"]["sha256"] == sha
    assert _train(*args(2), "--resume") == 2                   # other settings than the run in the work folder
    err = capsys.readouterr().err.strip()
    assert "epochs" in err and "\n" not in err


@pytest.mark.parametrize("args, expected", [
    (["segmenter", "--preset", "cpu"], "--preset applies"),
    (["malignancy", "--folds", "2", "--val-fold", "2"], "--val-fold"),
    (["risk", "--folds", "1"], "--folds"),
    (["segmenter", "--box-views", "2"], "--box-views applies"),
    (["malignancy", "--box-views", "-1"], "--box-views must be 0 or more"),
    (["risk", "--box-jitter", "0.5"], "--box-jitter must be"),
])
def test_bad_options_are_refused(manifest, tmp_path, capsys, args, expected):
    out = tmp_path / "x"
    assert _train(*args, "--manifest", str(manifest), "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("breastdlr: error: ") and expected in err and "\n" not in err
    assert not out.exists()


def test_single_class_manifest_is_refused_before_training(manifest, tmp_path, capsys):
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, [r for r in reader if r["label"] == "benign"]
    one = tmp_path / "benign_only.csv"
    with open(one, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows({**r, "image": str(Path(manifest).parent / r["image"]), "mask": str(Path(manifest).parent / r["mask"])}
                    for r in rows)
    out = tmp_path / "x"
    assert _train("malignancy", "--manifest", str(one), "--out", str(out), *FAST) == 2
    err = capsys.readouterr().err
    assert "both classes" in err and not out.exists() and not (tmp_path / "x-work").exists()


@pytest.mark.slow
def test_yang2024_preset_trains_vgg11_with_an_svm_in_its_last_layer(manifest, tmp_path):
    """Yang et al. 2024: VGG11 features + SVM.  The bundle is one network whose softmax is the SVM's
    calibrated probability; the card and manifest say so."""
    import torch

    out = tmp_path / "yang"
    assert _train("malignancy", "--manifest", str(manifest), "--out", str(out), "--preset", "yang2024",
                  "--folds", "2", *FAST) == 0
    b = open_bundle(out)
    assert b.manifest["arguments"]["backbone"] == "vgg11_bn"
    assert "--preset yang2024 --backbone vgg11_bn" in b.manifest["provenance"]["command"]
    svm = b.manifest["metrics"]["svm_head"]
    assert svm["kernel"] == "linear" and svm["n_support"] >= 2
    card = (out / "MODEL_CARD.md").read_text()
    assert "Yang et al. 2024" in card and "VGG11 (with batch normalisation) trunk" in card
    assert "linear support vector machine" in card
    net = b.model("cpu")
    # the negative-class logit is 0: the positive logit alone carries the SVM's decision
    assert torch.count_nonzero(net.classifier.weight[0]) == 0 and float(net.classifier.bias[0]) == 0.0
    x = torch.rand(3, 3, 32, 32)
    p = torch.softmax(net(x), 1)[:, 1]
    assert torch.all((p > 0) & (p < 1))


@pytest.mark.slow
def test_make_ensemble_of_two_members_on_one_split(manifest, tmp_path, capsys):
    """Two members (other --seed, one --split-seed) made one ensemble bundle by scripts/make_ensemble.py: the
    first member's file is kept byte for byte, and the AUC it records is recomputed here from the members."""
    import runpy
    import sys

    import torch

    members = []
    for seed in (0, 1):
        out = tmp_path / f"member{seed}"
        assert _train("malignancy", "--manifest", str(manifest), "--out", str(out), "--backbone", "resnet18",
                      "--folds", "2", "--seed", str(seed), "--split-seed", "0", *FAST) == 0
        assert "--split-seed 0" in open_bundle(out).manifest["provenance"]["command"]
        members.append(out)
    capsys.readouterr()
    first_bytes = (members[0] / "weights.safetensors").read_bytes()
    script = Path(__file__).resolve().parents[2] / "scripts" / "make_ensemble.py"
    argv = sys.argv
    sys.argv = [str(script), "--manifest", str(manifest), "--task", "malignancy", "--members", *map(str, members),
                "--out", str(tmp_path / "ens"), "--work", str(tmp_path / "work")]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    ens = open_bundle(tmp_path / "ens")
    assert ens.manifest["architecture"] == "EnsembleNet" and ens.manifest["arguments"]["n_members"] == 2
    assert (ens.path / "weights.safetensors").read_bytes() == first_bytes
    assert ens.manifest["input"]["test_time_augmentation"] == ["hflip"]
    assert "ensemble of 2" in (ens.path / "MODEL_CARD.md").read_text()
    # recompute: the held-out crops of fold 0, each member with its mirror, averaged
    from BreastDLRLib.training.classifier import build_crops, predict_probs

    usable = _labelled(manifest)
    x, y, kept = build_crops(usable, "malignancy", 32, 0.3, "longer")
    folds = patient_folds(kept, 2, 0, stratify="label")
    va = np.where(folds == 0)[0]
    probs = []
    for m in members:
        net = open_bundle(m).model()
        probs.append((predict_probs(net, x[va], False)[:, 0] + predict_probs(net, x[va][:, :, ::-1].copy(), False)[:, 0]) / 2)
    want = roc_auc(y[va, 0], np.mean(probs, 0)).auc
    assert ens.manifest["metrics"]["auc"] == pytest.approx(want, abs=1e-9)
    with torch.no_grad():                                   # and the bundle's own network gives those probabilities
        t = torch.from_numpy(x[va][:2]).float().div(255).unsqueeze(1).repeat(1, 3, 1, 1)
        p_net = torch.softmax(ens.model()(t), 1)[:, 1].numpy()
    p_plain = np.mean([predict_probs(open_bundle(m).model(), x[va][:2], False)[:, 0] for m in members], 0)
    np.testing.assert_allclose(p_net, p_plain, atol=1e-5)


@pytest.mark.slow
def test_box_views_train_and_reach_the_card(manifest, tmp_path):
    """--box-views: the run trains on perturbed-box crops besides the exact ones (cached with their own name), still
    validates on the exact crops of whole held-out patients, and the card's retrain command carries the options."""
    out = tmp_path / "bv"
    assert _train("malignancy", "--manifest", str(manifest), "--out", str(out), "--backbone", "resnet18",
                  "--folds", "2", "--box-views", "2", "--box-jitter", "0.25", *FAST) == 0
    b = open_bundle(out)
    cfg = b.manifest["provenance"]["config"]
    assert cfg["box_views"] == 2 and cfg["box_jitter"] == 0.25
    assert "--box-views 2 --box-jitter 0.25" in b.manifest["provenance"]["command"]
    assert "perturbed" in (out / "MODEL_CARD.md").read_text()
    z = np.load(tmp_path / "bv-work" / "crops_malignancy_32_longer_views2_j0.25_s0.npz")
    assert z["x"].shape[1:] == (3, 32, 32)
    usable = _labelled(manifest)
    folds = patient_folds(usable, 2, 0, stratify="label")
    assert b.manifest["metrics"]["val_crops"] == int((folds == 0).sum())


@pytest.mark.slow
def test_joint_training_script_stores_the_trunk_once_and_fine_tunes_from_it(manifest, tmp_path):
    """scripts/train_classifier.py --task both: BM and LH, LH holding only its last layer; --init then fine-tunes
    the pair (box views on) on the same split, and the held-out patients stay those of the first run."""
    import runpy
    import sys

    import torch

    script = Path(__file__).resolve().parents[2] / "scripts" / "train_classifier.py"

    def run(*args):
        argv = sys.argv
        sys.argv = [str(script), "--manifest", str(manifest), "--task", "both", "--backbone", "resnet18",
                    "--folds", "2", "--size", "32", "--epochs", "1", "--threads", "1", *args]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv

    run("--out", str(tmp_path / "base"), "--work", str(tmp_path / "w1"))
    bm, lh = open_bundle(tmp_path / "base" / "breastdlr-malignancy-2d"), open_bundle(tmp_path / "base" / "breastdlr-risk-2d")
    assert lh.manifest["uses_weights_of"] == "breastdlr-malignancy-2d"
    assert lh.manifest["weights"]["bytes"] < 2000 < bm.manifest["weights"]["bytes"]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bm.model().embed(x), lh.model().embed(x))      # one trunk
    run("--out", str(tmp_path / "ft"), "--work", str(tmp_path / "w2"), "--box-views", "1", "--lr", "0.0001",
        "--init", f"{bm.path},{lh.path}")
    ft = open_bundle(tmp_path / "ft" / "breastdlr-malignancy-2d")
    cfg = ft.manifest["provenance"]["config"]
    assert cfg["init"] == f"{bm.path},{lh.path}" and cfg["box_views"] == 1
    assert f"--init {bm.path},{lh.path}" in ft.manifest["provenance"]["command"]
    assert "Fine-tuned from" in (ft.path / "MODEL_CARD.md").read_text()
    assert ft.manifest["metrics"]["val_crops"] == bm.manifest["metrics"]["val_crops"]
    z1 = np.load(tmp_path / "w1" / "val_malignancy.npz")
    z2 = np.load(tmp_path / "w2" / "val_malignancy.npz")
    assert list(z1["case_id"]) == list(z2["case_id"])                     # the same held-out patients
    # the two pairs (one split) made a malignancy and a risk ensemble, each member's trunk stored once
    from BreastDLRLib.bundles import weight_files
    from BreastDLRLib.networks.classifiers import EnsembleNet

    ens_script = Path(__file__).resolve().parents[2] / "scripts" / "make_ensemble.py"
    argv = sys.argv
    sys.argv = [str(ens_script), "--manifest", str(manifest), "--task", "both", "--members", str(tmp_path / "base"),
                str(tmp_path / "ft"), "--out", str(tmp_path / "ens"), "--work", str(tmp_path / "we")]
    try:
        runpy.run_path(str(ens_script), run_name="__main__")
    finally:
        sys.argv = argv
    ebm, elh = open_bundle(tmp_path / "ens" / "breastdlr-malignancy-2d"), open_bundle(tmp_path / "ens" / "breastdlr-risk-2d")
    assert ebm.manifest["architecture"] == elh.manifest["architecture"] == "EnsembleNet"
    assert elh.manifest["uses_weights_of"] == "breastdlr-malignancy-2d" and elh.manifest["weights"]["bytes"] < 4000
    assert [p["sha256"] for p in elh.manifest["weights"]["parts"]] == [wf.sha256 for wf in weight_files(ebm.manifest)]
    assert [m["box_views"] for m in elh.manifest["metrics"]["members"]] == [0, 1]
    with torch.no_grad():                       # the risk ensemble is the mean of the two risk models
        want = (torch.softmax(lh.model()(x), 1) + torch.softmax(open_bundle(tmp_path / "ft" / "breastdlr-risk-2d").model()(x), 1)) / 2
        torch.testing.assert_close(torch.softmax(elh.model()(x), 1), want, atol=1e-5, rtol=1e-4)
    assert isinstance(elh.model(), EnsembleNet)
    z = np.load(tmp_path / "we" / "val_risk.npz")
    assert list(z["case_id"]) == list(np.load(tmp_path / "w1" / "val_risk.npz")["case_id"])
    assert elh.manifest["metrics"]["auc"] == pytest.approx(roc_auc(z["labels"], z["probs"]).auc, abs=1e-12)


def test_a_classifier_starts_from_the_segmenter_trained_on_its_split(manifest, tmp_path, capsys):
    """--init-encoder: the efficientnet-b0 trunk starts from the segmenter's encoder (with a vanishing learning
    rate the trained trunk is still that encoder), the card and the retrain command say so, and a segmenter of
    another split, --cv or another backbone are refused."""
    import torch

    seg = tmp_path / "seg"
    assert _train("segmenter", "--manifest", str(manifest), "--out", str(seg), "--folds", "2", *FAST) == 0
    out = tmp_path / "bm"
    assert _train("malignancy", "--manifest", str(manifest), "--out", str(out), "--folds", "2", "--init-encoder",
                  str(seg), "--lr", "1e-12", *FAST) == 0
    b = open_bundle(out)
    assert b.manifest["arguments"]["backbone"] == "efficientnet-b0"
    assert b.manifest["provenance"]["config"]["init_encoder"] == str(seg)
    assert f"--init-encoder {seg.name}" in b.manifest["provenance"]["command"]
    assert "started from the encoder of the lesion segmenter `seg`" in (out / "MODEL_CARD.md").read_text()
    enc = {k[len("encoder."):]: v.float() for k, v in open_bundle(seg).model().state_dict().items()
           if k.startswith("encoder.")}
    trunk = b.model().trunk.encoder.state_dict()
    torch.testing.assert_close(trunk["_blocks.15._project_conv.weight"], enc["_blocks.15._project_conv.weight"],
                               rtol=1e-3, atol=1e-3)                    # stored in float16
    torch.testing.assert_close(trunk["_conv_stem.weight"] * 3, enc["_conv_stem.weight"].repeat(1, 3, 1, 1),
                               rtol=1e-3, atol=1e-3)
    # a classifier whose own folds put a segmenter training patient among its validation patients is refused
    from BreastDLRLib.errors import InputError
    from BreastDLRLib.networks.classifiers import build_classifier
    from BreastDLRLib.training.classifier import ClassifierConfig, init_from_segmenter
    from BreastDLRLib.training.splits import segmenter_split

    cfg = ClassifierConfig(folds=2, backbone="efficientnet-b0")
    seg_train, seg_val = segmenter_split(read_manifest_csv(manifest), 2, 0, 0)
    net = build_classifier("EmbeddingNet", backbone="efficientnet-b0", embedding_dim=8, num_classes=2)
    init_from_segmenter(net, str(seg), cfg, manifest, seg_val, log=lambda m: None)          # its own held-out: fine
    with pytest.raises(InputError, match="trained on 1 of this classifier's validation patients"):
        init_from_segmenter(net, str(seg), cfg, manifest, seg_val + seg_train[:1], log=lambda m: None)
    capsys.readouterr()
    for args, expected in ((["--val-fold", "1"], "another patient split"), (["--cv"], "--init-encoder with --cv"),
                           (["--backbone", "resnet18"], "starts an efficientnet-b0 trunk")):
        bad = tmp_path / "bad"
        assert _train("malignancy", "--manifest", str(manifest), "--out", str(bad), "--folds", "2", "--init-encoder",
                      str(seg), *args, *FAST) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("breastdlr: error: ") and expected in err and "\n" not in err
        assert not bad.exists()


@pytest.mark.parametrize("task", ["segmenter", "malignancy"])
def test_cuda_is_refused_clearly_without_a_gpu(manifest, tmp_path, capsys, task):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: see test_training_on_the_gpu")
    assert _train(task, "--manifest", str(manifest), "--out", str(tmp_path / "b"), "--device", "cuda", *FAST) != 0
    assert "no CUDA GPU is available here" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (none on the project's CI)")
@pytest.mark.parametrize("task", ["segmenter", "malignancy"])
def test_training_on_the_gpu(manifest, tmp_path, task):
    """One epoch on the GPU: the bundle is written from CPU tensors, opens on the CPU and records the device asked for."""
    out = tmp_path / task
    extra = ["--backbone", "resnet18"] if task != "segmenter" else []
    assert _train(task, "--manifest", str(manifest), "--out", str(out), "--folds", "2", "--device", "cuda",
                  *extra, *FAST) == 0
    b = open_bundle(out)
    model = b.model("cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert b.manifest["provenance"]["config"]["device"] == "cuda"
    assert b.manifest["metrics"]["trained_on"].startswith("cuda (")
