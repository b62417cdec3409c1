"""scripts/classifier_cv_report.py: per-fold and pooled out-of-fold AUC from the folds' held-out probabilities, on a
small synthetic manifest; folds that hold out the same patient are refused."""
from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest

from BreastDLRLib.errors import InputError
from BreastDLRLib.training.data import read_manifest_csv

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "classifier_cv_report.py"


def _mann_whitney_auc(y, p):
    """AUC as the share of (positive, negative) pairs ranked right, ties counted half (the textbook definition)."""
    pos, neg = p[y == 1], p[y == 0]
    return float(np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg]))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from BreastDLRLib.synthetic import make_dataset_2d

    folder = tmp_path_factory.mktemp("cvreport")
    manifest = make_dataset_2d(24, 5, folder / "data", shape=(48, 48), spacing_mm=0.25)
    cases = read_manifest_csv(manifest)
    patients = sorted({c.patient_id for c in cases})
    rng = np.random.default_rng(0)
    npz = {}
    for k in (0, 1):
        mine = [c for c in cases if patients.index(c.patient_id) % 2 == k]
        y = np.array([i % 2 for i in range(len(mine))])
        p = np.clip(0.3 * y + rng.uniform(0, 0.7, len(mine)), 0, 1)
        npz[k] = folder / f"val_{k}.npz"
        np.savez(npz[k], probs=p, labels=y, case_id=np.array([c.case_id for c in mine]))
    return manifest, npz


def test_per_fold_and_pooled_auc_are_the_mann_whitney_figures(data):
    manifest, npz = data
    report = runpy.run_path(str(SCRIPT))["report"]
    doc = report(str(manifest), npz)
    ys, ps = [], []
    for k in (0, 1):
        z = np.load(npz[k])
        assert doc["folds"][str(k)]["auc"] == pytest.approx(_mann_whitney_auc(z["labels"], z["probs"]), abs=1e-4)
        ys.append(z["labels"]), ps.append(z["probs"])
    y, p = np.concatenate(ys), np.concatenate(ps)
    pooled = doc["pooled_out_of_fold"]
    assert pooled["n"] == y.size and pooled["auc"] == pytest.approx(_mann_whitney_auc(y, p), abs=1e-4)
    assert pooled["ci95"][0] < pooled["auc"] < pooled["ci95"][1]
    aucs = [doc["folds"][k]["auc"] for k in ("0", "1")]
    assert doc["auc_mean"] == pytest.approx(np.mean(aucs), abs=1e-4)
    assert doc["auc_sd"] == pytest.approx(np.std(aucs, ddof=1), abs=1e-4)


def test_folds_sharing_a_patient_are_refused(data):
    manifest, npz = data
    report = runpy.run_path(str(SCRIPT))["report"]
    with pytest.raises(InputError, match="held out in folds 0 and 1"):
        report(str(manifest), {0: npz[0], 1: npz[0]})


def test_an_unreadable_fold_file_says_how_to_write_it(data, tmp_path):
    manifest, npz = data
    report = runpy.run_path(str(SCRIPT))["report"]
    with pytest.raises(InputError, match="Fold 1: cannot read .*add_mirror_tta.py"):
        report(str(manifest), {0: npz[0], 1: tmp_path / "missing.npz"})
