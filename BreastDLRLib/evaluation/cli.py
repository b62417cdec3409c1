"""``breastdlr evaluate``: measure predictions against a truth manifest (see :mod:`.report`)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    """Add ``evaluate`` to the ``breastdlr`` sub-commands."""
    e = sub.add_parser(
        "evaluate", help="AUC, ROC, sensitivity/specificity, calibration and decision curves of predictions",
        description="Join predictions (e.g. PREDICTIONS.csv of 'breastdlr predict') to a truth manifest by case_id "
                    "and write metrics.json, PNG plots and report.html. Research use only.")
    e.add_argument("predictions", help="CSV with case_id and score columns")
    e.add_argument("--truth", required=True, help="manifest CSV with case_id, label (and birads, dataset, device)")
    e.add_argument("--out", required=True, help="output folder (created; an earlier evaluation there is replaced)")
    e.add_argument("--columns", help="comma-separated score columns to evaluate and compare "
                                     "(default: probability_malignant, or probability_high_risk for --task risk)")
    e.add_argument("--task", choices=("malignancy", "risk"), default="malignancy",
                   help="truth: malignancy = label malignant vs benign; risk = BI-RADS 4-5 vs 2-3")
    e.add_argument("--threshold", default="0.5",
                   help="operating point: a number (positive when score >= it; default 0.5) or youden")
    e.add_argument("--readers", help="comma-separated columns of readers' BI-RADS grades or likelihoods (a reader "
                                     "study, see --reader-scale): each gets its ROC/AUC over the ratings, "
                                     "sensitivity and specificity, DeLong and "
                                     "McNemar against the other columns; two or more also get Cohen's and Fleiss' kappa")
    e.add_argument("--aided", help="comma-separated columns of the same readers' ratings read with the AI's help, in "
                                   "the order of --readers: adds an Obuchowski-Rockette MRMC analysis (random readers "
                                   "and cases) of unaided against aided reading")
    e.add_argument("--reader-scale", choices=("birads", "percent"), default="birads",
                   help="what the reader columns hold: BI-RADS grades (default) or each reader's likelihood of "
                        "malignancy in percent, 0-100")
    e.add_argument("--reader-positive", default=None,
                   help="a reader's call is positive from this BI-RADS grade on (default 4A: biopsy recommended); with "
                        "--reader-scale percent, above this likelihood (default 2: above BI-RADS 3)")
    e.add_argument("--embeddings", help="npz with arrays case_id and embedding: adds a t-SNE plot")
    e.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the AUC CI (default 2000)")
    e.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of t-SNE")
    e.set_defaults(func=cmd_evaluate)


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .report import run_evaluation

    columns = [c.strip() for c in a.columns.split(",") if c.strip()] if a.columns else None
    readers = [c.strip() for c in a.readers.split(",") if c.strip()] if a.readers else []
    aided = [c.strip() for c in a.aided.split(",") if c.strip()] if a.aided else []
    m = run_evaluation(a.predictions, a.truth, a.out, columns=columns, task=a.task, threshold=a.threshold,
                       embeddings=a.embeddings, n_boot=a.n_boot, seed=a.seed, readers=readers,
                       reader_positive=a.reader_positive, aided=aided, reader_scale=a.reader_scale)
    c = m["cases"]
    print(f"{c['evaluated']} cases evaluated ({c['positive']} {m['inputs']['positive_class']}, {c['negative']} "
          f"{m['inputs']['negative_class']}); {c['excluded']['total']} prediction rows excluded")
    for col, cm in m["columns"].items():
        auc, op = cm["auc"], cm["operating_point"]
        at = (m["inputs"]["reader_call"] if col in m["inputs"]["readers"]
              else f"at threshold {_f(op['threshold'])}")
        print(f"  {col}: AUC {_f(auc['value'])} (95% CI {_f(auc['ci_low'])} to {_f(auc['ci_high'])}); {at}: "
              f"sensitivity {_f(op['sensitivity']['value'])}, specificity "
              f"{_f(op['specificity']['value'])}")
    ra = m.get("reader_agreement")
    for p in (ra or {}).get("pairs", []):
        k = p["kappa_linear"]
        print(f"  readers {p['a']} / {p['b']}: kappa {_f(p['kappa']['kappa'])}, linear-weighted {_f(k['kappa'])} "
              f"(95% CI {_f(k['ci_low'])} to {_f(k['ci_high'])})")
    if ra and ra["fleiss"]:
        print(f"  Fleiss' kappa over {ra['fleiss']['n_raters']} readers: {_f(ra['fleiss']['kappa'])}")
    rb = m.get("reader_agreement_aided")
    if rb and rb["fleiss"]:
        print(f"  Fleiss' kappa over the {rb['fleiss']['n_raters']} readers reading with the AI: {_f(rb['fleiss']['kappa'])}")
    for col, av in (m.get("ai_vs_readers") or {}).items():
        d = av["difference"]
        print(f"  {col} against the readers' average (random readers and cases): AUC {_f(av['ai_auc'])} against "
              f"{_f(av['readers_mean_auc']['estimate'])}, difference {_f(d['estimate'])} (95% CI {_f(d['ci_low'])} to "
              f"{_f(d['ci_high'])}), p = {_f(av['p_value'], 4)}")
    mr = m.get("mrmc")
    if mr:
        d, t = mr["rrrc"]["differences"][0], mr["rrrc"]
        means = mr["rrrc"]["means"]
        print(f"  MRMC (Obuchowski-Rockette, random readers and cases; {len(mr['readers'])} readers): reader-averaged AUC "
              f"unaided {_f(means[0]['estimate'])}, aided {_f(means[1]['estimate'])}; aided - unaided "
              f"{_f(-d['estimate'])} (95% CI {_f(-d['ci_high'])} to {_f(-d['ci_low'])}), F({t['ndf']:.0f}, "
              f"{_f(t['ddf'], 2)}) = {_f(t['statistic'], 2)}, p = {_f(t['p_value'], 4)}")
    print(f"report: {Path(a.out) / 'report.html'}")
    return 0


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"
