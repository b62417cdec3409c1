"""``breastdlr evaluate --readers``: readers' BI-RADS grades as ordinal scores, and inter-reader agreement.

Every expected figure is worked out by hand in the comments; the kappa and AUC functions themselves are checked
against R (vcd, irr, pROC) in test_evaluation_stats.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_csv as _write

from BreastDLRLib.cli import main
from BreastDLRLib.evaluation import cohen_kappa, delong_test, fleiss_kappa, report
from BreastDLRLib.evaluation import readers as rd

# case, label, AI score, reader 1, reader 2, reader 3
CASES = [
    ("c1", "malignant", 0.90, "5", "4C", "BI-RADS 5"),
    ("c2", "malignant", 0.70, "4b", "4b", "4a"),
    ("c3", "malignant", 0.40, "4a", "3", "4b"),
    ("c4", "malignant", 0.60, "3", "4a", "4a"),
    ("c5", "benign", 0.55, "4a", "3", "3"),
    ("c6", "benign", 0.20, "3", "3", "3"),
    ("c7", "benign", 0.10, "2", "2", "3"),
    ("c8", "benign", 0.45, "4b", "4a", "4a"),
    ("c9", "benign", 0.30, "3", "4a", "3"),
    ("c10", "benign", 0.05, "2", "2", "2"),
]
# Reader 1 as ordinal scores: malignant 5, 4.3, 4.0, 3 against benign 4.0, 3, 2, 4.3, 3, 2 (24 pairs):
#   5 beats 6; 4B beats 5 and ties 1 (5.5); 4A beats 4 and ties 1 (4.5); 3 beats 2 and ties 2 (3) -> 19 / 24.
# Positive from 4A: c1 c2 c3 (malignant) and c5 c8 (benign) -> TP 3, FN 1, FP 2, TN 4.
# Positive from 4B: c1 c2 and c8 -> TP 2, FN 2, FP 1, TN 5.
# Reader 1 against reader 2, unweighted: same grade on c2 c6 c7 c10 -> po = 0.4; marginals (2, 3, 4A, 4B, 4C, 5)
#   reader 1: 2 3 2 2 0 1, reader 2: 2 3 3 1 1 0 -> pe = (4 + 9 + 6 + 2) / 100 = 0.21; kappa = 0.19 / 0.79.
# Positive call (from 4A), reader 1: c1 c2 c3 c5 c8; reader 2: c1 c2 c4 c8 c9 -> agree on c1 c2 c8 (positive) and
#   c6 c7 c10 (negative): po = 0.6, pe = 0.5 * 0.5 + 0.5 * 0.5 = 0.5 -> kappa 0.2.
# Fleiss over the three readers (Fleiss 1971): per-case agreement (sum n^2 - 3) / 6 is 1/3 for c1 c2 c4 c5 c7 c8
#   c9, 0 for c3, 1 for c6 c10 -> mean 13/30; category shares 5 10 8 4 1 2 of 30 -> pe = 210/900;
#   kappa = (13/30 - 7/30) / (1 - 7/30) = 6/23.
COUNTS = [[0, 0, 0, 0, 1, 2], [0, 0, 1, 2, 0, 0], [0, 1, 1, 1, 0, 0], [0, 1, 2, 0, 0, 0], [0, 2, 1, 0, 0, 0],
          [0, 3, 0, 0, 0, 0], [2, 1, 0, 0, 0, 0], [0, 0, 2, 1, 0, 0], [0, 2, 1, 0, 0, 0], [3, 0, 0, 0, 0, 0]]


@pytest.fixture()
def study(tmp_path):
    truth = _write(tmp_path / "manifest.csv", ["case_id", "patient_id", "dataset", "label", "birads"],
                   [(c, f"p{c}", "A", lab, "4a") for c, lab, *_ in CASES])
    preds = _write(tmp_path / "study.csv", ["case_id", "probability_malignant", "reader1", "reader2", "reader3"],
                   [(c, f"{s:.2f}", r1, r2, r3) for c, _, s, r1, r2, r3 in CASES])
    return {"truth": truth, "preds": preds, "dir": tmp_path, "y": np.array([c[1] == "malignant" for c in CASES])}


def _run(study, out, *extra, preds=None):
    return main(["evaluate", str(preds or study["preds"]), "--truth", str(study["truth"]), "--out", str(out),
                 "--n-boot", "50", *extra])


def _refused(study, out, capsys, *extra, preds=None) -> str:
    """Run a refused evaluation: exit status 2, one line on stderr, nothing written at ``out``."""
    capsys.readouterr()
    assert _run(study, out, *extra, preds=preds) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("breastdlr: error: ") and "\n" not in err
    assert not out.exists()
    return err


def _metrics(out: Path):
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def test_readers_are_scored_on_their_grades_and_compared_with_the_ai(study, capsys):
    out = study["dir"] / "eval"
    assert _run(study, out, "--readers", "reader1,reader2,reader3") == 0
    m = _metrics(out)
    assert m["inputs"]["columns"] == ["probability_malignant", "reader1", "reader2", "reader3"]
    r1 = m["columns"]["reader1"]
    assert r1["auc"]["value"] == pytest.approx(19 / 24)
    op = r1["operating_point"]
    assert op["confusion_matrix"] == {"tp": 3, "fn": 1, "fp": 2, "tn": 4}
    assert op["threshold"] == pytest.approx(4.0) and m["inputs"]["reader_positive_from"] == "4a"
    assert r1["calibration"] is None and r1["decision_curve"] is None      # grades are not probabilities
    assert m["columns"]["probability_malignant"]["calibration"] is not None
    # the AI against reader 1: DeLong on the same cases, the reader's scores being 5, 4.3, 4.0, ...
    cmp = next(c for c in m["comparisons"] if (c["a"], c["b"]) == ("probability_malignant", "reader1"))
    y = study["y"]
    ai = np.array([c[2] for c in CASES])
    ref = delong_test(y, ai, np.array([5, 4.3, 4.0, 3, 4.0, 3, 2, 4.3, 3, 2]))
    assert cmp["delong"]["p_value"] == pytest.approx(ref.p_value) and cmp["delong"]["auc_b"] == pytest.approx(19 / 24)
    ra = m["reader_agreement"]
    assert ra["categories"] == ["2", "3", "4a", "4b", "4c", "5"] and not ra["subdivisions_merged"]
    p12 = next(p for p in ra["pairs"] if (p["a"], p["b"]) == ("reader1", "reader2"))
    assert p12["exact_agreement"] == pytest.approx(0.4)
    assert p12["kappa"]["kappa"] == pytest.approx(0.19 / 0.79)
    assert p12["kappa_positive_call"]["kappa"] == pytest.approx(0.2)
    cats = ["2", "3", "4a", "4b", "4c", "5"]
    g1 = ["5", "4b", "4a", "3", "4a", "3", "2", "4b", "3", "2"]
    g2 = ["4c", "4b", "3", "4a", "3", "3", "2", "4a", "4a", "2"]
    assert p12["kappa_linear"]["kappa"] == pytest.approx(cohen_kappa(g1, g2, weights="linear", categories=cats).kappa)
    assert len(ra["pairs"]) == 3
    assert ra["fleiss"]["kappa"] == pytest.approx(6 / 23)
    assert ra["fleiss"]["kappa"] == pytest.approx(fleiss_kappa(COUNTS).kappa)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Reader agreement" in page and "Fleiss" in page
    printed = capsys.readouterr().out
    assert "readers reader1 / reader2: kappa 0.241" in printed and "Fleiss' kappa over 3 readers: 0.261" in printed


def test_reader_positive_moves_the_readers_operating_point_only(study):
    out = study["dir"] / "eval4b"
    assert _run(study, out, "--readers", "reader1", "--reader-positive", "BI-RADS 4B") == 0
    m = _metrics(out)
    assert m["columns"]["reader1"]["operating_point"]["confusion_matrix"] == {"tp": 2, "fn": 2, "fp": 1, "tn": 5}
    assert m["columns"]["probability_malignant"]["operating_point"]["threshold"] == 0.5
    assert m["reader_agreement"] is None                                   # one reader: nothing to agree with


def test_a_reader_who_does_not_subdivide_4_is_compared_on_merged_grades(study, capsys):
    rows = [(c, f"{s:.2f}", r1, r2, "4" if r3.lower().endswith(("4a", "4b", "4c")) else r3)
            for c, _, s, r1, r2, r3 in CASES]
    preds = _write(study["dir"] / "undivided.csv", ["case_id", "probability_malignant", "reader1", "reader2", "reader3"],
                   rows)
    out = study["dir"] / "merged"
    assert _run(study, out, "--readers", "reader1,reader3", preds=preds) == 0
    ra = _metrics(out)["reader_agreement"]
    assert ra["subdivisions_merged"] and ra["categories"] == ["2", "3", "4", "5"]
    # merged, reader 1: 5 4 4 3 4 3 2 4 3 2; reader 3: 5 4 4 4 3 3 3 4 3 2 -> same on c1 c2 c3 c6 c8 c9 c10: 0.7
    (pair,) = ra["pairs"]
    assert pair["exact_agreement"] == pytest.approx(0.7)
    # a cut inside 4 cannot be read off an undivided 4
    assert "does not subdivide 4" in _refused(study, study["dir"] / "cut", capsys, "--readers", "reader3",
                                              "--reader-positive", "4c", preds=preds)


@pytest.mark.parametrize("cell, message", [
    ("0", "incomplete assessment"),
    ("6", "known biopsy-proven cancer"),
    ("4d", "not a BI-RADS grade"),
    ("probably benign", "not a BI-RADS grade"),
])
def test_bad_grades_are_refused_naming_the_reader_and_case(study, capsys, cell, message):
    rows = [(c, f"{s:.2f}", cell if c == "c7" else r1) for c, _, s, r1, *_ in CASES]
    preds = _write(study["dir"] / "bad.csv", ["case_id", "probability_malignant", "reader1"], rows)
    err = _refused(study, study["dir"] / "bad", capsys, "--readers", "reader1", preds=preds)
    assert message in err and "'reader1'" in err and "c7" in err


def test_one_reader_mixing_4_and_4a_is_refused(study, capsys):
    rows = [(c, f"{s:.2f}", "4" if c == "c3" else r1) for c, _, s, r1, *_ in CASES]
    preds = _write(study["dir"] / "mixed.csv", ["case_id", "probability_malignant", "reader1"], rows)
    err = _refused(study, study["dir"] / "mixed", capsys, "--readers", "reader1", preds=preds)
    assert "one scale per reader" in err and "'reader1'" in err


def test_an_empty_grade_leaves_the_case_out(study):
    rows = [(c, f"{s:.2f}", "" if c == "c10" else r1) for c, _, s, r1, *_ in CASES]
    preds = _write(study["dir"] / "gap.csv", ["case_id", "probability_malignant", "reader1"], rows)
    out = study["dir"] / "gap"
    assert _run(study, out, "--readers", "reader1", preds=preds) == 0
    m = _metrics(out)
    assert m["cases"]["evaluated"] == 9 and m["cases"]["excluded"]["missing_score"] == 1
    # without c10 (benign, 2): 19 - 4 (the four malignant grades' wins over it) = 15 of 20 pairs
    assert m["columns"]["reader1"]["auc"]["value"] == pytest.approx(15 / 20)


def test_readers_only_and_column_errors(study, capsys):
    preds = _write(study["dir"] / "readers_only.csv", ["case_id", "r1", "r2"],
                   [(c, r1, r2) for c, _, _, r1, r2, _ in CASES])
    out = study["dir"] / "only"
    assert _run(study, out, "--readers", "r1,r2", preds=preds) == 0
    assert _metrics(out)["inputs"]["columns"] == ["r1", "r2"]
    assert "no column 'reader9'" in _refused(study, study["dir"] / "x1", capsys, "--readers", "reader9")
    assert "both as a score column and as a reader column" in _refused(
        study, study["dir"] / "x2", capsys, "--columns", "reader1", "--readers", "reader1")
    assert "--reader-positive" in _refused(study, study["dir"] / "x3", capsys, "--readers", "reader1",
                                           "--reader-positive", "6")


def test_grade_parsing_and_scores():
    assert [rd.parse_grade(t, "r", "c") for t in ("BI-RADS 4A", "4 b", "5", "", "NaN")] == ["4a", "4b", "5", None, None]
    assert rd.reader_scores(["2", "4a", "4b", "4c", "5"]).tolist() == [2.0, 4.0, 4.3, 4.6, 5.0]
    assert rd.positive_from("4") == "4a" and rd.positive_from("bi-rads 4c") == "4c"
    assert report.DEFAULT_COLUMN["malignancy"] == "probability_malignant"


def test_readers_who_all_give_one_grade_have_undefined_kappa_not_an_error():
    ra = rd.agreement({"a": ["3", "3", "3"], "b": ["3", "3", "3"], "c": ["3", "3", "3"]})
    assert ra["categories"] == ["3"] and all(p["exact_agreement"] == 1.0 for p in ra["pairs"])
    assert all(np.isnan(p["kappa"]["kappa"]) and np.isnan(p["kappa_linear"]["kappa"]) for p in ra["pairs"])
    assert np.isnan(ra["fleiss"]["kappa"]) and ra["fleiss"]["n_raters"] == 3   # written as null in metrics.json


# ------------------------------------------------------------------------------ --reader-scale percent
# The same ten cases rated as likelihoods of malignancy (%).  Put into the ACR atlas' categories (0 -> 2, up to
# 2 -> 3, up to 10 -> 4A, up to 50 -> 4B, below 95 -> 4C, else 5) they are exactly g1 and g2 above.
PERCENT = {"reader1": ["97", "30", "5", "2", "8", "1", "0", "40", "2%", "0"],
           "reader2": ["80", "30", "1", "6", "2", "1.5", "0", "9", "3", "0"]}
# Reader 1, malignant 97 30 5 2 against benign 8 1 0 40 2 0 (24 pairs): 97 beats 6; 30 beats 5; 5 beats 4; 2 beats
#   3 and ties 1 (c9, 0.5) -> 18.5 / 24.
# Positive above 2 % (the default): c1 c2 c3 malignant, c5 c8 benign; c4 and c9 rated exactly 2 are negative ->
#   TP 3, FN 1, FP 2, TN 4.  Above 5 %: c1 c2; c5 c8 -> TP 2, FN 2, FP 2, TN 4.
# Reader 2 positive above 2 %: c1 c2 c4 c8 c9 -> the same calls as from 4A in the grade study: kappa 0.2.


@pytest.fixture()
def percent_study(study):
    preds = _write(study["dir"] / "percent.csv", ["case_id", "probability_malignant", "reader1", "reader2"],
                   [(c, f"{s:.2f}", PERCENT["reader1"][i], PERCENT["reader2"][i])
                    for i, (c, _, s, *_) in enumerate(CASES)])
    return {**study, "preds": preds}


def test_likelihood_ratings_are_scored_as_they_are_and_called_above_2_percent(percent_study, capsys):
    out = percent_study["dir"] / "pct"
    assert _run(percent_study, out, "--readers", "reader1,reader2", "--reader-scale", "percent") == 0
    m = _metrics(out)
    inp = m["inputs"]
    assert (inp["reader_scale"], inp["reader_positive_above"], inp["reader_positive_from"]) == ("percent", 2.0, None)
    r1 = m["columns"]["reader1"]
    assert r1["auc"]["value"] == pytest.approx(18.5 / 24)
    assert r1["operating_point"]["confusion_matrix"] == {"tp": 3, "fn": 1, "fp": 2, "tn": 4}
    assert r1["calibration"] is None
    cmp = next(c for c in m["comparisons"] if (c["a"], c["b"]) == ("probability_malignant", "reader1"))
    ref = delong_test(percent_study["y"], np.array([c[2] for c in CASES]),
                      np.array([97, 30, 5, 2, 8, 1, 0, 40, 2, 0], dtype=float))
    assert cmp["delong"]["p_value"] == pytest.approx(ref.p_value)
    (pair,) = m["reader_agreement"]["pairs"]
    assert m["reader_agreement"]["scale"] == "percent"
    assert pair["kappa"]["kappa"] == pytest.approx(0.19 / 0.79)               # g1 against g2, as above
    assert pair["kappa_positive_call"]["kappa"] == pytest.approx(0.2)
    printed = capsys.readouterr().out
    assert "reader1: AUC 0.771" in printed and "positive above 2 % likelihood of malignancy" in printed
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "above 2 %" in page and "ACR atlas" in page


def test_reader_positive_on_the_percent_scale(percent_study, capsys):
    out = percent_study["dir"] / "pct5"
    assert _run(percent_study, out, "--readers", "reader1", "--reader-scale", "percent", "--reader-positive", "5%") == 0
    assert _metrics(out)["columns"]["reader1"]["operating_point"]["confusion_matrix"] == \
        {"tp": 2, "fn": 2, "fp": 2, "tn": 4}
    for bad in ("4a", "100", "-1"):
        err = _refused(percent_study, percent_study["dir"] / "x", capsys, "--readers", "reader1",
                       "--reader-scale", "percent", "--reader-positive", bad)
        assert "likelihood of malignancy" in err and "from 0 to below 100" in err


@pytest.mark.parametrize("cell", ["4a", "150", "-3", "inf", "likely"])
def test_a_cell_that_is_no_likelihood_is_refused(percent_study, capsys, cell):
    rows = [(c, f"{s:.2f}", cell if c == "c7" else PERCENT["reader1"][i]) for i, (c, _, s, *_) in enumerate(CASES)]
    preds = _write(percent_study["dir"] / "bad.csv", ["case_id", "probability_malignant", "reader1"], rows)
    err = _refused(percent_study, percent_study["dir"] / "bad", capsys, "--readers", "reader1",
                   "--reader-scale", "percent", preds=preds)
    assert "'reader1'" in err and "c7" in err and "from 0 to 100 %" in err


def test_grades_given_to_the_percent_scale_and_probabilities_are_caught(percent_study, capsys):
    # BI-RADS grades 2-5 read as percentages would be silently wrong for most of them: "4a" is refused above;
    # ratings that are all at most 1 are most likely probabilities, and the report says so.
    rows = [(c, f"{s:.2f}", f"{float(PERCENT['reader1'][i].rstrip('%')) / 100:g}")
            for i, (c, _, s, *_) in enumerate(CASES)]
    preds = _write(percent_study["dir"] / "prob.csv", ["case_id", "probability_malignant", "reader1"], rows)
    out = percent_study["dir"] / "prob"
    assert _run(percent_study, out, "--readers", "reader1", "--reader-scale", "percent", preds=preds) == 0
    r1 = _metrics(out)["columns"]["reader1"]
    assert r1["auc"]["value"] == pytest.approx(18.5 / 24)                    # ranks unchanged
    assert r1["operating_point"]["confusion_matrix"] == {"tp": 0, "fn": 4, "fp": 0, "tn": 6}
    assert any("multiply them by 100" in n for n in r1["notes"])


def test_percent_categories_follow_the_acr_atlas():
    got = [rd.percent_grade(p) for p in (0, 0.5, 2, 2.01, 10, 10.5, 50, 50.1, 94.9, 95, 100)]
    assert got == ["2", "3", "3", "4a", "4a", "4b", "4b", "4c", "4c", "5", "5"]
    assert [rd.parse_percent(t, "r", "c") for t in ("7.5", " 12 % ", "", "NaN")] == [7.5, 12.0, None, None]
    call = rd.reader_call("percent")
    assert call.cut > 2.0 and not 2.0 >= call.cut and 2.000001 >= call.cut
    assert rd.reader_call("birads").cut == 4.0 and rd.reader_call("birads", "4b").cut == 4.3
