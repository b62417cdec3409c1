"""One self-contained HTML report per analysis: the planes, the Grad-CAM overlays, scores and recommendation.

Pictures are embedded as data URIs, so the file can be mailed or archived alone.  No patient identifiers are
ever written (the findings carry none).
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Dict, Optional

PLANES = ("transverse", "sagittal", "coronal")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1b1b1b;max-width:1100px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
.banner{background:#fff3cd;border:1px solid #e0c060;padding:8px 12px;border-radius:4px;margin:12px 0}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}
.planes{display:flex;gap:12px;flex-wrap:wrap} figure{margin:0} figcaption{font-size:12px;color:#555;text-align:center}
img{image-rendering:auto;border:1px solid #ddd;max-width:260px}
.rec{font-weight:600;padding:6px 10px;border-radius:4px;display:inline-block}
.downgrade{background:#d4edda}.upgrade{background:#f8d7da}.keep{background:#e2e3e5}.na{background:#f1f1f1}
.bar{height:10px;background:#eee;width:200px;display:inline-block;vertical-align:middle;position:relative}
.bar span{position:absolute;left:0;top:0;bottom:0;background:#c0392b}
.bar i{position:absolute;top:-3px;bottom:-3px;width:2px;background:#000}
"""


def _img(folder: Path, name: Optional[str]) -> str:
    if not name or not (folder / name).is_file():
        return ""
    data = base64.b64encode((folder / name).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return html.escape(str(v))


def _bar(p: Optional[float], t: Optional[float]) -> str:
    if p is None:
        return "not computed"
    tick = f'<i style="left:{100 * (t or 0.5):.0f}%"></i>'
    return f'<span class="bar"><span style="width:{100 * p:.0f}%"></span>{tick}</span> {p:.2f}'


def render(findings: Dict[str, Any], folder: Path) -> str:
    inp = findings["input"]
    units = "mm"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>BreastDLR report</title><style>{CSS}</style></head><body>",
             "<h1>BreastDLR lesion report</h1>",
             f"<div class='banner'>{html.escape(findings['intended_use'])}</div>",
             "<table>",
             f"<tr><th>Input</th><td>{_fmt(inp.get('source'))} — {'2D image' if inp['is_2d'] else '3D volume'} "
             f"{' × '.join(str(x) for x in reversed(inp['shape_kji']))} voxels, spacing "
             f"{' × '.join(f'{s:.3g}' for s in inp['spacing_mm'])} mm ({html.escape(inp['spacing_source'])})</td></tr>",
             f"<tr><th>BI-RADS given</th><td>{_fmt(findings.get('birads'))}</td></tr>",
             "<tr><th>Clinical inputs</th><td>" + (", ".join(f"{html.escape(k)} = {_fmt(v)}" for k, v in findings['clinical'].items()) or "none") +
             ("<br>" + "<br>".join(html.escape(n) for n in findings['clinical_notes']) if findings['clinical_notes'] else "") + "</td></tr>",
             "<tr><th>Models</th><td>" + "<br>".join(f"{html.escape(m['role'])}: {html.escape(m['name'])} {html.escape(m['version'])}"
                                                   for m in findings["models"]) + "</td></tr>",
             "</table>"]
    if inp["spacing_source"] == "unknown":
        units = "px"
        parts.append("<div class='banner'>The image carries no pixel spacing: sizes are in pixels. "
                     "Give the spacing (--spacing) for sizes in millimetres.</div>")
    overview = findings["outputs"].get("preview")
    if overview:
        parts.append(f"<h2>Overview</h2>{_img(folder, overview)}")
    if not findings["lesions"]:
        parts.append("<h2>No lesion found</h2><p>The segmenter found no lesion above its threshold. "
                     "This does not exclude disease.</p>")
    for les in findings["lesions"]:
        m = les["measurements"]
        p = les["probabilities"]
        t = les["thresholds"]
        rec = les.get("recommendation") or {}
        action = rec.get("action", "not applicable")
        cls = {"downgrade": "downgrade", "upgrade": "upgrade", "keep": "keep"}.get(action, "na")
        parts.append(f"<h2>Lesion {les['id']}</h2>")
        figs = []
        prev = les.get("previews", {})
        for plane in PLANES:
            for kind, cap in (("crop", ""), ("gradcam", f" Grad-CAM ({les.get('heatmap_class') or 'decision'})")):
                im = _img(folder, prev.get(f"{plane}_{kind}"))
                if im:
                    figs.append(f"<figure>{im}<figcaption>{plane}{cap}</figcaption></figure>")
        if not figs and prev.get("transverse"):
            figs.append(f"<figure>{_img(folder, prev['transverse'])}<figcaption>transverse</figcaption></figure>")
        missing = [pl for pl in PLANES if f"{pl}_crop" not in prev]
        parts.append("<div class='planes'>" + "".join(figs) + "</div>")
        if inp["is_2d"] and missing:
            parts.append("<p><small>2D image: only the transverse plane exists; sagittal and coronal are not available.</small></p>")
        vol = m.get("volume_mm3")
        parts.append("<table>"
                     f"<tr><th>Maximum diameter</th><td>{_fmt(m['max_diameter_mm'])} {units}</td></tr>"
                     f"<tr><th>Extent depth × lateral{'' if inp['is_2d'] else ' × elevation'}</th><td>"
                     f"{_fmt(m['extent_mm']['depth'])} × {_fmt(m['extent_mm']['lateral'])}"
                     f"{'' if inp['is_2d'] else ' × ' + _fmt(m['extent_mm']['elevation'])} {units}</td></tr>"
                     + (f"<tr><th>Volume</th><td>{_fmt(vol)} {units}³</td></tr>" if vol is not None else
                        f"<tr><th>Area</th><td>{_fmt(m['area_mm2'])} {units}²</td></tr>") +
                     f"<tr><th>Depth from skin</th><td>{_fmt(m['depth_from_skin_mm'])} {units}</td></tr>"
                     f"<tr><th>Orientation</th><td>{html.escape(m['orientation'])} (depth/width {_fmt(m['aspect_ratio'], 2)})</td></tr>"
                     + ("<tr><th>Note</th><td>the lesion touches the image border: it may be cut</td></tr>" if m.get("touches_edge") else "") +
                     f"<tr><th>Malignancy (image)</th><td>{_bar(p.get('malignancy'), t.get('malignancy_image', t.get('malignancy')))}</td></tr>"
                     + (f"<tr><th>Malignancy (image + clinical)</th><td>{_bar(p.get('malignancy_fused'), t.get('malignancy'))}</td></tr>"
                        if p.get("malignancy_fused") is not None else "") +
                     (f"<tr><th>Malignancy (image + reader's outline)</th><td>{_bar(p.get('malignancy_morphology'), t.get('malignancy'))}</td></tr>"
                        if p.get("malignancy_morphology") is not None else "") +
                     f"<tr><th>High risk (BI-RADS 4/5)</th><td>{_bar(p.get('high_risk'), t.get('high_risk_image', t.get('high_risk')))}</td></tr>"
                     + (f"<tr><th>High risk (image + reader's outline)</th><td>{_bar(p.get('high_risk_morphology'), t.get('high_risk'))}</td></tr>"
                        if p.get("high_risk_morphology") is not None else "") +
                     ("<tr><th>Outline</th><td>drawn by the reader</td></tr>" if les.get("outline") == "reader" else "") +
                     "</table>")
        if rec:
            parts.append(f"<p><span class='rec {cls}'>{html.escape(action)}</span> {html.escape(rec.get('text', ''))}</p>")
        feats = les.get("outline_features") or {}
        if feats:
            from .morphology import FEATURES

            parts.append("<details><summary>Outline features (the morphology models' inputs)</summary><table>" +
                         "".join(f"<tr><th>{html.escape(n)}</th><td>{_fmt(feats[n], 3)}</td><td><small>{html.escape(d)}"
                                 "</small></td></tr>" for n, d in FEATURES if n in feats) + "</table></details>")
    parts.append(f"<p><small>BreastDLR {html.escape(findings['software']['version'])}. Threshold ticks mark the "
                 "decision thresholds of each model.</small></p></body></html>")
    return "\n".join(parts)


def write_report(path: Path, findings: Dict[str, Any], folder: Path) -> Path:
    path = Path(path)
    path.write_text(render(findings, folder), encoding="utf-8")
    return path
