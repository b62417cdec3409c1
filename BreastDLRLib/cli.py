"""``breastdlr``: the command line of the BreastDLR engine.

Every sub-command reports a problem with the input as one line on stderr and a non-zero exit status
(2 for bad input or models, 3 for an internal error, 130 when cancelled); ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional, Sequence

from . import __version__
from .errors import BreastDLRError, Cancelled


# ---------------------------------------------------------------------------------------------- progress
class Bar:
    """A tqdm bar per stage on stderr (hidden when stderr is not a terminal, or with --quiet)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._bar = None
        self._stage = None

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=100, desc=stage, unit="%", file=sys.stderr, leave=False,
                             bar_format="{desc:>9}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
        self._bar.n = int(round(100 * min(max(fraction, 0.0), 1.0)))
        self._bar.set_postfix_str(message, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _spacing(text: Optional[str]):
    if text is None:
        return None
    parts = [float(x) for x in text.replace("x", ",").split(",") if x.strip()]
    return parts[0] if len(parts) == 1 else tuple(parts)


def _common(p: argparse.ArgumentParser, models: bool = True) -> None:
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto takes the GPU when torch sees one (default: auto)")
    if models:
        p.add_argument("--model", action="append", default=[], metavar="BUNDLE",
                       help="a model bundle folder (its manifest says its role); repeat for several; "
                            "roles not given use the shipped defaults")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------------- commands
def cmd_segment(a: argparse.Namespace) -> int:
    from .io import read_volume
    from .outputs import write_segmentation
    from .pipeline import Pipeline

    bar = Bar(not a.quiet)
    vol = read_volume(a.input, spacing=_spacing(a.spacing))
    pipe = Pipeline.from_paths(a.model, device=a.device, roles=("segmenter",))
    res = pipe.segment(vol, progress=bar if vol.shape[int(vol.metadata.get("acquisition_axis", 0))] > 1 else (lambda *x: None))
    bar.close()
    doc = write_segmentation(a.out, res)
    _summary(doc["lesions"], a.out, vol)
    return 0


def cmd_analyze(a: argparse.Namespace) -> int:
    from .clinical import from_json, parse_cli
    from .io import read_mask, read_volume
    from .outputs import write_analysis
    from .pipeline import OPTIONAL_ROLES, Pipeline

    clinical: Dict[str, Any] = {}
    if a.clinical_json:
        clinical.update(from_json(a.clinical_json))
    clinical.update(parse_cli(a.clinical))
    bar = Bar(not a.quiet)
    vol = read_volume(a.input, spacing=_spacing(a.spacing))
    outline = vol.with_array(read_mask(a.outline, vol)) if a.outline else None
    pipe = Pipeline.from_paths(a.model, device=a.device, roles=("segmenter", "malignancy"), optional_roles=OPTIONAL_ROLES)
    res = pipe.analyze(vol, clinical=clinical, birads=a.birads, explain=not a.no_explain, progress=bar, outline=outline)
    bar.close()
    findings = write_analysis(a.out, res)
    _summary(findings["lesions"], a.out, vol, findings)
    return 0


def _summary(lesions: List[Dict[str, Any]], out: str, vol, findings: Optional[Dict[str, Any]] = None) -> None:
    from .recommend import decision_scores

    unit = "px" if vol.metadata.get("spacing_source") == "unknown" else "mm"
    print(f"{len(lesions)} lesion(s) found in {vol.metadata.get('source', 'the input')}; results in {out}")
    for les in lesions:
        m = les["measurements"]
        line = f"  lesion {les['id']}: max diameter {m['max_diameter_mm']:.1f} {unit}, {m['orientation']}"
        p_mal, p_risk = decision_scores(les.get("probabilities") or {})
        if p_mal is not None:
            line += f", P(malignant) {p_mal:.2f}"
        if p_risk is not None:
            line += f", P(high risk) {p_risk:.2f}"
        if les.get("outline") == "reader":
            line += " (reader's outline)"
        elif les.get("outline_uncertain"):
            line += " (outline uncertain: check it)"
        rec = les.get("recommendation")
        if rec and rec.get("action") != "not applicable":
            line += f" → {rec['action']} to BI-RADS {rec['birads_out']}"
        print(line)
    if findings is not None and findings.get("clinical_notes"):
        for n in findings["clinical_notes"]:
            print(f"  note: {n}")


def cmd_models(a: argparse.Namespace) -> int:
    from .bundles import list_bundles, open_bundle

    rows = list_bundles(a.dir or ())
    if a.verify:
        for r in rows:
            open_bundle(r["path"]).model("cpu")
    out = [{**{k: r[k] for k in ("role", "name", "version", "default", "path")},
            **({"uses_weights_of": r["manifest"]["uses_weights_of"]} if r["manifest"].get("uses_weights_of") else {})}
           for r in rows]
    print(json.dumps(out, indent=2))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import run_bench

    res = run_bench(device=a.device, slices=a.slices, size=a.size, full_size=not a.no_full_size,
                    repeats=a.repeats, models=a.model)
    print(json.dumps(res, indent=2) if a.json else _bench_text(res))
    return 0


def _bench_text(res: Dict[str, Any]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in res.items())


def cmd_predict(a: argparse.Namespace) -> int:
    from .batch import predict_manifest

    summary = predict_manifest(a.manifest, a.out, masks_out=a.masks_out, device=a.device, model_paths=a.model,
                               outline=a.outline, progress=Bar(not a.quiet))
    print(json.dumps(summary))
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="breastdlr", description="BreastDLR: deep-learning radiomics of breast "
                                "lesions on ultrasound. Research use only; not a medical device.")
    p.add_argument("--version", action="version", version=f"BreastDLR {__version__}")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="find, outline and measure lesions")
    s.add_argument("input", help="image (PNG/JPEG/BMP), DICOM file or series folder, NRRD/NIfTI/MHA volume")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--spacing", help="pixel spacing in mm for files without one (e.g. 0.1 or 0.1,0.1,0.5)")
    _common(s)
    s.set_defaults(func=cmd_segment)

    an = sub.add_parser("analyze", help="segment, classify, explain and recommend for every lesion")
    an.add_argument("input")
    an.add_argument("--out", required=True)
    an.add_argument("--spacing")
    an.add_argument("--clinical", nargs="*", default=[], metavar="NAME=VALUE", help="e.g. age=52")
    an.add_argument("--clinical-json", help="a JSON file {name: value}")
    an.add_argument("--birads", help="the radiologist's BI-RADS grade, e.g. 4a (enables the 4A rule)")
    an.add_argument("--no-explain", action="store_true", help="skip Grad-CAM")
    an.add_argument("--outline", metavar="MASK",
                    help="the reader's lesion outline (mask PNG or label volume on the image's grid) instead of the "
                         "segmenter's; 2D images are then also scored by the morphology models")
    _common(an)
    an.set_defaults(func=cmd_analyze)

    pr = sub.add_parser("predict", help="batch prediction over a manifest of 2D images")
    pr.add_argument("manifest")
    pr.add_argument("--out", required=True, help="PREDICTIONS.csv")
    pr.add_argument("--masks-out", help="folder for <case_id>_mask.png")
    pr.add_argument("--outline", choices=("auto", "manifest"), default="auto",
                    help="auto: the segmenter outlines each lesion (default); manifest: the row's mask is the reader's "
                         "outline (the morphology models then score it too), the segmenter only where it is missing "
                         "or empty")
    _common(pr)
    pr.set_defaults(func=cmd_predict)

    b = sub.add_parser("bench", help="benchmark segmentation speed and memory (prints figures)")
    b.add_argument("--json", action="store_true")
    b.add_argument("--slices", type=int, default=318)
    b.add_argument("--size", type=int, default=256)
    b.add_argument("--repeats", type=int, default=1)
    b.add_argument("--no-full-size", action="store_true", help="skip the full-size ABVS memory run")
    _common(b)
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser("models", help="list (and verify) the installed model bundles")
    m.add_argument("--dir", action="append", help="another folder of bundles")
    m.add_argument("--verify", action="store_true", help="check checksums and build every network")
    m.set_defaults(func=cmd_models)

    _extend(sub)
    return p


def _extend(sub) -> None:
    """Sub-commands that live in their own modules (training, evaluation)."""
    from .evaluation import cli as evaluation_cli
    from .training import cli as training_cli

    training_cli.register(sub)
    evaluation_cli.register(sub)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return int(a.func(a) or 0)
    except Cancelled as exc:
        print(f"breastdlr: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("breastdlr: interrupted; no results were written.", file=sys.stderr)
        return 130
    except BreastDLRError as exc:
        if a.debug:
            raise
        print(f"breastdlr: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the user gets one line, --debug gives the rest
        if a.debug:
            raise
        print(f"breastdlr: internal error: {type(exc).__name__}: {exc} (run with --debug for details)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
