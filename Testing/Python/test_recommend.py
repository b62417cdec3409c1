"""Two-stage BI-RADS 4A re-stratification (Lu et al. 2025): truth table, threshold boundaries, other
grades, missing scores, input validation and the text shown to clinicians."""
from __future__ import annotations

import math

import pytest

from BreastDLRLib.errors import ClinicalInputError
from BreastDLRLib.recommend import NOTE, Recommendation, normalise_birads, recommend


@pytest.mark.parametrize("p_risk,p_mal,out,action", [
    (0.2, 0.1, "3", "downgrade"),   # low risk, benign
    (0.8, 0.9, "4b", "upgrade"),    # high risk, malignant
    (0.8, 0.1, "4a", "keep"),       # high risk, benign
    (0.2, 0.9, "4a", "keep"),       # low risk, malignant
])
def test_truth_table_for_4a(p_risk, p_mal, out, action):
    r = recommend("4a", p_risk, p_mal)
    assert isinstance(r, Recommendation)
    assert (r.birads_in, r.birads_out, r.action) == ("4a", out, action)


@pytest.mark.parametrize("t_risk,t_mal", [(0.5, 0.5), (0.3, 0.7), (0.05, 0.95)])
def test_threshold_boundaries(t_risk, t_mal):
    below_r, below_m = math.nextafter(t_risk, 0.0), math.nextafter(t_mal, 0.0)
    kw = {"risk_threshold": t_risk, "malignancy_threshold": t_mal}
    assert recommend("4a", below_r, below_m, **kw).action == "downgrade"
    assert recommend("4a", t_risk, t_mal, **kw).action == "upgrade"  # equal to the threshold = high / malignant
    assert recommend("4a", t_risk, below_m, **kw).action == "keep"
    assert recommend("4a", below_r, t_mal, **kw).action == "keep"
    # the same scores flip when only the thresholds move
    assert recommend("4a", t_risk, t_mal, risk_threshold=min(1.0, t_risk + 0.01), malignancy_threshold=min(1.0, t_mal + 0.01)).action == "downgrade"


def test_extreme_probabilities_are_valid():
    assert recommend("4a", 0.0, 0.0).action == "downgrade"
    assert recommend("4a", 1.0, 1.0).action == "upgrade"


@pytest.mark.parametrize("grade", ["0", "1", "2", "3", "4", "4b", "4C", "5", "6", "BI-RADS 5"])
def test_other_grades_are_not_applicable(grade):
    r = recommend(grade, 0.1, 0.1)
    assert r.action == "not applicable" and r.birads_out is None
    assert r.birads_in == normalise_birads(grade)
    assert f"BI-RADS {normalise_birads(grade).upper()}" in r.rule and "4A lesions only" in r.rule


@pytest.mark.parametrize("p_risk,p_mal,missing", [
    (None, 0.3, "high-risk probability is missing"),
    (0.3, None, "malignancy probability is missing"),
    (None, None, "high-risk probability and malignancy probability are missing"),
])
def test_missing_scores_are_not_applicable(p_risk, p_mal, missing):
    r = recommend("4A", p_risk, p_mal)
    assert r.action == "not applicable" and r.birads_out is None and r.birads_in == "4a"
    assert missing in r.rule and missing in r.text


def test_no_grade_is_not_applicable():
    for grade in (None, "", "  "):
        r = recommend(grade, 0.1, 0.1)
        assert r.action == "not applicable" and r.birads_in is None and "no BI-RADS grade" in r.rule


@pytest.mark.parametrize("text,expected", [
    ("4a", "4a"), ("4A", "4a"), ("BI-RADS 4A", "4a"), ("bi-rads 4a", "4a"), ("BIRADS4A", "4a"),
    ("BI-RADS: 4 a", "4a"), (" 3 ", "3"), ("4", "4"), ("BI-RADS category 5", "5"), (None, None), ("", None),
])
def test_normalise_birads(text, expected):
    assert normalise_birads(text) == expected


@pytest.mark.parametrize("text", ["4d", "7", "5a", "benign", "BI-RADS", "44"])
def test_normalise_birads_refuses_non_categories(text):
    with pytest.raises(ClinicalInputError, match="not a BI-RADS category"):
        normalise_birads(text)
    with pytest.raises(ClinicalInputError):
        recommend(text, 0.1, 0.1)


@pytest.mark.parametrize("kwargs", [
    {"p_high_risk": 1.2}, {"p_high_risk": -0.01}, {"p_malignant": float("nan")}, {"p_malignant": float("inf")},
    {"risk_threshold": 1.5}, {"malignancy_threshold": -0.1}, {"p_malignant": True},
])
def test_invalid_probabilities_raise_value_error(kwargs):
    args = {"birads": "4a", "p_high_risk": 0.3, "p_malignant": 0.3, **kwargs}
    with pytest.raises(ValueError):
        recommend(**args)


def test_text_states_scores_thresholds_rule_and_note():
    r = recommend("BI-RADS 4A", 0.23, 0.12, risk_threshold=0.4, malignancy_threshold=0.35)
    assert "0.23" in r.text and "0.12" in r.text and "0.40" in r.text and "0.35" in r.text
    assert "low risk" in r.text and "benign" in r.text
    assert r.rule in r.text and "downgrade" in r.rule and "BI-RADS 3" in r.text
    assert r.text.endswith(NOTE) and r.note == NOTE == "Research use only; not a substitute for clinical judgement."
    assert NOTE in recommend("5", 0.1, 0.1).text
    assert (r.p_high_risk, r.p_malignant, r.risk_threshold, r.malignancy_threshold) == (0.23, 0.12, 0.4, 0.35)


def test_text_never_prints_a_score_equal_to_its_threshold_when_they_differ():
    r = recommend("4a", 0.4999, 0.5)
    assert "0.4999" in r.text and "low risk" in r.text and "malignant" in r.text and r.action == "keep"


def test_to_dict_has_the_findings_contract_keys():
    d = recommend("4a", 0.9, 0.9).to_dict()
    assert set(d) == {"birads_in", "birads_out", "action", "rule", "text"}
    assert (d["birads_in"], d["birads_out"], d["action"]) == ("4a", "4b", "upgrade")
