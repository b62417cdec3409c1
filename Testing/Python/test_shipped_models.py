"""The models shipped in Resources/Models: verified, documented, and doing their job on the bundled samples.

These are regression checks on real files, not accuracy measurements (the model cards hold those, measured on
held-out patients): the real sample image belongs to the public data the models were trained on.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from BreastDLRLib.bundles import list_bundles, open_bundle, read_manifest, sha256_file
from BreastDLRLib.io import read_mask, read_volume
from BreastDLRLib.pipeline import Pipeline
from BreastDLRLib.resources import resources_dir
from BreastDLRLib.segmentation import SliceSegmenter
from BreastDLRLib.training.segmenter import dice_scores

MODELS = resources_dir() / "Models"
SAMPLES = resources_dir() / "Samples"
ROLES = {"segmenter", "malignancy", "risk", "fusion", "abvs-malignancy"}


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_paths(None, device="cpu", roles=("segmenter", "malignancy"),
                               optional_roles=("risk", "abvs-malignancy", "fusion"))


def test_every_shipped_bundle_verifies_and_is_indexed():
    index = json.loads((MODELS / "models.json").read_text())
    entries = {e["folder"]: e for e in index["models"]}
    found = list_bundles()
    assert {b["role"] for b in found} == ROLES
    for b in found:
        folder = MODELS / b["name"]
        e = entries[folder.name]
        assert e["manifest_sha256"] == sha256_file(folder / "manifest.json")
        bundle = open_bundle(folder)
        bundle.model("cpu")  # builds and loads strictly
        card = (folder / "MODEL_CARD.md").read_text()
        assert "Research use only" in card and "Retrain" in card
        m = read_manifest(folder)
        assert m["intended_use"].startswith("Research use only") and m["metrics"]


def test_segmenter_on_the_real_sample(pipe):
    vol = read_volume(SAMPLES / "breast_us_sample.png", spacing=0.109768)
    truth = read_mask(SAMPLES / "breast_us_sample_mask.png", like=vol)
    res = pipe.segment(vol)
    assert res.lesions, "no lesion found on the sample"
    pred = res.labels.array > 0
    assert dice_scores(pred, truth.astype(bool))[0] >= 0.6


def test_bf16_matches_fp32_within_the_stated_tolerance():
    """The segmenter's manifest enables bf16 on the CPU only if validation masks agreed (mean Dice >= 0.98);
    on the two samples the masks must agree with Dice >= 0.97."""
    bundle = open_bundle(MODELS / "breastdlr-segmenter-2d")
    for name, spacing in (("breast_us_sample.png", 0.109768), ("synthetic_image.png", 0.1)):
        vol = read_volume(SAMPLES / name, spacing=spacing)
        a = SliceSegmenter.from_bundle(bundle, device="cpu", bf16=False)(vol).probability.array > 0.5
        b = SliceSegmenter.from_bundle(bundle, device="cpu", bf16=True)(vol).probability.array > 0.5
        assert dice_scores(a[None], b[None])[0] >= 0.97, name


def test_bf16_is_used_only_where_the_manifest_and_the_cpu_allow(monkeypatch):
    """bf16 emulated on a CPU without native bf16 is about 10x slower than fp32: the manifest's bf16_cpu applies
    only on CPUs with native bf16 (BREASTDLR_BF16 stands in for the detection here)."""
    from BreastDLRLib.segmentation import cpu_has_fast_bf16

    bundle = open_bundle(MODELS / "breastdlr-segmenter-2d")
    assert bundle.manifest["inference"]["bf16_cpu"] is True
    monkeypatch.setenv("BREASTDLR_BF16", "0")
    assert not cpu_has_fast_bf16() and not SliceSegmenter.from_bundle(bundle, device="cpu").bf16
    monkeypatch.setenv("BREASTDLR_BF16", "1")
    assert cpu_has_fast_bf16() and SliceSegmenter.from_bundle(bundle, device="cpu").bf16
    assert not SliceSegmenter.from_bundle(bundle, device="cpu", bf16=False).bf16      # an explicit choice wins


def test_analyze_the_synthetic_abvs_sample(pipe):
    vol = read_volume(SAMPLES / "synthetic_abvs.nrrd")
    truth = read_volume(SAMPLES / "synthetic_abvs_label.nrrd").array
    res = pipe.analyze(vol, clinical={"age": 52}, birads="4a")
    assert res.lesions
    hits = [lr for lr in res.lesions if truth[lr.lesion.full_mask(vol.shape)].any()]
    assert hits, "no detected lesion overlaps a true lesion"
    lr = hits[0]
    assert set(lr.crops) == {"transverse", "sagittal", "coronal"}  # the three-plane model was used
    assert 0 <= lr.probabilities["malignancy"] <= 1
    # the fusion head was fitted on the 2D model's scores: not applied to the three-plane model's, and said so
    assert "malignancy_fused" not in lr.probabilities and lr.thresholds["malignancy"] == 0.5
    assert any("was not applied" in n for n in res.clinical_notes)
    assert lr.recommendation.action in ("downgrade", "keep", "upgrade")
    assert res.heatmap.array.max() > 0


def test_age_changes_the_fused_probability(pipe):
    vol = read_volume(SAMPLES / "breast_us_sample.png", spacing=0.109768)
    res = pipe.analyze(vol, clinical={"age": 25}, explain=False)
    young, th = res.lesions[0].probabilities, res.lesions[0].thresholds
    fusion = open_bundle(MODELS / "breastdlr-fusion-age")
    # the decision threshold is the fusion head's rule-out point; the image model keeps its own beside it
    assert th["malignancy"] == fusion.thresholds["probability"] < 0.5 and th["malignancy_image"] == 0.5
    old = pipe.analyze(vol, clinical={"age": 80}, explain=False).lesions[0].probabilities
    assert young["malignancy"] == pytest.approx(old["malignancy"])  # the image model ignores age
    assert young["malignancy_fused"] != pytest.approx(old["malignancy_fused"])   # applied: fitted on this model
    with pytest.raises(Exception, match="age"):
        pipe.analyze(vol, clinical={"age": 150})
