"""``breastdlr bench``: seconds and memory of segmentation and analysis (a benchmark, not a test).

Figures: a 318-slice 256×256 synthetic volume (load, preprocess, network, post-process), one 2D image, the
same network through MONAI's ``SliceInferer`` in the same process (and the ratio), the end-to-end analysis
of a 2D image and of a 318-slice volume with two lesions, and the peak memory of segmenting a full-size
ABVS volume (843×546×270 voxels) measured in a child process.  Targets on a 2-core CPU: volume ≤ 6 s,
full-size peak ≤ 2 GB, never slower than MONAI; analysis of a 2D image ≤ 0.5 s, of the volume ≤ 8 s.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from .bundles import default_bundle, open_bundle
from .segmentation import SliceSegmenter, resolve_device


def _segmenter(model: Optional[str], device: str) -> SliceSegmenter:
    bundle = open_bundle(model) if model else default_bundle("segmenter")
    return SliceSegmenter.from_bundle(bundle, device=device)


def _monai_seconds(seg: SliceSegmenter, array: np.ndarray) -> float:
    """The same network, normalisation and precision through MONAI's SliceInferer (one window per slice)."""
    from monai.inferers import SliceInferer

    import torch.nn.functional as F

    from .segmentation import to_network_grid

    t0 = time.perf_counter()
    h, w = array.shape[1:]
    # the same work our path does: each slice to the network grid and normalised, the network over every slice
    # (here through MONAI's SliceInferer, one window per slice), logits back to the slice size, sigmoid
    grid = to_network_grid(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), seg.size, seg.normalisation)
    vol = grid[:, 0].permute(1, 2, 0)[None, None]  # (1, 1, S, S, D): slices along the last axis
    inferer = SliceInferer(roi_size=(seg.size, seg.size), sw_batch_size=seg.batch_size, spatial_dim=2, progress=False)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=seg.bf16):
        out = inferer(vol.to(seg.device), seg.model)
    logits = out[0, 0].permute(2, 0, 1)[:, None].float()
    prob = torch.sigmoid(F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)).to(torch.float16)
    prob.numpy()
    return time.perf_counter() - t0


def _peak_child(model: Optional[str], device: str, shape_kji=(270, 546, 843)) -> Dict[str, Any]:
    """Segment a full-size synthetic ABVS volume in a fresh process (read from NRRD, as a user's would be) and
    report its seconds and peak resident memory."""
    from .io import write_volume
    from .synthetic import make_volume

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "full.nrrd"
        write_volume(make_volume(seed=11, shape_kji=shape_kji, spacing=(0.2, 0.073, 0.5), n_lesions=2).image, path,
                     compress=False)
        code = (
            "import json,resource,time\n"
            "from BreastDLRLib.bench import _segmenter\n"
            "from BreastDLRLib.io import read_volume\n"
            "from BreastDLRLib.lesions import find_lesions\n"
            f"seg=_segmenter({model!r},{device!r})\n"
            f"t=time.perf_counter(); v=read_volume({str(path)!r}); r=seg(v); labels,les=find_lesions(r.probability)\n"
            "s=time.perf_counter()-t\n"
            "print(json.dumps({'seconds':s,'lesions':len(les),"
            "'peak_rss_mb':resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024}))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_bench(device: str = "auto", slices: int = 318, size: int = 256, full_size: bool = True, repeats: int = 1,
              model: Optional[str] = None, models: Sequence[str] = ()) -> Dict[str, Any]:
    """Time the segmenter and ``analyze`` on synthetic data.  ``models``: bundle folders whose manifests give their
    roles (``breastdlr bench --model``); the segmenter among them is timed alone too, and roles not given use the
    shipped defaults.  ``model``: a segmenter bundle (the older form of the same)."""
    from .io import read_volume, write_volume
    from .lesions import find_lesions
    from .synthetic import make_image, make_volume

    paths = [str(m) for m in models] or ([model] if model else [])
    model = next((m for m in paths if open_bundle(m).manifest.get("role") == "segmenter"), None)
    dev = resolve_device(device)
    seg = _segmenter(model, str(dev))
    res: Dict[str, Any] = {"device": str(dev), "threads": torch.get_num_threads(), "precision": "bf16" if seg.bf16 else "fp32",
                           "volume_shape_kji": [slices, size, size]}
    case = make_volume(seed=7, shape_kji=(slices, size, size), spacing=(0.2, 0.2, 0.5), n_lesions=2)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.nrrd"
        write_volume(case.image, path)
        seg(read_volume(path))  # warm-up (allocations, kernels)
        best: Dict[str, float] = {}
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            vol = read_volume(path)
            t1 = time.perf_counter()
            out = seg(vol)
            t2 = time.perf_counter()
            labels, lesions = find_lesions(out.probability)
            t3 = time.perf_counter()
            run = {"load": t1 - t0, "preprocess": out.timings["preprocess"], "network": out.timings["network"],
                   "postprocess": out.timings["postprocess"] + (t3 - t2), "total": t3 - t0}
            if not best or run["total"] < best["total"]:
                best = run
        res["volume_seconds"] = {k: round(v, 3) for k, v in best.items()}
        res["volume_lesions_found"] = len(lesions)
        monai_s = min(_monai_seconds(seg, vol.array) for _ in range(max(1, repeats)))
        ours_net = best["preprocess"] + best["network"] + best["postprocess"] - (t3 - t2)
        res["monai_sliceinferer_seconds"] = round(monai_s, 3)
        res["ours_segmentation_seconds"] = round(ours_net, 3)
        res["ratio_ours_to_monai"] = round(ours_net / monai_s, 3)

        img = make_image(seed=3, shape=(size, size), n_lesions=1)
        t0 = time.perf_counter()
        o = seg(img.image)
        find_lesions(o.probability)
        res["image_seconds"] = round(time.perf_counter() - t0, 4)

        try:
            from .pipeline import OPTIONAL_ROLES, Pipeline

            pipe = Pipeline.from_paths(paths or None, device=str(dev), roles=("segmenter", "malignancy"),
                                       optional_roles=OPTIONAL_ROLES)
            pipe.analyze(img.image)  # warm-up
            t0 = time.perf_counter()
            a2 = pipe.analyze(img.image, birads="4a")
            res["analyze_image_seconds"] = round(time.perf_counter() - t0, 3)
            res["analyze_image_stages"] = {k: round(v, 3) for k, v in a2.timings.items()}
            t0 = time.perf_counter()   # the same image in a reader's outline: no segmenter, morphology models added
            pipe.analyze(img.image, birads="4a", outline=img.mask)
            res["analyze_image_reader_outline_seconds"] = round(time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
            a3 = pipe.analyze(read_volume(path), birads="4a")
            res["analyze_volume_seconds"] = round(time.perf_counter() - t0, 3)
            res["analyze_volume_lesions"] = len(a3.lesions)
            res["analyze_volume_stages"] = {k: round(v, 3) for k, v in a3.timings.items()}
        except Exception as exc:  # noqa: BLE001 - a benchmark reports what it could not run
            res["analyze_error"] = f"{type(exc).__name__}: {exc}"
    res["peak_rss_mb_this_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if full_size:
        res["full_size_abvs_843x546x270"] = _peak_child(model, str(dev))
    res["targets"] = {"volume_total_s": 6.0, "full_size_peak_mb": 2048, "ratio_ours_to_monai_max": 1.0,
                      "analyze_image_s": 0.5, "analyze_volume_s": 8.0}
    return res
