"""Small units of training: multi-task split, patient folds, Dice."""
from __future__ import annotations

import numpy as np
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
