"""``breastdlr evaluate``: predictions against a reference standard, written as metrics.json, PNG plots and
one self-contained report.html.

The predictions are a CSV with ``case_id`` and one or more score columns (``breastdlr predict``'s
PREDICTIONS.csv, or any other CSV); the truth is a manifest in the breast-us format (``label`` benign/
malignant for the malignancy task, ``birads`` 2-3 vs 4-5 for the risk task; ``dataset`` and ``device``
give the breakdowns).  A case is positive when its score is >= the threshold.  Every number goes to
metrics.json (NaN and infinities as null).  Nothing is written unless every step succeeds: the output is
assembled in a hidden folder beside ``out`` and moved into place at the end.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import __version__
from ..errors import InputError
from ..training.data import RISK_HIGH, RISK_LOW
from . import readers as rd
from .mrmc import ai_versus_readers
from .stats import (MISSING, EvaluationInputError, binary_metrics, calibration_curve, delong_test, mcnemar, net_benefit,
                    roc_auc, roc_curve, to_json, youden_threshold)

FORMAT = "breastdlr-evaluation/1"
INTENDED_USE = "Research use only. Not a medical device; not for diagnosis or treatment decisions."
DEFAULT_COLUMN = {"malignancy": "probability_malignant", "risk": "probability_high_risk"}
CLASS_NAMES = {"malignancy": ("benign", "malignant"), "risk": ("BI-RADS 2-3", "BI-RADS 4-5")}
TRUTH_COLUMN = {"malignancy": "label", "risk": "birads"}
REASONS = ("not_in_truth", "no_reference_label", "prediction_error", "missing_score")
GROUP_COLUMNS = ("dataset", "device")         # from the truth manifest
PREDICTION_GROUP_COLUMNS = ("outline", "outline_uncertain")   # from the predictions: who drew the outline, and
#                                                             whether the segmenter was unsure of its own
DECISION_THRESHOLDS = np.arange(1, 100) / 100.0
CALIBRATION_BINS = 10
PLOTS = ("roc.png", "calibration.png", "decision_curve.png", "confusion_matrix.png", "mrmc.png", "tsne.png")


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class Joined:
    """Predictions joined to the truth: the evaluable cases and what was left out."""

    task: str
    columns: List[str]
    case_ids: List[str]
    y: np.ndarray                               # bool, True = positive class
    scores: Dict[str, np.ndarray]
    groups: Dict[str, Optional[List[str]]]      # "dataset"/"device"/"outline" -> value per case, None without it
    excluded: Dict[str, int]                    # reason -> number of prediction rows
    n_prediction_rows: int
    n_truth_rows: int
    truth_without_prediction: int
    readers: Dict[str, List[str]] = field(default_factory=dict)   # reader column -> BI-RADS grade per case
    reader_scale: str = "birads"                # "percent": the scores are the ratings, the grades their categories


def read_table(path: str | Path, what: str) -> Tuple[List[str], List[Dict[str, str]]]:
    """Header and rows of a CSV file (a UTF-8 byte-order mark is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"The {what} file {path} was not found; check the path.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "") for k, v in r.items()} for r in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise EvaluationInputError(f"The {what} file {path.name} is not a readable CSV file ({exc}).") from exc
    if not cols:
        raise EvaluationInputError(f"The {what} file {path.name} is empty; it needs a header row and one row per case.")
    return cols, rows


def reference_label(row: Dict[str, str], task: str) -> Optional[bool]:
    """The truth of one manifest row for ``task`` (None: no usable reference, e.g. a normal image)."""
    if task == "malignancy":
        return {"malignant": True, "benign": False}.get(row.get("label", "").strip().lower())
    b = row.get("birads", "").strip().lower()
    return True if b in RISK_HIGH else False if b in RISK_LOW else None


def parse_score(text: str, column: str, case_id: str) -> Optional[float]:
    """A score cell as a float; None when empty or NaN; an error for anything not a finite number."""
    t = (text or "").strip()
    if t.lower() in MISSING:
        return None
    try:
        v = float(t)
    except ValueError:
        raise EvaluationInputError(f"The column '{column}' holds '{t}' for case {case_id}, which is not a number; "
                                   "scores must be numbers such as 0.73 (leave the cell empty when there is none).") from None
    if np.isnan(v):
        return None
    if not np.isfinite(v):
        raise EvaluationInputError(f"The column '{column}' holds an infinite score for case {case_id}; scores must be "
                                   "finite numbers.")
    return v


def join_predictions(predictions: str | Path, truth: str | Path, columns: Sequence[str], task: str,
                     readers: Sequence[str] = (), reader_scale: str = "birads") -> Joined:
    """Join predictions to the truth by ``case_id``; count and drop the rows that cannot be evaluated.

    ``readers`` are columns of readers' ratings (a reader study, :mod:`.readers`): BI-RADS grades, evaluated as
    ordinal scores, or with ``reader_scale="percent"`` likelihoods of malignancy, 0-100.  They come after the
    score ``columns``, and a case is left out when any score or rating is missing."""
    if task not in DEFAULT_COLUMN:
        raise EvaluationInputError(f"Unknown task '{task}'; use malignancy or risk.")
    rd.check_scale(reader_scale)
    parse_rating = rd.parse_grade if reader_scale == "birads" else rd.parse_percent
    pcols, prows = read_table(predictions, "predictions")
    tcols, trows = read_table(truth, "truth")
    pname, tname = Path(predictions).name, Path(truth).name
    missing = [c for c in ("case_id", *columns, *readers) if c not in pcols]
    if missing:
        raise EvaluationInputError(f"The predictions {pname} have no column {', '.join(repr(m) for m in missing)} "
                                   f"(its columns: {', '.join(pcols)}); choose score columns with --columns "
                                   "and reader columns with --readers.")
    need = ("case_id", TRUTH_COLUMN[task])
    missing = [c for c in need if c not in tcols]
    if missing:
        raise EvaluationInputError(f"The truth {tname} has no column {', '.join(repr(m) for m in missing)}; the {task} "
                                   f"task needs {' and '.join(need)} (the breast-us manifest format).")
    truth_by_id = _unique_rows(trows, tname)
    pred_ids = _unique_rows(prows, pname)
    if not set(pred_ids) & set(truth_by_id):
        raise EvaluationInputError(f"None of the {len(pred_ids)} case_id values of {pname} appear in {tname}; check that "
                                   "the predictions were made on the images of this manifest.")
    excluded = {r: 0 for r in REASONS}
    ids, ys, sc = [], [], {c: [] for c in columns}
    ratings: Dict[str, List[Any]] = {c: [] for c in readers}
    groups: Dict[str, Optional[List[str]]] = {g: ([] if g in tcols else None) for g in GROUP_COLUMNS}
    groups.update({g: ([] if g in pcols else None) for g in PREDICTION_GROUP_COLUMNS})
    for row in prows:
        cid = row["case_id"].strip()
        values = {c: parse_score(row[c], c, cid) for c in columns}  # a bad cell is an error in any row
        values.update({c: parse_rating(row[c], c, cid) for c in readers})
        t = truth_by_id.get(cid)
        label = None if t is None else reference_label(t, task)
        if t is None:
            excluded["not_in_truth"] += 1
        elif label is None:
            excluded["no_reference_label"] += 1
        elif (row.get("error") or "").strip():
            excluded["prediction_error"] += 1
        elif any(v is None for v in values.values()):
            excluded["missing_score"] += 1
        else:
            ids.append(cid)
            ys.append(label)
            for c in columns:
                sc[c].append(values[c])
            for c in readers:
                ratings[c].append(values[c])
            for g, vals in groups.items():
                if vals is not None:
                    src = row if g in PREDICTION_GROUP_COLUMNS else t
                    vals.append((src.get(g) or "").strip() or "(unknown)")
    y = np.array(ys, dtype=bool)
    if y.size == 0:
        detail = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in excluded.items() if n)
        raise EvaluationInputError(f"No case of {pname} can be evaluated ({detail}); check the files and --columns.")
    if y.all() or not y.any():
        only = CLASS_NAMES[task][1 if y.any() else 0]
        raise EvaluationInputError(f"All {y.size} evaluable cases are {only} in {tname}; an evaluation needs cases of "
                                   f"both classes ({' and '.join(CLASS_NAMES[task])}).")
    scores = {c: np.array(v, dtype=float) for c, v in sc.items()}
    if reader_scale == "birads":
        grades = ratings
        scores.update({c: rd.reader_scores(g) for c, g in grades.items()})
    else:
        grades = {c: [rd.percent_grade(v) for v in r] for c, r in ratings.items()}
        scores.update({c: np.array(r, dtype=float) for c, r in ratings.items()})
    return Joined(task=task, columns=[*columns, *readers], case_ids=ids, y=y, scores=scores, groups=groups,
                  excluded=excluded, n_prediction_rows=len(prows), n_truth_rows=len(trows),
                  truth_without_prediction=len(set(truth_by_id) - set(pred_ids)), readers=grades,
                  reader_scale=reader_scale)


