"""``breastdlr evaluate`` end to end on small tables whose answers are worked out by hand in the comments."""
from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import write_csv as _write

from BreastDLRLib.cli import main
from BreastDLRLib.evaluation import delong_test, mcnemar, proportion_ci, roc_auc, youden_threshold
from BreastDLRLib.evaluation import report

# case, dataset, device, label, birads, score, second score
CASES = [
    ("c01", "A", "X", "malignant", "5", 0.90, 0.60),
    ("c02", "A", "X", "malignant", "4b", 0.70, 0.20),
    ("c03", "A", "X", "benign", "3", 0.40, 0.10),
    ("c04", "A", "X", "benign", "2", 0.20, 0.30),
    ("c05", "A", "Y", "benign", "4a", 0.60, 0.50),
    ("c06", "A", "Y", "malignant", "4c", 0.30, 0.80),
    ("c07", "B", "Y", "benign", "2", 0.10, 0.70),
    ("c08", "B", "Y", "benign", "3", 0.50, 0.40),
    ("c09", "B", "Y", "malignant", "5", 0.80, 0.90),
    ("c10", "B", "Y", "benign", "3", 0.35, 0.15),
    ("c11", "B", "Y", "malignant", "4a", 0.45, 0.65),
    ("c12", "B", "Y", "benign", "2", 0.05, 0.25),
]
# Hand counts at threshold 0.5 (positive when score >= 0.5):
#   called positive: c01 .9, c02 .7, c05 .6, c08 .5, c09 .8 -> TP c01 c02 c09 = 3, FP c05 c08 = 2
#   malignant below 0.5: c06 .3, c11 .45 -> FN = 2; benign below: c03 c04 c07 c10 c12 -> TN = 5
# AUC by hand: malignant scores .9 .7 .3 .8 .45 against the 7 benign .4 .2 .6 .1 .5 .35 .05
#   beat 7 + 7 + 3 + 7 + 5 = 29 of 35 pairs; dataset A: .9 .7 .3 vs .4 .2 .6 -> 3 + 3 + 1 = 7 of 9;
#   dataset B: .8 .45 vs .1 .5 .35 .05 -> 4 + 3 = 7 of 8.
HAND = {"tp": 3, "fp": 2, "tn": 5, "fn": 2, "auc": 29 / 35, "auc_A": 7 / 9, "auc_B": 7 / 8}


@pytest.fixture()
def files(tmp_path):
    truth_rows = [(cid, f"p{cid}", ds, f"{ds}/{cid}.png", lab, bi, dev) for cid, ds, dev, lab, bi, _, _ in CASES]
    truth_rows += [("c13", "pc13", "A", "A/c13.png", "normal", "1", "X"),      # no reference label
                   ("c14", "pc14", "B", "B/c14.png", "benign", "2", "Y"),      # its prediction failed
                   ("c15", "pc15", "B", "B/c15.png", "malignant", "5", "Y"),   # no score
                   ("c16", "pc16", "B", "B/c16.png", "benign", "3", "Y")]      # never predicted
    truth = _write(tmp_path / "manifest.csv", ["case_id", "patient_id", "dataset", "image", "label", "birads", "device"],
                   truth_rows)
    pred_rows = [(cid, f"{s:.2f}", f"{s2:.2f}", "") for cid, *_, s, s2 in CASES]
    pred_rows += [("c13", "0.5", "0.5", ""), ("c14", "", "", "The image could not be read."), ("c15", "", "0.3", ""),
                  ("ghost", "0.5", "0.5", "")]
    preds = _write(tmp_path / "PREDICTIONS.csv", ["case_id", "probability_malignant", "other", "error"], pred_rows)
    y = np.array([c[3] == "malignant" for c in CASES])
    s = np.array([c[5] for c in CASES])
    s2 = np.array([c[6] for c in CASES])
    return {"truth": truth, "preds": preds, "y": y, "s": s, "s2": s2, "dir": tmp_path}


def _run(files, out, *extra):
    return main(["evaluate", str(files["preds"]), "--truth", str(files["truth"]), "--out", str(out),
                 "--n-boot", "200", *extra])


