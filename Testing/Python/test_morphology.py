"""Handcrafted outline features, the linear fusion head and the two-stage morphology fit.

Feature checks use drawn shapes whose answer is known from geometry (a disc is round and convex, a star is not,
a tall ellipse is taller than wide, a dark lesion over a dark band shadows); the fit checks use synthetic data whose
signal is known.  Real outlines are covered by the shipped-model tests.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from BreastDLRLib.clinical import LinearFusionHead, head_from_dict, head_to_dict
from BreastDLRLib.errors import InputError
from BreastDLRLib.evaluation import roc_auc, rule_out_threshold
from BreastDLRLib.morphology import FEATURE_NAMES, feature_vector, head_inputs, lesion_features, logit
from BreastDLRLib.training.morphology import fit_morphology_head, outline_features, train_rows

H = W = 200


def disc(cy=100, cx=100, r=30):
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def ellipse(ry, rx, cy=100, cx=100):
    yy, xx = np.mgrid[:H, :W]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def star(r0=30, amp=12, spikes=9, cy=100, cx=100):
    yy, xx = np.mgrid[:H, :W]
    th = np.arctan2(yy - cy, xx - cx)
    return np.hypot(yy - cy, xx - cx) <= r0 + amp * np.cos(spikes * th)


def scene(mask, inside=40.0, outside=140.0, below=None, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((H, W), outside) + rng.normal(0, 8, (H, W))
    img[mask] = inside + rng.normal(0, 8, mask.sum())
    if below is not None:      # a band under the lesion, as wide as it: shadow (dark) or enhancement (bright)
        ys, xs = np.nonzero(mask)
        img[ys.max() + 1:ys.max() + 40, xs.min():xs.max() + 1] = below
    return np.clip(img, 0, 255).astype(np.uint8)


def test_a_disc_is_round_convex_and_not_taller_than_wide():
    f = lesion_features(scene(disc()), disc())
    assert set(f) == set(FEATURE_NAMES)
    assert f["circularity"] == pytest.approx(1.0, abs=0.08)
    assert f["solidity"] > 0.97 and f["aspect"] == pytest.approx(1.0, abs=0.05)
    assert f["radial_sd"] < 0.03 and f["eccentricity"] < 0.2
    assert f["extent"] == pytest.approx(np.pi / 4, abs=0.03)


def test_a_spiculated_star_has_a_worse_margin_than_a_disc():
    d, s = lesion_features(scene(disc()), disc()), lesion_features(scene(star()), star())
    assert s["solidity"] < d["solidity"] - 0.1
    assert s["circularity"] < d["circularity"] - 0.3
    assert s["radial_sd"] > 5 * d["radial_sd"] and s["fourier_high"] > d["fourier_high"]
    assert s["convex_perimeter_ratio"] < d["convex_perimeter_ratio"] - 0.1


def test_orientation_and_aspect_follow_the_long_axis():
    tall, wide = ellipse(40, 20), ellipse(20, 40)
    ft, fw = lesion_features(scene(tall), tall), lesion_features(scene(wide), wide)
    assert ft["aspect"] == pytest.approx(2.0, rel=0.05) and fw["aspect"] == pytest.approx(0.5, rel=0.05)
    assert ft["orientation_deg"] > 85 and fw["orientation_deg"] < 5
    assert ft["eccentricity"] == pytest.approx(np.sqrt(1 - 0.25), abs=0.02)


def test_echo_pattern_and_posterior_features():
    m = disc()
    hypo, hyper = lesion_features(scene(m, 40, 140), m), lesion_features(scene(m, 200, 100), m)
    assert hypo["echo_contrast"] < -0.5 and hyper["echo_contrast"] > 0.5
    shadow = lesion_features(scene(m, below=30.0), m)
    enhanced = lesion_features(scene(m, below=230.0), m)
    assert shadow["posterior"] < -0.5 and enhanced["posterior"] > 0.4
    assert abs(hypo["posterior"]) < 0.1   # nothing under it


def test_features_do_not_depend_on_grey_level_range_or_dtype():
    m = star()
    img = scene(m, seed=3)
    f8 = feature_vector(lesion_features(img, m))
    f16 = feature_vector(lesion_features(img.astype(np.uint16) * 200 + 1000, m))
    ffloat = feature_vector(lesion_features(img.astype(np.float32) / 255.0, m))
    np.testing.assert_allclose(f16, f8, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ffloat, f8, rtol=1e-5, atol=1e-6)


def test_the_largest_region_is_measured_and_holes_are_filled():
    m = disc()
    holed = m & ~disc(r=5)
    extra = holed | disc(cy=20, cx=20, r=4)
    np.testing.assert_allclose(feature_vector(lesion_features(scene(m), extra)),
                               feature_vector(lesion_features(scene(m), m)), rtol=1e-9)


@pytest.mark.parametrize("image,mask,message", [
    (np.zeros((H, W)) + np.arange(W), np.zeros((H, W), bool), "empty"),
    (np.zeros((H, W)) + np.arange(W), disc(r=1), "at least 16"),
    (np.zeros((H, W)) + np.arange(W), np.ones((H, W + 1), bool), "does not match"),
    (np.where(disc(), np.nan, 1.0), disc(), "invalid values"),
    (np.full((H, W), 7.0), disc(), "blank"),
    (np.zeros((2, H, W)), np.ones((2, H, W), bool), "2D"),
])
def test_bad_outlines_get_a_clear_error(image, mask, message):
    with pytest.raises(InputError, match=message):
        lesion_features(image, mask)


def test_linear_fusion_head_matches_scikit_learn_and_survives_json():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4)) * [1, 10, 0.1, 3] + [0, 5, 1, -2]
    y = (X[:, 0] + 0.1 * X[:, 1] + rng.normal(size=300) > 0.5).astype(int)
    head = LinearFusionHead(C=0.5).fit(X, y)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=5000)).fit(X, y)
    np.testing.assert_allclose(head.predict_proba(X), ref.predict_proba(X), atol=1e-6)
    again = head_from_dict(json.loads(json.dumps(head_to_dict(head))))
    np.testing.assert_array_equal(again.predict_proba(X), head.predict_proba(X))


def _synthetic(n, rng, shift=0.0):
    y = rng.integers(0, 2, n)
    feats = rng.normal(size=(n, 5)) + np.outer(y, [1.2, 0.0, -0.8, 0.0, 0.0]) + shift
    image_p = 1 / (1 + np.exp(-(1.0 * (2 * y - 1) + rng.normal(0, 1.5, n))))
    return feats, y, image_p


def test_two_stage_fit_folds_exactly_into_one_head_and_adds_the_features_signal():
    rng = np.random.default_rng(1)
    x_tr, y_tr, _ = _synthetic(600, rng)
    x_ho, y_ho, p_ho = _synthetic(300, rng)
    groups = [f"p{i // 2}" for i in range(300)]     # two lesions per patient
    fit = fit_morphology_head(x_tr, y_tr, logit(p_ho), x_ho, y_ho, groups)
    # folded head == stage 2 on [image logit, stage-1 score]
    a, b, c = fit.stage2
    z = a * logit(p_ho) + b * fit.features_only + c
    np.testing.assert_allclose(fit.head.predict_proba(head_inputs(p_ho, x_ho))[:, 1], 1 / (1 + np.exp(-z)), atol=1e-9)
    assert roc_auc(y_ho, fit.oof).auc > roc_auc(y_ho, p_ho).auc + 0.05
    assert a > 0 and b > 0


def test_rule_out_threshold_keeps_the_asked_sensitivity():
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.9])
    # sensitivity 1 needs every case (lowest 0.35) above: midway between 0.3 and 0.35
    assert rule_out_threshold(y, s, 1.0) == pytest.approx(0.325)
    # 0.75 allows one of four cases below: threshold midway between 0.4 and 0.6
    assert rule_out_threshold(y, s, 0.75) == pytest.approx(0.5)
    t = rule_out_threshold(y, s, 0.75)
    assert np.mean(s[y == 1] >= t) >= 0.75


def test_outline_features_of_real_cases_are_cached_and_skip_empty_masks(shared_data, tmp_path):
    from BreastDLRLib.training.data import read_manifest_csv

    cases = read_manifest_csv(shared_data / "breast-us" / "manifest.csv")
    pick = [c for c in cases if c.dataset == "breastlesions" and c.label in ("benign", "malignant")][:3]
    normal = [c for c in cases if c.dataset == "busi" and c.label == "normal"][:1]
    logs = []
    feats = outline_features(pick + normal, cache=tmp_path / "f.json", log=logs.append)
    assert set(feats) == {c.case_id for c in pick} and all(v.shape == (len(FEATURE_NAMES),) for v in feats.values())
    assert normal and "empty" in logs[0]
    again = outline_features(pick + normal, cache=tmp_path / "f.json", log=logs.append)
    assert len(logs) == 1 and all(np.array_equal(again[k], feats[k]) for k in feats)   # from the cache
    x, y, kept = train_rows(pick, feats, lambda c: c.malignant, {f"{pick[0].dataset}/{pick[0].patient_id}"})
    assert pick[0] not in kept and len(x) == len(y) == len(kept)
