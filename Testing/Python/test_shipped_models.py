"""The models shipped in Resources/Models: verified, documented, and doing their job on the bundled samples.

These are regression checks on real files, not accuracy measurements (the model cards hold those, measured on
held-out patients): the real sample image belongs to the public data the models were trained on.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from BreastDLRLib.bundles import list_bundles, open_bundle, read_manifest, sha256_file
from BreastDLRLib.io import read_mask, read_volume
from BreastDLRLib.morphology import FEATURE_NAMES
from BreastDLRLib.pipeline import OPTIONAL_ROLES, Pipeline
from BreastDLRLib.resources import resources_dir
from BreastDLRLib.segmentation import SliceSegmenter
from BreastDLRLib.training.segmenter import dice_scores

MODELS = resources_dir() / "Models"
SAMPLES = resources_dir() / "Samples"
ROLES = {"segmenter", "malignancy", "risk", "fusion", "abvs-malignancy", "morphology-malignancy", "morphology-risk"}


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_paths(None, device="cpu", roles=("segmenter", "malignancy"), optional_roles=OPTIONAL_ROLES)


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


def test_segmenter_drops_thin_sheets_in_a_volume(pipe):
    """The shipped segmenter declares a 2 mm minimum thickness for volume lesions, and the pipeline applies it:
    on this synthetic ABVS volume (0.5 mm slices) the one lesion is found, and the flat false positives that
    the slice-by-slice network leaves on one to three slices are gone."""
    from BreastDLRLib.lesions import find_lesions
    from BreastDLRLib.synthetic import make_volume

    assert open_bundle(MODELS / "breastdlr-segmenter-2d").thresholds["min_lesion_extent_mm"] == 2.0
    case = make_volume(seed=103, shape_kji=(160, 256, 256), spacing=(0.2, 0.2, 0.5))
    res = pipe.segment(case.image)
    thickness = [min((b - a) * s for (a, b), s in zip(lr.lesion.bbox_kji, (0.5, 0.2, 0.2))) for lr in res.lesions]
    assert res.lesions and min(thickness) >= 2.0
    truth = case.mask.array > 0
    assert truth.any() and (res.labels.array[truth] > 0).any(), "the lesion was lost"
    _, unfiltered = find_lesions(res.probability, min_size_mm3=20.0)
    assert len(unfiltered) > len(res.lesions)   # there were thin ones to drop


def test_the_segmenter_flags_an_outline_it_is_unsure_of(pipe, shared_data):
    """A held-out BUSI image (fold 0: the segmenter never trained on it) where the segmenter's outline misses most
    of the reader's lesion is flagged for checking; the bundled sample, outlined well, is not."""
    vol = read_volume(shared_data / "breast-us" / "busi" / "images" / "busi_malignant_075.png")
    truth = read_mask(shared_data / "breast-us" / "busi" / "masks" / "busi_malignant_075_mask.png", like=vol)[0] > 0
    res = pipe.segment(vol)
    lr = res.lesions[0]
    assert lr.outline_uncertain and lr.lesion.mean_probability < 0.9
    assert any("outline is uncertain" in n for n in lr.notes)
    found = lr.lesion.full_mask(vol.shape)[0]
    assert dice_scores(found, truth)[0] < 0.5      # the flag is right here: the outline is poor
    sample = pipe.segment(read_volume(SAMPLES / "breast_us_sample.png", spacing=0.109768))
    assert sample.lesions and not sample.lesions[0].outline_uncertain


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