def _strict_json(path: Path):
    def refuse(name):
        raise AssertionError(f"{name} in metrics.json")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_metrics_match_hand_counts_and_stats(files, capsys):
    out = files["dir"] / "eval"
    assert _run(files, out) == 0
    m = _strict_json(out / "metrics.json")
    col = m["columns"]["probability_malignant"]
    y, s = files["y"], files["s"]
    assert col["auc"]["value"] == pytest.approx(HAND["auc"], abs=1e-12)
    ref = roc_auc(y, s)
    assert (col["auc"]["ci_low"], col["auc"]["ci_high"]) == pytest.approx((ref.ci_low, ref.ci_high), abs=1e-12)
    boot = roc_auc(y, s, method="bootstrap", n_boot=200, seed=0)
    assert (col["auc"]["bootstrap_ci_low"], col["auc"]["bootstrap_ci_high"]) == pytest.approx((boot.ci_low, boot.ci_high))
    op = col["operating_point"]
    assert op["threshold"] == 0.5 and op["rule"] == "fixed"
    assert op["confusion_matrix"] == {k: HAND[k] for k in ("tp", "fp", "tn", "fn")}
    sens = proportion_ci(3, 5)  # TP / (TP + FN), Wilson
    assert (op["sensitivity"]["value"], op["sensitivity"]["ci_low"], op["sensitivity"]["ci_high"]) == pytest.approx(tuple(sens))
    assert op["specificity"]["value"] == pytest.approx(5 / 7) and op["ppv"]["value"] == pytest.approx(3 / 5)
    assert op["npv"]["value"] == pytest.approx(5 / 7) and op["accuracy"]["value"] == pytest.approx(8 / 12)
    assert op["f1"]["value"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 2))
    assert col["brier"] == pytest.approx(float(np.mean((s - y) ** 2)))
    assert col["roc_curve"]["thresholds"][0] is None            # +inf written as null
    dc = col["decision_curve"]
    assert len(dc["thresholds"]) == 99
    assert dc["thresholds"][0] == pytest.approx(0.01) and dc["thresholds"][-1] == pytest.approx(0.99)
    k = dc["thresholds"].index(0.5)  # net benefit at 0.5 by hand: TP/n - FP/n * 1 = 3/12 - 2/12
    assert dc["model"][k] == pytest.approx(1 / 12)
    # exclusions: ghost (not in truth), c13 (normal), c14 (error), c15 (no score); c16 has no prediction
    assert m["cases"]["excluded"] == {"total": 4, "not_in_truth": 1, "no_reference_label": 1, "prediction_error": 1,
                                      "missing_score": 1}
    assert m["cases"]["evaluated"] == 12 and m["cases"]["positive"] == 5 and m["cases"]["truth_without_prediction"] == 1
    a, b = col["by_dataset"]["A"], col["by_dataset"]["B"]
    assert (a["n"], a["n_positive"], a["n_negative"]) == (6, 3, 3) and a["auc"] == pytest.approx(HAND["auc_A"])
    assert (b["n"], b["n_positive"], b["n_negative"]) == (6, 2, 4) and b["auc"] == pytest.approx(HAND["auc_B"])
    assert {k: v["n"] for k, v in col["by_device"].items()} == {"X": 4, "Y": 8}
    printed = capsys.readouterr().out
    assert "12 cases evaluated" in printed and "AUC 0.829" in printed


def test_two_columns_are_compared(files):
    out = files["dir"] / "eval2"
    assert _run(files, out, "--columns", "probability_malignant,other") == 0
    m = _strict_json(out / "metrics.json")
    (cmp,) = m["comparisons"]
    y, s, s2 = files["y"], files["s"], files["s2"]
    ref = delong_test(y, s, s2)
    assert (cmp["a"], cmp["b"]) == ("probability_malignant", "other")
    assert cmp["delong"]["p_value"] == pytest.approx(ref.p_value) and cmp["delong"]["difference"] == pytest.approx(ref.difference)
    # correct calls at 0.5: the first score is wrong on c05 c06 c08 c11; the second is right on c01 c06 c09 c11
    # (positive) and c03 c04 c08 c10 c12 (negative), wrong on c02 c05 c07.
    # Only the first right: c02 c07; only the second right: c06 c08 c11.
    assert (cmp["mcnemar"]["a_correct_b_wrong"], cmp["mcnemar"]["a_wrong_b_correct"]) == (2, 3)
    assert cmp["mcnemar"]["p_value"] == pytest.approx(mcnemar(2, 3).p_value)
    assert m["columns"]["other"]["auc"]["value"] == pytest.approx(roc_auc(y, s2).auc)


def test_youden_operating_point(files):
    out = files["dir"] / "eval3"
    assert _run(files, out, "--threshold", "youden") == 0
    op = _strict_json(out / "metrics.json")["columns"]["probability_malignant"]["operating_point"]
    assert op["rule"] == "youden"
    assert op["threshold"] == pytest.approx(youden_threshold(files["y"], files["s"]).threshold)


def test_risk_task_uses_birads(files):
    # risk truth: BI-RADS 4a-5 positive, 2-3 negative; c13 (BI-RADS 1) has no reference label
    out = files["dir"] / "risk"
    assert _run(files, out, "--task", "risk", "--columns", "other") == 0
    m = _strict_json(out / "metrics.json")
    y = np.array([c[4] in ("4a", "4b", "4c", "5") for c in CASES] + [True])      # + c15, BI-RADS 5
    s2 = np.append(files["s2"], 0.3)
    assert m["inputs"]["positive_class"] == "BI-RADS 4-5"
    assert m["columns"]["other"]["auc"]["value"] == pytest.approx(roc_auc(y, s2).auc)
    # c15 has an "other" score and BI-RADS 5 here, so only ghost, c13 and c14 are excluded
    assert m["cases"]["excluded"]["total"] == 3 and m["cases"]["evaluated"] == 13