def _unique_rows(rows: List[Dict[str, str]], name: str) -> Dict[str, Dict[str, str]]:
    out: Dict[str, Dict[str, str]] = {}
    for r in rows:
        cid = r.get("case_id", "").strip()
        if not cid:
            raise EvaluationInputError(f"{name} has a row without a case_id; every row needs one.")
        if cid in out:
            raise EvaluationInputError(f"{name} lists the case_id {cid} twice; each case must appear once.")
        out[cid] = r
    return out


def load_embeddings(path: str | Path, truth: str | Path, task: str) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """Embeddings (npz arrays ``case_id`` and ``embedding``) of the cases with a reference label."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"The embeddings file {path} was not found; check the path.")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "case_id" not in z or "embedding" not in z:
                raise EvaluationInputError(f"The embeddings file {path.name} needs the arrays 'case_id' and 'embedding' "
                                           f"(it has: {', '.join(z.files)}).")
            ids, emb = [str(c) for c in z["case_id"].tolist()], np.asarray(z["embedding"])
    except (ValueError, OSError) as exc:
        raise EvaluationInputError(f"{path.name} is not a readable .npz file of arrays ({exc}).") from exc
    if emb.ndim != 2 or emb.shape[0] != len(ids) or emb.dtype.kind not in "iuf" or not np.all(np.isfinite(emb)):
        raise EvaluationInputError(f"The 'embedding' array of {path.name} must be finite numbers, one row per case_id "
                                   f"({len(ids)}); it has shape {emb.shape}.")
    _, trows = read_table(truth, "truth")
    labels = {r.get("case_id", "").strip(): reference_label(r, task) for r in trows}
    keep = [i for i, c in enumerate(ids) if labels.get(c) is not None]
    if len(keep) < 5:
        raise EvaluationInputError(f"Only {len(keep)} cases of {path.name} have a reference label in the truth; t-SNE "
                                   "needs at least 5.")
    return [ids[i] for i in keep], emb[keep].astype(float), np.array([labels[ids[i]] for i in keep], dtype=bool)


def parse_threshold(text: str | float) -> Tuple[str, Optional[float]]:
    """("youden", None) or ("fixed", value) from ``--threshold``."""
    if str(text).strip().lower() == "youden":
        return "youden", None
    try:
        v = float(text)
    except ValueError:
        raise EvaluationInputError(f"--threshold must be a number such as 0.5 or the word youden, got '{text}'.") from None
    if not np.isfinite(v):
        raise EvaluationInputError(f"--threshold must be a finite number, got '{text}'.")
    return "fixed", v


# ---------------------------------------------------------------------------------------------- metrics
def evaluate(joined: Joined, threshold: str | float = 0.5, n_boot: int = 2000, seed: int = 0,
             level: float = 0.95, reader_positive: Optional[str] = None,
             aided: Sequence[Tuple[str, str]] = ()) -> Dict[str, Any]:
    """Every metric of every score column, the pairwise comparisons and the case counts (numpy inside).

    Reader columns (``joined.readers``) are called positive from the grade ``reader_positive`` on (with the
    percent scale: above that likelihood; None = 4A, or 2 %), whatever ``threshold`` says, and get no
    calibration or decision curve (ratings are not calibrated probabilities).  ``aided`` pairs
    each reader's column with the column of the same reader's grades read with the AI's help: the study then gets
    an Obuchowski-Rockette MRMC analysis of unaided against aided reading (:mod:`.mrmc`)."""
    rule, fixed = parse_threshold(threshold)
    call = rd.reader_call(joined.reader_scale, reader_positive)
    if call.scale == "birads":
        rd.check_scales(joined.readers, call.positive)
    y = joined.y
    cols = {}
    for c in joined.columns:
        if c in joined.readers:
            cols[c] = column_metrics(y, joined.scores[c], "fixed", call.cut, joined.groups, n_boot,
                                     seed, level, probabilities=False)
            cols[c]["notes"].append(f"{c}: BI-RADS grades as ordinal scores (4A = 4.0, 4B = 4.3, 4C = 4.6); {call.text}"
                                    if call.scale == "birads" else
                                    f"{c}: the reader's likelihood of malignancy in percent; {call.text}")
            if call.scale == "percent" and joined.scores[c].max() <= 1.0:
                cols[c]["notes"].append(f"{c}: every rating is at most 1 %; if these are probabilities from 0 to 1, "
                                        "multiply them by 100 (the AUC is the same, the positive calls are not)")
        else:
            cols[c] = column_metrics(y, joined.scores[c], rule, fixed, joined.groups, n_boot, seed, level)
    comparisons = []
    for i, a in enumerate(joined.columns):
        for b in joined.columns[i + 1:]:
            comparisons.append(compare(y, joined.scores[a], joined.scores[b], cols[a]["operating_point"]["threshold"],
                                       cols[b]["operating_point"]["threshold"], a, b, level))
    neg, pos = CLASS_NAMES[joined.task]
    with_ai = {a: joined.readers[a] for _, a in aided}
    unaided = {c: g for c, g in joined.readers.items() if c not in with_ai}
    return {
        "format": FORMAT, "software": {"name": "BreastDLR", "version": __version__}, "intended_use": INTENDED_USE,
        "inputs": {"task": joined.task, "positive_class": pos, "negative_class": neg, "columns": joined.columns,
                   "threshold_rule": "youden" if rule == "youden" else str(fixed), "ci_level": level,
                   "n_boot": int(n_boot), "seed": int(seed), "readers": list(joined.readers),
                   "reader_scale": call.scale if joined.readers else None,
                   "reader_positive_from": call.positive if joined.readers and call.scale == "birads" else None,
                   "reader_positive_above": float(call.positive) if joined.readers and call.scale == "percent" else None,
                   "reader_call": call.text if joined.readers else None,
                   "reader_call_short": call.short if joined.readers else None},
        "cases": {"prediction_rows": joined.n_prediction_rows, "truth_rows": joined.n_truth_rows,
                  "evaluated": int(y.size), "positive": int(y.sum()), "negative": int((~y).sum()),
                  "excluded": {"total": int(sum(joined.excluded.values())), **joined.excluded},
                  "truth_without_prediction": joined.truth_without_prediction},
        "columns": cols, "comparisons": comparisons,
        # a reader's aided grades are not another reader: with --aided, agreement is measured among the unaided
        # grades and, separately, among the aided ones
        "reader_agreement": rd.agreement(unaided, joined.scores, call, level) if unaided else None,
        "reader_agreement_aided": rd.agreement(with_ai, joined.scores, call, level) if with_ai else None,
        "mrmc": rd.mrmc_unaided_vs_aided(y, joined.scores, aided, level) if aided else None,
        "ai_vs_readers": ({c: ai_versus_readers(y, joined.scores[c], [joined.scores[r] for r in unaided], ai_name=c,
                                                 readers=list(unaided), level=level)
                           for c in joined.columns if c not in joined.readers}
                          if len(unaided) >= 2 and min(y.sum(), (~y).sum()) >= 2 else None),
    }


def column_metrics(y: np.ndarray, s: np.ndarray, rule: str, fixed: Optional[float],
                   groups: Dict[str, Optional[List[str]]], n_boot: int, seed: int, level: float,
                   probabilities: bool = True) -> Dict[str, Any]:
    """AUC (DeLong and bootstrap CIs), ROC curve, operating point, calibration and decision curve of one score
    (the last two only for ``probabilities`` within [0, 1])."""
    auc = roc_auc(y, s, level=level)
    boot = roc_auc(y, s, method="bootstrap", n_boot=n_boot, seed=seed, level=level)
    curve = roc_curve(y, s)
    you = youden_threshold(y, s)
    t = you.threshold if rule == "youden" else float(fixed)
    bm = binary_metrics(y, s >= t, level=level)
    est = lambda e: {"value": e.value, "ci_low": e.low, "ci_high": e.high}  # noqa: E731
    out: Dict[str, Any] = {
        "n": int(y.size), "n_positive": int(y.sum()), "n_negative": int((~y).sum()),
        "auc": {"value": auc.auc, "ci_low": auc.ci_low, "ci_high": auc.ci_high, "ci_method": "DeLong",
                "bootstrap_ci_low": boot.ci_low, "bootstrap_ci_high": boot.ci_high, "n_boot": int(n_boot),
                "variance": auc.variance},
        "roc_curve": {"fpr": curve.fpr, "tpr": curve.tpr, "thresholds": curve.thresholds},
        "operating_point": {
            "rule": rule if rule == "youden" else "fixed", "threshold": t,
            "confusion_matrix": {"tp": bm.tp, "fp": bm.fp, "tn": bm.tn, "fn": bm.fn},
            **{k: est(getattr(bm, k)) for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "f1")},
            "ci_method": bm.ci_method, "level": level},
        "youden": {"threshold": you.threshold, "sensitivity": you.sensitivity, "specificity": you.specificity,
                   "index": you.youden},
        "calibration": None, "brier": None, "decision_curve": None, "notes": [],
    }
    if probabilities and np.all((s >= 0) & (s <= 1)):
        cal = calibration_curve(y, s, n_bins=CALIBRATION_BINS)
        out["calibration"] = {"bin_edges": cal.bin_edges, "mean_predicted": cal.mean_predicted,
                              "observed": cal.observed, "counts": cal.counts}
        out["brier"] = cal.brier
        nb = net_benefit(y, s, DECISION_THRESHOLDS)
        out["decision_curve"] = {"thresholds": nb.thresholds, "model": nb.model, "treat_all": nb.treat_all,
                                 "treat_none": nb.treat_none}
    elif probabilities:
        out["notes"].append("scores outside [0, 1]: no calibration, Brier score or decision curve")
    for g, values in groups.items():
        out[f"by_{g}"] = None if values is None else breakdown(y, s, values, level)
    return out


def breakdown(y: np.ndarray, s: np.ndarray, values: Sequence[str], level: float) -> Dict[str, Any]:
    """Per group: n, class counts and the AUC with its DeLong CI (null unless both classes are present)."""
    v = np.asarray(values, dtype=object)
    out = {}
    for name in sorted(set(values)):
        sel = v == name
        entry = {"n": int(sel.sum()), "n_positive": int(y[sel].sum()), "n_negative": int((~y[sel]).sum()),
                 "auc": None, "ci_low": None, "ci_high": None}
        if entry["n_positive"] and entry["n_negative"]:
            a = roc_auc(y[sel], s[sel], level=level)
            entry.update(auc=a.auc, ci_low=a.ci_low, ci_high=a.ci_high)
        out[str(name)] = entry
    return out


def compare(y: np.ndarray, sa: np.ndarray, sb: np.ndarray, ta: float, tb: float, a: str, b: str,
            level: float) -> Dict[str, Any]:
    """Paired DeLong test of two scores' AUCs and exact McNemar test of their correct calls at their thresholds."""
    d = delong_test(y, sa, sb, level=level)
    ca, cb = (sa >= ta) == y, (sb >= tb) == y
    only_a, only_b = int(np.sum(ca & ~cb)), int(np.sum(~ca & cb))
    m = mcnemar(only_a, only_b, exact=True)
    return {"a": a, "b": b,
            "delong": {"auc_a": d.auc_a, "auc_b": d.auc_b, "difference": d.difference, "ci_low": d.ci_low,
                       "ci_high": d.ci_high, "z": d.z, "p_value": d.p_value},
            "mcnemar": {"a_correct_b_wrong": only_a, "a_wrong_b_correct": only_b, "statistic": m.statistic,
                        "p_value": m.p_value, "method": m.method}}


