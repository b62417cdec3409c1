"""One patient split for the segmenter and the classifiers (BreastDLRLib.training.splits): every patient the
classifiers hold out is held out by the segmenter too, so that an end-to-end measurement on the classifiers'
held-out fold never meets an image the segmenter trained on."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from BreastDLRLib.errors import InputError
from BreastDLRLib.training.classifier import classifier_folds, tasks_of
from BreastDLRLib.training.data import patient_folds, read_manifest_csv, split_seed_of
from BreastDLRLib.training.splits import has_lesion_mask, segmenter_folds, segmenter_split

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """40 synthetic images (lesions and normals) standing for a real dataset, two per patient, and three images
    without a mask file."""
    from BreastDLRLib.synthetic import make_dataset_2d

    folder = tmp_path_factory.mktemp("split")
    path = make_dataset_2d(40, 5, folder, shape=(64, 64), spacing_mm=0.25)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    for n, r in enumerate(rows):
        r["patient_id"] = f"p{n // 2}"
        r["dataset"] = "real"         # sorts before "synthetic", as the public datasets' names do
        if n in (3, 17, 30):
            r["mask"] = ""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    labels = [r["label"] for r in rows]
    assert "normal" in labels and "malignant" in labels and "benign" in labels, labels
    return path


def _classifier_held_out(cases, k, seed):
    """{fold: patients} of the classifiers' split, computed as build_crops keeps cases (label + a lesion mask)."""
    usable = [c for c in cases if (c.malignant is not None or c.high_risk is not None) and has_lesion_mask(c)]
    folds = classifier_folds(usable, tasks_of("both"), k, seed)
    return {f: {_who(c) for c, g in zip(usable, folds) if g == f} for f in range(k)}


def _who(case) -> str:
    return f"{case.dataset}/{case.patient_id}"


@pytest.mark.parametrize("seed", [0, 3])
def test_the_segmenters_held_out_patients_include_the_classifiers(manifest, seed):
    cases = read_manifest_csv(manifest)
    held = _classifier_held_out(cases, 4, seed)
    images, folds = segmenter_folds(cases, 4, seed)
    assert len(images) == len(cases) and (folds >= 0).all()          # every image is in a fold
    for f in range(4):
        tr, va = segmenter_split(cases, 4, seed, f)
        assert held[f] <= {_who(c) for c in va}
        assert not {_who(c) for c in tr} & {_who(c) for c in va}


def test_the_earlier_split_is_still_the_segmenters_own(manifest):
    cases = read_manifest_csv(manifest)
    images, folds = segmenter_folds(cases, 4, 0, split="own")
    assert [c.case_id for c in images] == [c.case_id for c in cases if c.label in ("benign", "malignant", "normal")]
    assert (folds == patient_folds(images, 4, 0)).all()


def test_an_unknown_split_is_refused(manifest):
    with pytest.raises(InputError, match="Unknown split"):
        segmenter_folds(read_manifest_csv(manifest), 4, 0, split="random")


def test_appended_synthetic_images_leave_the_real_patients_folds_alone(manifest):
    """scripts/retrain_models.sh fine-tunes the segmenter on the real manifest plus a "synthetic" dataset: the real
    patients must keep their folds there, or patients held out before would be trained on."""
    from BreastDLRLib.synthetic import make_dataset_2d

    cases = read_manifest_csv(manifest)
    extra = read_manifest_csv(make_dataset_2d(12, 9, manifest.parent / "extra", shape=(64, 64), spacing_mm=0.25))
    for c in extra:
        c.dataset = "synthetic"
    _, alone = segmenter_folds(cases, 4, 0)
    images, mixed = segmenter_folds(cases + extra, 4, 0)
    assert (mixed[: len(alone)] == alone).all() and [c.case_id for c in images[: len(alone)]] == [c.case_id for c in cases]


@pytest.mark.slow
def test_the_shipped_segmenter_never_trained_on_the_classifiers_held_out_patients(shared_data):
    """On the real data: the shipped segmenter's own held-out fold holds every patient of the shipped classifiers'
    held-out fold (scripts/classifier_end_to_end.py measures `predict` there)."""
    seg = json.loads((REPO / "Resources/Models/breastdlr-segmenter-2d/manifest.json").read_text())["provenance"]["config"]
    bm = json.loads((REPO / "Resources/Models/breastdlr-malignancy-2d/manifest.json").read_text())
    clf = bm["provenance"]["config"]
    assert seg.get("split") == "shared" and set(bm["metrics"]["multitask"]) == {"malignancy", "risk"}   # --task both
    cases = read_manifest_csv(shared_data / "breast-us" / "manifest.csv")
    k, seed = clf["folds"], split_seed_of(clf)
    assert (seg["folds"], seg["seed"]) == (k, seed)
    _, va = segmenter_split(cases, seg["folds"], seg["seed"], seg["val_fold"], seg["split"])
    held = _classifier_held_out(cases, k, seed)[clf["val_fold"]]
    assert len(held) > 300 and held <= {_who(c) for c in va}


def test_training_folds_restrict_training_and_keep_the_validation_fold(manifest):
    """--train-folds (out-of-fold outlines for scripts/segmenter_views.py): training uses only the folds named,
    validation stays the whole validation fold, and a fold list that takes in the validation fold is refused."""
    from BreastDLRLib.training.splits import parse_folds

    cases = read_manifest_csv(manifest)
    images, folds = segmenter_folds(cases, 4, 0)
    tr, va = segmenter_split(cases, 4, 0, 3, train_folds=parse_folds("1, 2", 4, 3))
    fold_of = {c.case_id: int(f) for c, f in zip(images, folds)}
    assert tr and {fold_of[c.case_id] for c in tr} == {1, 2}
    assert [c.case_id for c in va] == [c.case_id for c in segmenter_split(cases, 4, 0, 3)[1]]
    assert parse_folds("", 4, 3) is None
    for bad in ("1,3", "0,7", "a"):
        with pytest.raises(InputError, match="Training folds"):
            parse_folds(bad, 4, 3)