def test_report_is_self_contained(files):
    out = files["dir"] / "eval4"
    emb = files["dir"] / "emb.npz"
    rng = np.random.default_rng(0)
    ids = [c[0] for c in CASES] + ["ghost"]
    np.savez(emb, case_id=np.array(ids), embedding=rng.normal(size=(len(ids), 6)))
    assert _run(files, out, "--embeddings", str(emb)) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Research use only" in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    m = _strict_json(out / "metrics.json")
    assert set(m["plots"]) == {"roc.png", "calibration.png", "decision_curve.png", "confusion_matrix.png", "tsne.png"}
    assert len(images) == len(m["plots"])
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert not re.search(r'src="(?!data:)', page)                  # nothing fetched from elsewhere
    assert all((out / p).is_file() for p in m["plots"])
    assert m["tsne"]["n"] == 12 and len(m["tsne"]["x"]) == 12        # ghost has no truth
    assert "0.829" in page


def _nothing_written(folder: Path, out: Path) -> bool:
    return not out.exists() and not [p for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("case", ["missing column", "no overlap", "one class", "non-numeric", "bad threshold"])
def test_bad_inputs_write_nothing(files, capsys, case):
    d = files["dir"]
    extra = []
    if case == "missing column":
        extra = ["--columns", "probability_malignant,nope"]
    elif case == "no overlap":
        files["preds"] = _write(d / "other.csv", ["case_id", "probability_malignant"], [("z1", "0.2"), ("z2", "0.9")])
    elif case == "one class":
        files["truth"] = _write(d / "benign.csv", ["case_id", "label"], [(c[0], "benign") for c in CASES])
    elif case == "non-numeric":
        files["preds"] = _write(d / "text.csv", ["case_id", "probability_malignant"], [(c[0], "high") for c in CASES])
    else:
        extra = ["--threshold", "half"]
    out = d / "sub" / "eval"
    assert _run(files, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("breastdlr: error: ") and "\n" not in err
    expected = {"missing column": "'nope'", "no overlap": "None of the 2 case_id", "one class": "benign",
                "non-numeric": "'high'", "bad threshold": "half"}[case]
    assert expected in err
    assert not (d / "sub").exists() or _nothing_written(d / "sub", out)


def test_failure_while_writing_leaves_nothing_and_keeps_earlier_result(files, monkeypatch):
    out = files["dir"] / "eval5"
    assert _run(files, out) == 0
    before = (out / "metrics.json").read_bytes()

    def broken(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "plot_calibration", broken)
    with pytest.raises(RuntimeError):
        report.run_evaluation(files["preds"], files["truth"], out, threshold="youden", n_boot=50)
    assert (out / "metrics.json").read_bytes() == before
    assert not [p for p in files["dir"].iterdir() if p.name.startswith(".")]


def test_refuses_to_replace_an_unrelated_folder(files, capsys):
    out = files["dir"] / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert _run(files, out) == 2
    assert "not an earlier evaluation" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_breakdown_by_the_outline_predict_used(files):
    """predict's ``outline`` column (reader or segmenter) and ``outline_uncertain`` get their own breakdowns; here dataset A was scored on
    reader outlines and B on the segmenter's, so the two breakdowns must agree case for case."""
    m0 = files["dir"] / "no_outline"
    assert _run(files, m0) == 0
    assert _strict_json(m0 / "metrics.json")["columns"]["probability_malignant"]["by_outline"] is None
    rows = list(csv.DictReader(open(files["preds"], newline="", encoding="utf-8")))
    ds = {c[0]: c[1] for c in CASES}
    with_outline = _write(files["dir"] / "P2.csv",
                          ["case_id", "probability_malignant", "other", "error", "outline", "outline_uncertain"],
                          [(r["case_id"], r["probability_malignant"], r["other"], r["error"],
                            {"A": "reader", "B": "segmenter"}.get(ds.get(r["case_id"]), ""),
                            {"A": "false", "B": "true"}.get(ds.get(r["case_id"]), "")) for r in rows])
    out = files["dir"] / "by_outline"
    assert main(["evaluate", str(with_outline), "--truth", str(files["truth"]), "--out", str(out), "--n-boot", "200"]) == 0
    col = _strict_json(out / "metrics.json")["columns"]["probability_malignant"]
    assert col["by_outline"]["reader"]["auc"] == pytest.approx(HAND["auc_A"])
    assert col["by_outline"]["segmenter"]["auc"] == pytest.approx(HAND["auc_B"])
    assert col["by_outline_uncertain"]["false"]["auc"] == pytest.approx(HAND["auc_A"])
    assert col["by_outline_uncertain"]["true"]["auc"] == pytest.approx(HAND["auc_B"])
    assert "By outline" in (out / "report.html").read_text(encoding="utf-8")
    assert "By outline_uncertain" in (out / "report.html").read_text(encoding="utf-8")