def test_a_reader_outline_is_scored_with_its_morphology_and_the_segmenters_is_not(pipe):
    vol = read_volume(SAMPLES / "breast_us_sample.png", spacing=0.109768)
    drawn = vol.with_array(read_mask(SAMPLES / "breast_us_sample_mask.png", vol))
    auto = pipe.analyze(vol, birads="4a", explain=False).lesions[0]
    assert auto.outline == "segmenter" and "malignancy_morphology" not in auto.probabilities
    reader = pipe.analyze(vol, birads="4a", explain=False, outline=drawn).lesions[0]
    p, th = reader.probabilities, reader.thresholds
    assert reader.outline == "reader" and set(reader.features) == set(FEATURE_NAMES)
    # the morphology head, by hand: [logit(image probability), features] through its stored linear model
    head = json.loads((MODELS / "breastdlr-morphology-malignancy" / "head.json").read_text())["state"]
    x = np.r_[np.log(p["malignancy"] / (1 - p["malignancy"])), [reader.features[n] for n in FEATURE_NAMES]]
    z = ((x - head["mean_"]) / head["scale_"]) @ np.asarray(head["coef_"][0]) + head["intercept_"][0]
    assert p["malignancy_morphology"] == pytest.approx(1 / (1 + np.exp(-z)), rel=1e-9)
    assert 0 <= p["high_risk_morphology"] <= 1
    # decisions use the morphology probabilities and thresholds; the image models keep theirs beside them
    mal = open_bundle(MODELS / "breastdlr-morphology-malignancy")
    assert th["malignancy"] == mal.thresholds["probability"] and th["malignancy_image"] == 0.5
    assert Pipeline.decision_probability(reader) == p["malignancy_morphology"]
    assert reader.recommendation.p_high_risk == pytest.approx(p["high_risk_morphology"])
    assert "malignancy_fused" not in p   # the age head was fitted on image scores alone


def test_a_reader_outline_on_another_grid_or_empty_is_refused(pipe):
    vol = read_volume(SAMPLES / "breast_us_sample.png")
    with pytest.raises(Exception, match="another image"):
        pipe.analyze(vol, outline=read_volume(SAMPLES / "synthetic_image_mask.png"))
    with pytest.raises(Exception, match="empty"):
        pipe.analyze(vol, outline=vol.with_array(np.zeros(vol.shape, np.uint8)))


def test_predict_with_manifest_outlines(shared_data, tmp_path):
    import csv

    from BreastDLRLib.batch import predict_manifest

    src = shared_data / "breast-us" / "manifest.csv"
    rows = list(csv.DictReader(open(src, newline="")))
    pick = [r for r in rows if r["dataset"] == "breastlesions" and r["label"] in ("benign", "malignant")][:2]
    pick += [r for r in rows if r["dataset"] == "busi" and r["label"] == "normal"][:1]     # an empty mask
    for r in pick:
        r["image"] = str(src.parent / r["image"])
        r["mask"] = str(src.parent / r["mask"]) if r["mask"] else ""
    man = tmp_path / "m.csv"
    with open(man, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(pick[0]))
        w.writeheader()
        w.writerows(pick)
    predict_manifest(man, tmp_path / "reader.csv", device="cpu", outline="manifest")
    predict_manifest(man, tmp_path / "auto.csv", device="cpu")
    reader = list(csv.DictReader(open(tmp_path / "reader.csv")))
    auto = list(csv.DictReader(open(tmp_path / "auto.csv")))
    assert [r["outline"] for r in reader] == ["reader", "reader", "segmenter"]
    assert [r["outline"] for r in auto] == ["segmenter"] * 3
    assert all(r["error"] == "" for r in reader + auto)
    assert reader[2]["probability_malignant"] == auto[2]["probability_malignant"]    # fell back to the segmenter
    pipe = Pipeline.from_paths(None, device="cpu", roles=("segmenter", "malignancy"), optional_roles=OPTIONAL_ROLES)
    for r, row in zip(reader[:2], pick):   # the reader's outline went through the morphology head
        vol = read_volume(row["image"])
        lr = pipe.analyze(vol, explain=False, outline=vol.with_array(read_mask(row["mask"], vol))).lesions[0]
        assert float(r["probability_malignant"]) == pytest.approx(lr.probabilities["malignancy_morphology"], abs=1e-6)
        assert float(r["probability_high_risk"]) == pytest.approx(lr.probabilities["high_risk_morphology"], abs=1e-6)
    # optional_roles=("risk",): the image models alone, no morphology head even on the readers' outlines
    predict_manifest(man, tmp_path / "image.csv", device="cpu", outline="manifest", optional_roles=("risk",))
    image = list(csv.DictReader(open(tmp_path / "image.csv")))
    for r, row in zip(image[:2], pick):
        vol = read_volume(row["image"])
        lr = pipe.analyze(vol, explain=False, outline=vol.with_array(read_mask(row["mask"], vol))).lesions[0]
        assert float(r["probability_malignant"]) == pytest.approx(lr.probabilities["malignancy"], abs=1e-6)
        assert float(r["probability_high_risk"]) == pytest.approx(lr.probabilities["high_risk"], abs=1e-6)


