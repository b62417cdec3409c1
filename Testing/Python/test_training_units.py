"""Small units of training: multi-task split, patient folds, Dice."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from BreastDLRLib.networks.classifiers import build_classifier
from BreastDLRLib.training.classifier import predict_probs, task_model
from BreastDLRLib.training.data import Case, patient_folds
from BreastDLRLib.training.segmenter import dice_scores


def test_task_model_reproduces_its_pair_of_logits():
    torch.manual_seed(0)
    multi = build_classifier("EmbeddingNet", backbone="resnet18", embedding_dim=8, num_classes=4).eval()
    x = (np.random.default_rng(0).random((3, 32, 32)) * 255).astype(np.uint8)
    both = predict_probs(multi, x, bf16=False)
    assert both.shape == (3, 2)
    for t in range(2):
        single = task_model(multi, t)
        np.testing.assert_allclose(predict_probs(single, x, bf16=False)[:, 0], both[:, t], atol=1e-6)


def test_patient_folds_never_split_a_patient_and_are_balanced():
    cases = [Case(f"c{i}", f"p{i // 2}", "ds" + str((i // 2) % 3), None, None, ["benign", "malignant"][i % 4 < 2], "")
             for i in range(200)]
    folds = patient_folds(cases, k=5, seed=1)
    by_patient = {}
    for c, f in zip(cases, folds):
        by_patient.setdefault(c.patient_id, set()).add(int(f))
    assert all(len(s) == 1 for s in by_patient.values())
    counts = np.bincount(folds, minlength=5)
    assert counts.min() >= 30 and counts.max() <= 50
    mal = np.array([c.label == "malignant" for c in cases])
    assert all(0.35 < mal[folds == f].mean() < 0.65 for f in range(5))  # half the patients are malignant
    assert (patient_folds(cases, k=5, seed=1) == folds).all()


def test_dice_by_hand():
    a = np.zeros((3, 4, 4), bool)
    b = np.zeros((3, 4, 4), bool)
    a[0, :2, :2] = True
    b[0, :2, :] = True          # 4 vs 8 pixels, overlap 4 → 8/12
    a[1, 0, 0] = True           # prediction only → 0
    np.testing.assert_allclose(dice_scores(a, b), [8 / 12, 0.0, 1.0])


def test_three_plane_branches_start_from_the_2d_trunk():
    from BreastDLRLib.training.abvs import init_from_2d

    torch.manual_seed(0)
    two_d = build_classifier("EmbeddingNet", backbone="resnet18", embedding_dim=8)
    three = build_classifier("ThreePlaneFusion", backbone="resnet18")
    n = init_from_2d(three, two_d.state_dict())
    assert n == 3 * len([k for k in two_d.state_dict() if k.startswith("trunk.")])
    x = torch.rand(2, 3, 32, 32)
    two_d.eval(), three.eval()
    with torch.no_grad():
        for plane in three.planes:
            torch.testing.assert_close(three.trunks[plane](x), two_d.trunk(x))


def test_shared_trunk_three_plane_model_is_one_trunk():
    torch.manual_seed(0)
    shared = build_classifier("ThreePlaneFusion", backbone="resnet18", shared_trunk=True).eval()
    separate = build_classifier("ThreePlaneFusion", backbone="resnet18").eval()
    n = lambda m: sum(p.numel() for p in m.parameters())
    trunk = sum(p.numel() for p in shared.trunks["shared"].parameters())
    assert n(separate) - n(shared) == 2 * trunk
    assert all(shared.trunk_for(p) is shared.trunks["shared"] for p in shared.planes)
    x = {p: torch.rand(1, 3, 32, 32) for p in shared.planes}
    feats = shared.plane_features(x)
    for p in shared.planes:
        torch.testing.assert_close(feats[p], shared.trunks["shared"](x[p]))
    rebuilt = build_classifier("ThreePlaneFusion", **shared.config()["arguments"])
    rebuilt.load_state_dict(shared.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), shared(x))


def test_svm_head_is_written_exactly_into_the_last_layer():
    """Yang 2024's SVM on the deep features: after folding, softmax(model(x))[:, 1] equals
    expit(a * f + b) with f the decision value of scikit-learn's own linear SVC on the standardised
    embeddings (an independent implementation of the SVM part) and (a, b) the fitted Platt sigmoid."""
    from scipy.special import expit
    from sklearn.svm import SVC

    from BreastDLRLib.training.classifier import embeddings_of, fit_svm_head

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    multi = build_classifier("EmbeddingNet", backbone="resnet18", embedding_dim=8, num_classes=4).eval()
    x = (rng.random((40, 32, 32)) * 255).astype(np.uint8)
    x[:20, 8:24, 8:24] = 255                                        # the positives carry a bright square
    y = np.c_[np.r_[np.ones(20), np.zeros(20)], np.r_[np.zeros(10), np.ones(10), -np.ones(20)]].astype(int)
    emb = embeddings_of(multi, x, bf16=False)
    info = fit_svm_head(multi, x, y, ("malignancy", "risk"), bf16=False)
    probs = predict_probs(multi, x, bf16=False)
    assert np.allclose(embeddings_of(multi, x, bf16=False), emb)   # only the last layer changed
    for t, name in enumerate(("malignancy", "risk")):
        sel = y[:, t] >= 0
        e = emb[sel]
        sd = e.std(0)
        sd[sd < 1e-12] = 1.0
        z = (e - e.mean(0)) / sd
        f = SVC(kernel="linear", C=1.0).fit(z, y[sel, t]).decision_function((emb - e.mean(0)) / sd)
        a, b = info[name]["platt"]
        np.testing.assert_allclose(probs[:, t], expit(a * f + b), atol=2e-5)
        assert info[name]["n_train"] == int(sel.sum())
    assert abs(a) > 1e-3                                            # a fitted, non-degenerate sigmoid


def test_a_cards_retrain_command_carries_the_runs_non_default_options():
    from BreastDLRLib.training.cards import retrain_options

    cfg = {"task": "both", "size": 128, "epochs": 22, "patience": 30, "seed": 0, "split_seed": None, "threads": 2,
           "max_minutes": 110.0, "bf16": False, "lr": 0.0}
    assert retrain_options(cfg) == " --epochs 22 --patience 30"
    assert retrain_options({"task": "risk", "seed": 3, "size": 160}) == " --size 160 --seed 3"


def test_jittered_boxes_stay_in_the_image_and_within_the_jitter():
    from BreastDLRLib.training.classifier import jittered_boxes

    box = np.array([[0, 1], [40, 60], [10, 90]])          # 2D: k is the single slice
    shape = (1, 100, 95)
    boxes = jittered_boxes(box, shape, 200, 0.2, np.random.default_rng(3))
    assert len(boxes) == 200
    moved = False
    for b in boxes:
        assert b[0].tolist() == [0, 1]                       # the slice axis is never touched
        for ax, side in ((1, 20), (2, 80)):
            assert 0 <= b[ax, 0] < b[ax, 1] <= shape[ax]
            assert np.all(np.abs(b[ax] - box[ax]) <= 0.2 * side + 0.5)
            moved |= bool(np.any(b[ax] != box[ax]))
    assert moved
    again = jittered_boxes(box, shape, 200, 0.2, np.random.default_rng(3))
    assert all(np.array_equal(a, b) for a, b in zip(boxes, again))      # seeded
    edge = jittered_boxes(np.array([[0, 1], [0, 2], [93, 95]]), shape, 50, 0.45, np.random.default_rng(0))
    assert all(0 <= b[1, 0] < b[1, 1] <= 100 and 0 <= b[2, 0] < b[2, 1] <= 95 for b in edge)   # clipped, never empty


def test_box_views_start_with_the_exact_crop(tmp_path):
    from BreastDLRLib.synthetic import make_dataset_2d
    from BreastDLRLib.training.classifier import build_crops, lesion_crop, lesion_crops
    from BreastDLRLib.training.data import read_manifest_csv

    cases = [c for c in read_manifest_csv(make_dataset_2d(6, 1, tmp_path, shape=(96, 96), spacing_mm=0.25))
             if c.malignant is not None]
    c = next(c for c in cases if lesion_crops(c, 32, 0.3) is not None)
    views = lesion_crops(c, 32, 0.3, box_views=3, box_jitter=0.25, seed=1)
    assert views.shape == (4, 32, 32)
    np.testing.assert_array_equal(views[0], lesion_crop(c, 32, 0.3))
    assert all(not np.array_equal(views[0], v) for v in views[1:])
    np.testing.assert_array_equal(views, lesion_crops(c, 32, 0.3, box_views=3, box_jitter=0.25, seed=1))
    x, y, kept = build_crops(cases, "malignancy", 32, 0.3, box_views=2, box_jitter=0.25, seed=1)
    x0, y0, kept0 = build_crops(cases, "malignancy", 32, 0.3)
    assert x.shape[1:] == (3, 32, 32) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[:, 0], x0)                 # view 0 is what training without views sees
    assert [k.case_id for k in kept] == [k.case_id for k in kept0] and np.array_equal(y, y0)


def _bundle(folder, net, task):
    from BreastDLRLib.bundles import save_bundle

    return save_bundle(folder, net, {
        "name": f"t-{task}", "version": "0", "role": task, "architecture": "EmbeddingNet",
        "arguments": {"backbone": "resnet18", "embedding_dim": 8}, "input": {"size": [32, 32], "margin": 0.3},
        "labels": ["negative", "positive"], "thresholds": {"probability": 0.5}, "provenance": {"data": "none"},
        "metrics": {}, "licence": "Apache-2.0", "intended_use": "Tests only."}, "card").path


def test_init_from_bundles_puts_each_head_on_the_shared_trunk(tmp_path):
    import pytest

    from BreastDLRLib.training.classifier import init_from_bundles

    torch.manual_seed(0)
    joint = build_classifier("EmbeddingNet", backbone="resnet18", embedding_dim=8, num_classes=4).eval()
    bm = _bundle(tmp_path / "bm", task_model(joint, 0), "malignancy")
    lh = _bundle(tmp_path / "lh", task_model(joint, 1), "risk")
    torch.manual_seed(1)
    fresh = build_classifier("EmbeddingNet", backbone="resnet18", embedding_dim=8, num_classes=4).eval()
    x = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(fresh(x), joint(x), atol=1e-2)
    init_from_bundles(fresh, [str(bm), str(lh)], ("malignancy", "risk"), log=lambda m: None)
    with torch.no_grad():                                   # the bundles hold float16: equal to that precision
        assert torch.allclose(fresh(x), joint(x), atol=2e-2)
    torch.manual_seed(2)
    other = _bundle(tmp_path / "other", build_classifier("EmbeddingNet", backbone="resnet18", embedding_dim=8), "risk")
    with pytest.raises(ValueError, match="trunk is not that of"):
        init_from_bundles(fresh, [str(bm), str(other)], ("malignancy", "risk"))
    with pytest.raises(ValueError, match="one bundle per task"):
        init_from_bundles(fresh, [str(bm)], ("malignancy", "risk"))
    wide = build_classifier("EmbeddingNet", backbone="resnet18", embedding_dim=16, num_classes=2)
    with pytest.raises(ValueError, match="not an EmbeddingNet"):
        init_from_bundles(wide, [str(bm)], ("malignancy",))


def test_segmenter_views_are_appended_after_the_exact_crop(tmp_path):
    """--segmenter-views: the file's crops become one more view of the lesions it lists; the others repeat their
    exact crop; a file cut with other crop settings is refused with the settings in the message."""
    from BreastDLRLib.errors import InputError
    from BreastDLRLib.synthetic import make_dataset_2d
    from BreastDLRLib.training.classifier import ClassifierConfig, add_segmenter_views
    from BreastDLRLib.training.data import read_manifest_csv

    cases = read_manifest_csv(make_dataset_2d(4, 2, tmp_path, shape=(64, 64), spacing_mm=0.25))[:3]
    views = np.arange(3 * 2 * 8 * 8, dtype=np.uint8).reshape(3, 2, 8, 8)
    extra = np.full((1, 1, 8, 8), 7, np.uint8)
    f = tmp_path / "views.npz"
    np.savez(f, case_id=np.array([cases[1].case_id]), x=extra, size=8, margin=0.3, margin_of="longer")
    cfg = ClassifierConfig(size=8, margin=0.3, segmenter_views=str(f))
    out = add_segmenter_views(views, cases, cfg, log=lambda m: None)
    assert out.shape == (3, 3, 8, 8)
    np.testing.assert_array_equal(out[:, :2], views)
    np.testing.assert_array_equal(out[1, 2], extra[0, 0])
    np.testing.assert_array_equal(out[0, 2], views[0, 0])
    np.testing.assert_array_equal(out[2, 2], views[2, 0])
    with pytest.raises(InputError, match="128 px"):
        add_segmenter_views(views, cases, ClassifierConfig(size=128, segmenter_views=str(f)), log=lambda m: None)
    with pytest.raises(InputError, match="does not exist"):
        add_segmenter_views(views, cases, ClassifierConfig(size=8, segmenter_views=str(tmp_path / "no.npz")))