def tsne(ids: List[str], emb: np.ndarray, labels: np.ndarray, seed: int = 0) -> Dict[str, Any]:
    """2-D t-SNE of the embeddings (scikit-learn, PCA initialisation, seeded)."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, (len(ids) - 1) / 3.0))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed).fit_transform(emb)
    return {"n": len(ids), "perplexity": perplexity, "case_id": ids, "x": xy[:, 0], "y": xy[:, 1],
            "label": labels.astype(int)}


# ---------------------------------------------------------------------------------------------- plots
def _figure(width: float = 6.0, height: float = 4.8):
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas on save

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.add_subplot(111)


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _ci(lo: Optional[float], hi: Optional[float]) -> str:
    ok = lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi)
    return f"95% CI {lo:.3f} to {hi:.3f}" if ok else "CI n/a"


def plot_roc(metrics: Dict[str, Any], path: Path) -> None:
    fig, ax = _figure()
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    for n, (col, m) in enumerate(metrics["columns"].items()):
        colour = f"C{n}"
        a = m["auc"]
        ax.plot(m["roc_curve"]["fpr"], m["roc_curve"]["tpr"], color=colour,
                label=f"{col}: AUC {a['value']:.3f} ({_ci(a['ci_low'], a['ci_high'])}, DeLong)")
        op = m["operating_point"]
        point = (metrics["inputs"]["reader_call"]
                 if col in metrics["inputs"].get("readers", ()) else f"threshold {op['threshold']:.3g} ({op['rule']})")
        ax.plot([1 - op["specificity"]["value"]], [op["sensitivity"]["value"]], "o", color=colour, ms=7,
                label=f"{col}: {point}")
    ax.set(xlabel="1 - specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title="ROC curve")
    ax.legend(loc="lower right", fontsize=7)
    _save(fig, path)


def plot_calibration(metrics: Dict[str, Any], path: Path) -> None:
    fig, ax = _figure()
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfect calibration")
    for n, (col, m) in enumerate(metrics["columns"].items()):
        cal = m["calibration"]
        if cal is None:
            continue
        keep = cal["counts"] > 0
        ax.plot(cal["mean_predicted"][keep], cal["observed"][keep], "o-", color=f"C{n}",
                label=f"{col}: Brier {m['brier']:.3f}")
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction positive", xlim=(0, 1), ylim=(0, 1),
           title=f"Calibration ({CALIBRATION_BINS} equal-width bins)")
    ax.legend(loc="upper left", fontsize=7)
    _save(fig, path)


def plot_decision_curve(metrics: Dict[str, Any], path: Path) -> None:
    fig, ax = _figure()
    top = metrics["cases"]["positive"] / metrics["cases"]["evaluated"]
    drawn_reference = False
    for n, (col, m) in enumerate(metrics["columns"].items()):
        dc = m["decision_curve"]
        if dc is None:
            continue
        if not drawn_reference:
            ax.plot(dc["thresholds"], dc["treat_all"], color="grey", lw=1.5, ls="--", label="treat all")
            ax.plot(dc["thresholds"], dc["treat_none"], color="black", lw=1, label="treat none")
            drawn_reference = True
        ax.plot(dc["thresholds"], dc["model"], color=f"C{n}", label=col)
        top = max(top, float(np.max(dc["model"])))
    ax.set(xlabel="threshold probability", ylabel="net benefit", xlim=(0, 1), ylim=(-0.05, top + 0.05),
           title="Decision curve")
    ax.legend(loc="upper right", fontsize=7)
    _save(fig, path)


def plot_confusion(metrics: Dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    cols = list(metrics["columns"])
    fig = Figure(figsize=(3.6 * len(cols) + 0.4, 3.6), dpi=100)
    neg, pos = metrics["inputs"]["negative_class"], metrics["inputs"]["positive_class"]
    for n, col in enumerate(cols):
        ax = fig.add_subplot(1, len(cols), n + 1)
        cm = metrics["columns"][col]["operating_point"]["confusion_matrix"]
        table = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
        ax.imshow(table, cmap="Blues", vmin=0, vmax=max(1, table.max()))
        for (i, j), v in np.ndenumerate(table):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > table.max() / 2 else "black")
        ax.set_xticks([0, 1], [neg, pos])
        ax.set_yticks([0, 1], [neg, pos])
        ax.set(xlabel="predicted", ylabel="truth",
               title=f"{col}\nthreshold {metrics['columns'][col]['operating_point']['threshold']:.3g}")
    _save(fig, path)


def plot_mrmc(mr: Dict[str, Any], path: Path) -> None:
    """Each reader's AUC without and with the AI (one line per reader) and the reader-averaged AUCs with their
    random-reader random-case intervals."""
    fig, ax = _figure(4.8, 4.2)
    for r in mr["readers"]:
        ax.plot([0, 1], [mr["auc"]["unaided"][r], mr["auc"]["aided"][r]], "o-", color="0.6", lw=1)
    for i, m in enumerate(mr["rrrc"]["means"]):
        ax.errorbar([i + 0.08], [m["estimate"]], yerr=[[m["estimate"] - m["ci_low"]], [m["ci_high"] - m["estimate"]]],
                    fmt="s", color="C3", capsize=4, label=f"reader average, {mr['level']:.0%} CI (RRRC)" if i == 0 else None)
    t = mr["rrrc"]
    ax.set_xticks([0, 1], ["unaided", "aided"])
    ax.set(xlim=(-0.3, 1.3), ylabel="AUC", title=f"{len(mr['readers'])} readers; RRRC p = {_f(t['p_value'], 4)}")
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def plot_tsne(doc: Dict[str, Any], names: Tuple[str, str], path: Path) -> None:
    fig, ax = _figure(5.5, 5.0)
    lab = np.asarray(doc["label"], dtype=bool)
    for val, name, colour in ((False, names[0], "C0"), (True, names[1], "C3")):
        ax.scatter(doc["x"][lab == val], doc["y"][lab == val], s=12, color=colour, alpha=0.7,
                   label=f"{name} ({int((lab == val).sum())})")
    ax.set(title=f"t-SNE of the embeddings (perplexity {doc['perplexity']:.0f})", xticks=[], yticks=[])
    ax.legend(fontsize=8)
    _save(fig, path)


# ---------------------------------------------------------------------------------------------- report.html
def _f(v: Optional[float], digits: int = 3) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _est(e: Dict[str, Any]) -> str:
    return f"{_f(e['value'])} ({_f(e['ci_low'])} to {_f(e['ci_high'])})"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def render_html(metrics: Dict[str, Any], images: Dict[str, bytes], sources: Tuple[str, str]) -> str:
    """One self-contained page: banner, headline table, comparisons, breakdowns, plots as base64 PNGs."""
    inp, cases = metrics["inputs"], metrics["cases"]
    parts = [f"<h1>BreastDLR evaluation: {html.escape(inp['task'])}</h1>",
             f"<p>Predictions <code>{html.escape(sources[0])}</code> against the truth <code>{html.escape(sources[1])}</code>; "
             f"positive class: {html.escape(inp['positive_class'])}; threshold rule: {html.escape(inp['threshold_rule'])}; "
             f"{int(inp['ci_level'] * 100)}% confidence intervals (AUC: DeLong; proportions: Wilson).</p>"]
    ex = cases["excluded"]
    parts.append("<h2>Cases</h2>" + _table(
        ["prediction rows", "evaluated", inp["positive_class"], inp["negative_class"], "excluded: not in truth",
         "no reference label", "prediction error", "missing score", "truth cases without a prediction"],
        [[cases["prediction_rows"], cases["evaluated"], cases["positive"], cases["negative"], ex["not_in_truth"],
          ex["no_reference_label"], ex["prediction_error"], ex["missing_score"], cases["truth_without_prediction"]]]))
    rows = []
    for col, m in metrics["columns"].items():
        a, op = m["auc"], m["operating_point"]
        rows.append([col, m["n"], f"{_f(a['value'])} ({_f(a['ci_low'])} to {_f(a['ci_high'])})",
                     f"{_f(a['bootstrap_ci_low'])} to {_f(a['bootstrap_ci_high'])}",
                     inp["reader_call_short"] if col in inp.get("readers", ())
                     else _f(op["threshold"]),
                     _est(op["sensitivity"]), _est(op["specificity"]), _est(op["ppv"]), _est(op["npv"]),
                     _est(op["accuracy"]), _est(op["f1"]), _f(m["brier"])])
    parts.append("<h2>Headline numbers</h2>" + _table(
        ["score", "n", "AUC (DeLong CI)", "AUC bootstrap CI", "threshold", "sensitivity", "specificity", "PPV", "NPV",
         "accuracy", "F1", "Brier"], rows))
    if metrics["comparisons"]:
        parts.append("<h2>Comparisons</h2>" + _table(
            ["a", "b", "AUC a - b (CI)", "DeLong p", "McNemar: only a correct", "only b correct", "McNemar p"],
            [[c["a"], c["b"], f"{_f(c['delong']['difference'])} ({_f(c['delong']['ci_low'])} to {_f(c['delong']['ci_high'])})",
              _f(c["delong"]["p_value"], 4), c["mcnemar"]["a_correct_b_wrong"], c["mcnemar"]["a_wrong_b_correct"],
              _f(c["mcnemar"]["p_value"], 4)] for c in metrics["comparisons"]]))
    for g in (*GROUP_COLUMNS, *PREDICTION_GROUP_COLUMNS):
        rows = [[col, name, e["n"], e["n_positive"], e["n_negative"], _f(e["auc"]), _ci(e["ci_low"], e["ci_high"])]
                for col, m in metrics["columns"].items() for name, e in (m.get(f"by_{g}") or {}).items()]
        if rows:
            parts.append(f"<h2>By {g}</h2>" + _table(["score", g, "n", inp["positive_class"], inp["negative_class"],
                                                        "AUC", "CI"], rows))
    for key, title in (("reader_agreement", "Reader agreement"),
                       ("reader_agreement_aided", "Reader agreement, reading with the AI's help")):
        ra = metrics.get(key)
        if not ra:
            continue
        kap = lambda k: f"{_f(k['kappa'])} ({_f(k['ci_low'])} to {_f(k['ci_high'])})"  # noqa: E731
        merged = " (4A-4C merged into 4: some readers do not subdivide 4)" if ra["subdivisions_merged"] else ""
        scale = ("" if ra.get("scale", "birads") == "birads" else
                 " (the likelihoods put into the ACR atlas' categories: 0 % 2, up to 2 % 3, up to 10 % 4A, up to 50 % "
                 "4B, below 95 % 4C, from 95 % 5)")
        parts.append(f"<h2>{title}</h2>" + f"<p>Grades {', '.join(g.upper() for g in ra['categories'])}"
                     f"{html.escape(merged + scale)}; a call is {html.escape(ra['call'])}. Cohen's kappa with its "
                     "large-sample CI.</p>" + _table(
                         ["reader a", "reader b", "n", "same grade", "kappa", "kappa, linear weights",
                          "kappa of the positive call"],
                         [[p["a"], p["b"], p["n"], _f(p["exact_agreement"]), kap(p["kappa"]), kap(p["kappa_linear"]),
                           kap(p["kappa_positive_call"])] for p in ra["pairs"]]))
        if ra["fleiss"]:
            fl = ra["fleiss"]
            parts.append(f"<p>Fleiss' kappa over all {fl['n_raters']} readers and {fl['n_subjects']} cases: "
                         f"{_f(fl['kappa'])} (SE {_f(fl['se'])}, p {_f(fl['p_value'], 4)}).</p>")
    avr = metrics.get("ai_vs_readers")
    if avr:
        parts.append("<h2>AI against the readers' average</h2><p>Obuchowski-Rockette analysis with the AI as a fixed "
                     "reader (Hillis 2007, section 5.3): does the AI's AUC differ from the average reader's, for "
                     "readers and cases like these (random readers, random cases)? Differences are AI minus the "
                     "readers' average.</p>" + _table(
                         ["AI column", "AI AUC", "readers' average AUC (CI)", "difference (CI)", "F test", "p",
                          "readers above / below the AI"],
                         [[c, _f(a["ai_auc"]),
                           f"{_f(a['readers_mean_auc']['estimate'])} ({_f(a['readers_mean_auc']['ci_low'])} to "
                           f"{_f(a['readers_mean_auc']['ci_high'])})",
                           f"{_f(a['difference']['estimate'])} ({_f(a['difference']['ci_low'])} to "
                           f"{_f(a['difference']['ci_high'])})",
                           f"F({a['ndf']:.0f}, {_f(a['ddf'], 2)}) = {_f(a['f'], 2)}", _f(a["p_value"], 4),
                           f"{a['readers_better']} / {a['readers_worse']} of {len(a['readers'])}"] for c, a in avr.items()]))
    mr = metrics.get("mrmc")
    if mr:
        parts.append(_mrmc_html(mr))
    notes = sorted({n for m in metrics["columns"].values() for n in m["notes"]})
    if notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Plots</h2>")
    for name, data in images.items():
        b64 = base64.b64encode(data).decode("ascii")
        parts.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}"></figure>')
    parts.append("<p>Every number is in <code>metrics.json</code> beside this page.</p>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:.3em .6em;font-size:.9em}th{background:#eee}"
             ".banner{background:#b00020;color:#fff;padding:.6em 1em;font-weight:bold}img{max-width:100%}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>BreastDLR evaluation</title>"
            f"<style>{style}</style></head><body><div class=\"banner\">{html.escape(INTENDED_USE)}</div>"
            + "\n".join(parts) + f"<p><small>BreastDLR {html.escape(__version__)}</small></p></body></html>\n")


def _mrmc_html(mr: Dict[str, Any]) -> str:
    """The MRMC section of report.html: per-reader AUCs, the three generalisations, each reader's difference."""
    ci = lambda lo, hi: f"{_f(lo)} to {_f(hi)}"  # noqa: E731
    rows = [[r, mr["aided_columns"][r], _f(mr["auc"]["unaided"][r]), _f(mr["auc"]["aided"][r]),
             _f(mr["auc"]["aided"][r] - mr["auc"]["unaided"][r])] for r in mr["readers"]]
    out = ["<h2>Multi-reader multi-case analysis: unaided against aided reading</h2>",
           f"<p>Obuchowski-Rockette analysis of the readers' empirical AUCs (Hillis degrees of freedom; case-sampling "
           f"covariances by the {html.escape(mr['covariance'])}), {len(mr['readers'])} readers, {mr['n_diseased']} "
           f"diseased and {mr['n_nondiseased']} non-diseased cases graded both ways. Differences are aided minus "
           "unaided.</p>",
           _table(["reader (unaided column)", "aided column", "AUC unaided", "AUC aided", "difference"], rows)]
    gen = []
    for key, name in (("rrrc", "random readers, random cases"), ("frrc", "fixed readers, random cases"),
                      ("rrfc", "random readers, fixed cases")):
        a = mr[key]
        d = a["differences"][0]
        test = (f"chi-square({a['ndf']:.0f}) = {_f(a['statistic'], 2)}" if key == "frrc"
                else f"F({a['ndf']:.0f}, {_f(a['ddf'], 2)}) = {_f(a['statistic'], 2)}")
        gen.append([name, _f(a["means"][0]["estimate"]), _f(a["means"][1]["estimate"]), _f(-d["estimate"]),
                    ci(-d["ci_high"], -d["ci_low"]), test, _f(a["p_value"], 4)])
    out.append(_table(["generalises to", "AUC unaided", "AUC aided", "difference", f"{mr['level']:.0%} CI", "test", "p"],
                      gen))
    out.append(_table(["reader", "difference", f"{mr['level']:.0%} CI", "z", "p"],
                      [[d["a"].rsplit(":", 1)[0], _f(-d["estimate"]), ci(-d["ci_high"], -d["ci_low"]),
                        _f(None if d["statistic"] is None else -d["statistic"], 2), _f(d["p_value"], 4)]
                       for d in mr["per_reader"]]))
    ss = mr.get("sample_size")
    if ss:
        out.append(f"<p>Planning the next study: cases needed for {ss['power']:.0%} power (two-sided alpha "
                   f"{ss['alpha']:g}, random readers and cases) to detect the difference seen here, "
                   f"{ss['effect']:.3f}, with the variance components of this study ({ss['pilot_cases']} cases; "
                   f"{html.escape(ss['method'])}). The observed difference is itself uncertain: plan with a smaller "
                   "one if it matters.</p>" + _table(["readers", "cases"], [[r["readers"], "not reachable" if r["cases"]
                                                                            is None else r["cases"]] for r in ss["cases"]]))
    vc = mr["variance_components"]
    out.append(f"<p>Variance components: reader {vc['var_r']:.3g}, treatment-by-reader {vc['var_tr']:.3g}, error "
               f"{vc['var']:.3g}, Cov1 {vc['cov1']:.3g}, Cov2 {vc['cov2']:.3g}, Cov3 {vc['cov3']:.3g}.</p>")
    return "".join(out)