def test_a_stray_speck_in_the_outline_is_scored_by_the_image_models_alone(pipe):
    vol = read_volume(SAMPLES / "breast_us_sample.png", spacing=0.109768)
    drawn = read_mask(SAMPLES / "breast_us_sample_mask.png", vol).copy()
    drawn[0, 2:4, 2:4] = 1        # 4 pixels far from the lesion
    res = pipe.analyze(vol, explain=False, outline=vol.with_array(drawn))
    big, speck = res.lesions
    assert big.lesion.voxels > 1000 and speck.lesion.voxels == 4
    assert "malignancy_morphology" in big.probabilities and "malignancy_morphology" not in speck.probabilities
    assert any("at least 16" in n and "image models alone" in n for n in speck.notes)
    assert speck.thresholds["malignancy"] != big.thresholds["malignancy"]   # the speck keeps the image/fusion threshold


def test_a_volume_outline_is_used_but_not_scored_by_the_2d_morphology_models(pipe):
    vol = read_volume(SAMPLES / "synthetic_abvs.nrrd")
    truth = read_mask(SAMPLES / "synthetic_abvs_label.nrrd", vol)
    res = pipe.analyze(vol, explain=False, outline=vol.with_array(truth))
    assert res.lesions and all(lr.outline == "reader" for lr in res.lesions)
    assert sum(lr.lesion.voxels for lr in res.lesions) == int((truth > 0).sum())
    assert all("malignancy_morphology" not in lr.probabilities for lr in res.lesions)
    assert any("describes 2D outlines" in n for n in res.lesions[0].notes)


def test_a_morphology_bundle_with_other_features_is_refused(tmp_path):
    from BreastDLRLib.bundles import save_head_bundle
    from BreastDLRLib.errors import ModelBundleError

    src = open_bundle(MODELS / "breastdlr-morphology-malignancy")
    manifest = json.loads((src.path / "manifest.json").read_text())
    manifest["input"]["features"] = manifest["input"]["features"][:1] + list(reversed(manifest["input"]["features"][1:]))
    head = json.loads((src.path / "head.json").read_text())
    other = save_head_bundle(tmp_path / "other", head, manifest, "card").path
    p = Pipeline.from_paths([str(other)], device="cpu", roles=("segmenter", "malignancy"))
    vol = read_volume(SAMPLES / "breast_us_sample.png")
    with pytest.raises(ModelBundleError, match="other outline features"):
        p.analyze(vol, explain=False, outline=vol.with_array(read_mask(SAMPLES / "breast_us_sample_mask.png", vol)))


def test_breastdlrs_own_outline_handed_back_unedited_gets_no_morphology(pipe):
    vol = read_volume(SAMPLES / "breast_us_sample.png", spacing=0.109768)
    drawn = vol.with_array(read_mask(SAMPLES / "breast_us_sample_mask.png", vol))
    res = pipe.analyze(vol, explain=False, outline=drawn, outline_source="segmenter")
    lr = res.lesions[0]
    assert lr.outline == "segmenter" and "malignancy_morphology" not in lr.probabilities
    assert lr.lesion.voxels == int(drawn.array.sum())          # the outline given is still the lesion
    assert any("unedited" in n for n in res.clinical_notes)


def test_the_report_shows_a_reader_outline_and_its_features(tmp_path):
    from BreastDLRLib.cli import main

    out = tmp_path / "o"
    assert main(["analyze", str(SAMPLES / "breast_us_sample.png"), "--outline", str(SAMPLES / "breast_us_sample_mask.png"),
                 "--out", str(out), "--no-explain", "--device", "cpu", "--quiet"]) == 0
    findings = json.loads((out / "findings.json").read_text())
    (les,) = findings["lesions"]
    assert les["outline"] == "reader" and set(les["outline_features"]) == set(FEATURE_NAMES)
    html = (out / "report.html").read_text()
    assert "image + reader&#x27;s outline" in html or "image + reader's outline" in html
    assert "Outline features" in html and all(f"<th>{n}</th>" in html for n in FEATURE_NAMES)


