"""scripts/train_segmenter.py and scripts/segmenter_heldout.py --declare, as scripts/retrain_models.sh runs them,
on a tiny synthetic manifest (32-pixel network, one epoch): the bundle holds out the classifiers' patients, and the
mirror is declared in its manifest and card with figures recomputed here."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from BreastDLRLib.bundles import open_bundle
from BreastDLRLib.training.data import read_manifest_csv
from BreastDLRLib.training.splits import segmenter_split

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _run(script: str, *args: str) -> None:
    argv = sys.argv
    sys.argv = [str(SCRIPTS / script), *args]
    try:
        runpy.run_path(str(SCRIPTS / script), run_name="__main__")
    finally:
        sys.argv = argv


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from BreastDLRLib.synthetic import make_dataset_2d

    folder = tmp_path_factory.mktemp("segscripts")
    manifest = make_dataset_2d(24, 11, folder / "data", shape=(96, 96), spacing_mm=0.25)
    out = folder / "seg"
    _run("train_segmenter.py", "--manifest", str(manifest), "--out", str(out), "--work", str(folder / "work"),
         "--size", "32", "--epochs", "1", "--threads", "1", "--folds", "2", "--card-command", "bash retrain.sh (test)")
    return manifest, out


@pytest.mark.slow
def test_the_trained_segmenter_records_the_shared_split(trained):
    manifest, out = trained
    b = open_bundle(out)
    cfg = b.manifest["provenance"]["config"]
    assert cfg["split"] == "shared" and b.manifest["provenance"]["command"] == "bash retrain.sh (test)"
    _, va = segmenter_split(read_manifest_csv(manifest), 2, 0, 0)
    assert b.manifest["metrics"]["val_images"] == len(va)
    card = (out / "MODEL_CARD.md").read_text()
    assert "The folds are the classifiers'" in card and "`bash retrain.sh (test)`" in card
    assert "test_time_augmentation" not in b.manifest["input"]     # not declared before it is measured


@pytest.mark.slow
def test_declare_writes_the_measured_mirror_into_manifest_and_card(trained, tmp_path, capsys):
    from BreastDLRLib.io import read_mask, read_volume
    from BreastDLRLib.pipeline import Pipeline

    manifest, out = trained
    sha = open_bundle(out).manifest["weights"]["sha256"]
    for _ in range(2):                                       # declaring twice replaces the card's section
        _run("segmenter_heldout.py", "--manifest", str(manifest), "--bundle", str(out), "--declare",
             "--out", str(tmp_path / "h.json"))
    b = open_bundle(out)                                     # still verifies; weights untouched
    assert b.manifest["weights"]["sha256"] == sha
    assert b.manifest["input"]["test_time_augmentation"] == ["hflip"]
    fig = b.manifest["metrics"]["full_resolution_heldout"]
    card = (out / "MODEL_CARD.md").read_text()
    assert card.count("**Test-time augmentation (single images).**") == 1
    assert f"**{fig['dice_mean_hflip']:.3f}**" in card
    # recompute the mean Dice with the mirror on the held-out images with a lesion, through the product's pipeline
    _, va = segmenter_split(read_manifest_csv(manifest), 2, 0, 0)
    pipe = Pipeline({"segmenter": b}, device="cpu")
    dices = []
    for c in va:
        sp = c.row.get("pixel_spacing_mm") or None
        vol = read_volume(c.image, spacing=float(sp) if sp else None)
        truth = read_mask(c.mask, like=vol) > 0 if c.mask is not None else None
        if truth is None or not truth.any():
            continue
        pred = pipe.segment(vol).labels.array > 0
        dices.append(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
    assert fig["lesion_images"] == len(dices) > 0
    assert fig["dice_mean_hflip"] == pytest.approx(float(np.mean(dices)), abs=1e-4)
    assert json.loads((tmp_path / "h.json").read_text())["results"]["hflip"]["lesion_images"] == len(dices)