# ---------------------------------------------------------------------------------------------- writing
def check_out_dir(out: Path) -> None:
    """Refuse to replace a folder that holds something other than an earlier evaluation."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "metrics.json").is_file())):
        raise InputError(f"{out} already exists and is not an earlier evaluation; choose a new --out folder.")


def write_outputs(out: Path, metrics: Dict[str, Any], tsne_doc: Optional[Dict[str, Any]],
                  sources: Tuple[str, str]) -> Path:
    """Write plots, metrics.json and report.html into a hidden folder, then move it to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        plot_roc(metrics, tmp / "roc.png")
        plot_confusion(metrics, tmp / "confusion_matrix.png")
        if any(m["calibration"] is not None for m in metrics["columns"].values()):
            plot_calibration(metrics, tmp / "calibration.png")
            plot_decision_curve(metrics, tmp / "decision_curve.png")
        if metrics.get("mrmc"):
            plot_mrmc(metrics["mrmc"], tmp / "mrmc.png")
        doc = dict(metrics, tsne=tsne_doc)
        if tsne_doc is not None:
            plot_tsne(tsne_doc, CLASS_NAMES[metrics["inputs"]["task"]], tmp / "tsne.png")
        doc["plots"] = [p for p in PLOTS if (tmp / p).is_file()]
        (tmp / "metrics.json").write_text(json.dumps(to_json(doc), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        images = {p: (tmp / p).read_bytes() for p in doc["plots"]}
        (tmp / "report.html").write_text(render_html(metrics, images, sources), encoding="utf-8")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def run_evaluation(predictions: str | Path, truth: str | Path, out: str | Path, *, columns: Optional[Sequence[str]] = None,
                   task: str = "malignancy", threshold: str | float = 0.5, embeddings: Optional[str | Path] = None,
                   n_boot: int = 2000, seed: int = 0, readers: Sequence[str] = (),
                   reader_positive: Optional[str] = None, aided: Sequence[str] = (),
                   reader_scale: str = "birads") -> Dict[str, Any]:
    """Evaluate and write ``out``/{metrics.json, report.html, *.png}; returns the metrics (JSON-ready).

    ``readers``: columns of the predictions holding readers' ratings (a reader study): BI-RADS grades, or with
    ``reader_scale="percent"`` likelihoods of malignancy 0-100; without ``columns`` they are evaluated beside the
    task's default score column when the predictions have one.  ``reader_positive``: the grade from which (or the
    likelihood above which) a reader's call is positive; None = 4A, or 2 %.
    ``aided``: for each reader column, in the same order, the column of that reader's grades read with the AI's
    help; they are evaluated as reader columns too, and the study gets an MRMC analysis of unaided against aided
    reading (every reader graded the cases both ways; a case with any grade missing is left out)."""
    out = Path(out)
    check_out_dir(out)
    if int(n_boot) < 1:
        raise EvaluationInputError(f"--n-boot must be a positive number of resamples, got {n_boot}.")
    aided = list(aided)
    if aided and len(aided) != len(readers):
        raise EvaluationInputError(f"--aided names {len(aided)} column(s) but --readers names {len(readers)}; give one "
                                   "aided column per reader, in the order of --readers.")
    pairs = list(zip(readers, aided))
    readers = [*readers, *aided]
    if columns:
        cols = list(columns)
    elif readers:
        default = DEFAULT_COLUMN.get(task, "")
        cols = [default] if default in read_table(predictions, "predictions")[0] else []
    else:
        cols = [DEFAULT_COLUMN.get(task, "")]
    if len(set(cols)) != len(cols) or len(set(readers)) != len(readers):
        raise EvaluationInputError("--columns, --readers or --aided names a column twice; name each column once.")
    both = sorted(set(cols) & set(readers))
    if both:
        raise EvaluationInputError(f"{', '.join(repr(c) for c in both)} is named both as a score column and as a "
                                   "reader column; a column is one or the other.")
    rd.reader_call(reader_scale, reader_positive)  # bad reader options are refused before any file is read
    joined = join_predictions(predictions, truth, cols, task, readers, reader_scale)
    emb = load_embeddings(embeddings, truth, task) if embeddings else None
    metrics = evaluate(joined, threshold, n_boot=n_boot, seed=seed, reader_positive=reader_positive, aided=pairs)
    tsne_doc = tsne(*emb, seed=seed) if emb is not None else None
    write_outputs(out, metrics, tsne_doc, (Path(predictions).name, Path(truth).name))
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))