def test_no_missing_value_note_when_no_model_used_the_clinical_values(pipe):
    vol = read_volume(SAMPLES / "breast_us_sample.png", spacing=0.109768)
    auto = pipe.analyze(vol, explain=False)                  # the age head applies: its missing-age rule matters
    assert any("age missing" in n for n in auto.clinical_notes)
    drawn = vol.with_array(read_mask(SAMPLES / "breast_us_sample_mask.png", vol))
    reader = pipe.analyze(vol, explain=False, outline=drawn)  # morphology instead: no model used age
    assert not any("age missing" in n for n in reader.clinical_notes)


def test_the_unedited_outline_note_stays_when_no_model_used_the_clinical_values(pipe):
    vol = read_volume(SAMPLES / "synthetic_abvs.nrrd")         # ABVS model: the age head does not apply
    truth = vol.with_array(read_mask(SAMPLES / "synthetic_abvs_label.nrrd", vol))
    notes = pipe.analyze(vol, explain=False, outline=truth, outline_source="segmenter").clinical_notes
    assert any("unedited" in n for n in notes) and not any("age missing" in n for n in notes)


def test_an_installed_optional_model_that_fails_its_checks_is_an_error_not_left_out(tmp_path, monkeypatch):
    """The shipped models copied elsewhere: with BM's weights file altered, the risk model that takes its trunk from
    it is refused with a message naming BM, instead of the pipeline quietly running without a risk model; an
    optional model that is not installed at all is simply left out."""
    import shutil

    from BreastDLRLib.errors import ModelBundleError

    src = Path(__file__).resolve().parents[2] / "Resources" / "Models"
    models = tmp_path / "Resources" / "Models"
    models.mkdir(parents=True)
    for name in ("breastdlr-segmenter-2d", "breastdlr-malignancy-2d", "breastdlr-risk-2d", "models.json"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy2)(src / name, models / name)
    monkeypatch.setenv("BREASTDLR_RESOURCES", str(tmp_path / "Resources"))
    pipe = Pipeline.from_paths(None, device="cpu", roles=("segmenter",), optional_roles=("risk", "fusion"))
    assert set(pipe.bundles) == {"segmenter", "risk"}                  # fusion is not installed here: left out
    assert pipe.risk_shares_trunk is False                             # no malignancy model was asked for
    data = bytearray((models / "breastdlr-malignancy-2d" / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (models / "breastdlr-malignancy-2d" / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelBundleError, match="breastdlr-malignancy-2d"):
        Pipeline.from_paths(None, device="cpu", roles=("segmenter",), optional_roles=("risk",))


def test_the_shipped_bm_and_lh_are_three_seed_ensembles_on_shared_trunks():
    """BM and LH ship as ensembles of three networks trained with seeds 0-2 (docs/researchers.md): LH's members
    load their trunks and embeddings from BM's member files, the members are different networks, the ensemble's
    probability is the mean of its members', and LH's head on BM's embedding (what the pipeline runs, one trunk
    pass for both) gives LH's own probability."""
    import torch

    bm_bundle, lh_bundle = open_bundle(MODELS / "breastdlr-malignancy-2d"), open_bundle(MODELS / "breastdlr-risk-2d")
    assert [m["seed"] for m in bm_bundle.manifest["metrics"]["members"]] == [0, 1, 2]
    bm, lh = bm_bundle.model("cpu").eval(), lh_bundle.model("cpu").eval()
    assert len(bm.members) == len(lh.members) == 3
    for mb, ml in zip(bm.members, lh.members):
        sb, sl = mb.state_dict(), ml.state_dict()
        shared = [k for k in sb if k.startswith(("trunk.", "embedding."))]
        assert shared and all(torch.equal(sb[k], sl[k]) for k in shared)
    first = bm.members[0].state_dict()
    assert not any(torch.equal(first[k], bm.members[1].state_dict()[k]) for k in first if k.endswith("weight")
                   and k.startswith("embedding."))
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = torch.softmax(bm(x), 1)
        mean = torch.stack([torch.softmax(m(x).float(), 1) for m in bm.members]).mean(0)
        assert torch.allclose(p, mean, atol=1e-5)
        q = torch.softmax(lh(x), 1)
        q_shared = torch.softmax(lh.classifier(bm.embed(x)).float(), 1)
        assert torch.allclose(q, q_shared, atol=1e-4)
        assert not torch.allclose(p, q, atol=1e-3)                 # two tasks, not one head twice
