"""Experiment (not shipped): a second-stage lesion refiner, to see whether sharper automatic outlines let the
morphology models score the segmenter's lesions.

A UNet (EfficientNet-b0 encoder, from scratch, 128 x 128 input) is trained on square crops around each training
lesion's box (the box edges jittered by up to 15 % of its side, the side scaled by 0.85-1.2, 25 % margin), on the
segmenter's split (5 folds, seed 0, fold 0 held out).  ``--evaluate`` then refines every lesion the shipped
segmenter finds on the held-out fold (the crop around its box, mirror averaged, the largest refined component that
overlaps it, holes filled) and reports full-resolution Dice, and the AUC of the shipped morphology heads on the
datasets' outlines, the segmenter's and the refined ones (image scores: ``val_<task>.npz`` of add_mirror_tta.py).

    .venv/bin/python scripts/refiner_experiment.py --manifest ../shared/data/breast-us/manifest.csv \
        --work runs/refine --epochs 12
    .venv/bin/python scripts/refiner_experiment.py --manifest ../shared/data/breast-us/manifest.csv \
        --work runs/refine --evaluate --val runs/cv/fold0

Measured 2026-12-03: docs/researchers.md, "A second-stage outline refiner".
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BreastDLRLib.bundles import default_bundle  # noqa: E402
from BreastDLRLib.errors import BreastDLRError  # noqa: E402
from BreastDLRLib.evaluation import delong_test, roc_auc  # noqa: E402
from BreastDLRLib.io import read_volume  # noqa: E402
from BreastDLRLib.morphology import feature_vector, head_inputs, lesion_features  # noqa: E402
from BreastDLRLib.networks.segmenter import build_segmenter  # noqa: E402
from BreastDLRLib.segmentation import normalise_intensity  # noqa: E402
from BreastDLRLib.training.augment import ultrasound_augmenter  # noqa: E402
from BreastDLRLib.training.data import load_grey, load_mask, read_manifest_csv  # noqa: E402
from BreastDLRLib.training.segmenter import dice_loss, dice_scores  # noqa: E402
from BreastDLRLib.training.splits import segmenter_split  # noqa: E402


SIZE, MARGIN = 128, 0.25

def boxes_of(mask, min_px=30):
    lab, n = ndi.label(mask)
    out = []
    for i, sl in enumerate(ndi.find_objects(lab)):
        if sl is None or (lab[sl] == i + 1).sum() < min_px:
            continue
        out.append((sl[0].start, sl[1].start, sl[0].stop, sl[1].stop))
    return out

def square(box, margin=MARGIN, jitter=0.0, scale=1.0, rng=None):
    y0, x0, y1, x1 = map(float, box)
    h, w = y1 - y0, x1 - x0
    if jitter and rng is not None:
        d = rng.uniform(-jitter, jitter, 4) * np.array([h, w, h, w])
        y0, x0, y1, x1 = y0 + d[0], x0 + d[1], y1 + d[2], x1 + d[3]
        h, w = max(y1 - y0, 4), max(x1 - x0, 4)
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    side = max(h, w) * (1 + 2 * margin) * scale
    side = max(side, 16)
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)   # PIL box (l, t, r, b)

def cut(img, mask, pbox):
    im = Image.fromarray(img).transform((SIZE, SIZE), Image.EXTENT, pbox, Image.BILINEAR)
    x = np.asarray(im, dtype=np.float32)
    if mask is None:
        return x, None
    m = Image.fromarray(mask * 255).transform((SIZE, SIZE), Image.EXTENT, pbox, Image.BILINEAR)
    return x, (np.asarray(m, dtype=np.float32) > 127).astype(np.float32)

def paste(prob, pbox, shape):
    """(SIZE,SIZE) probability → full image (0 outside the crop)."""
    l, t, r, b = pbox
    H, W = shape
    ys = (np.arange(H) + 0.5 - t) / (b - t) * SIZE - 0.5
    xs = (np.arange(W) + 0.5 - l) / (r - l) * SIZE - 0.5
    yy = ys[:, None].repeat(W, 1); xx = xs[None, :].repeat(H, 0)
    inside = (yy > -0.5) & (yy < SIZE - 0.5) & (xx > -0.5) & (xx < SIZE - 0.5)
    out = ndi.map_coordinates(prob.astype(np.float32), [yy, xx], order=1, mode="nearest")
    return np.where(inside, out, 0.0)

def load_items(cases):
    items = []
    for c in cases:
        img = load_grey(c.image)
        m = load_mask(c.mask, img.shape)
        if m.shape != img.shape or not m.any():
            continue
        for b in boxes_of(m):
            items.append((c.case_id, img, m, b))
    return items

def train(a):
    """Train the refiner; a checkpoint after every epoch (resumed when found), the best epoch kept as best.pt."""
    torch.manual_seed(0); torch.set_num_threads(a.threads)
    cases = read_manifest_csv(a.manifest)
    tr, va = segmenter_split(cases, 5, 0, 0, "shared")
    tr = [c for c in tr if c.label in ("benign", "malignant")]
    va = [c for c in va if c.label in ("benign", "malignant")]
    t0 = time.time()
    tri, vai = load_items(tr), load_items(va)
    print(f"{len(tri)} training lesions, {len(vai)} validation lesions, loaded in {time.time()-t0:.0f}s", flush=True)
    rng = np.random.default_rng(0)
    vx, vy = zip(*[cut(img, m, square(b, jitter=0.1, rng=rng)) for _, img, m, b in vai])
    vx, vy = np.stack(vx), np.stack(vy)
    model = build_segmenter().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, weight_decay=1e-4)
    spe = math.ceil(len(tri) / 16)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.epochs * spe, pct_start=0.1)
    aug = ultrasound_augmenter(0, with_mask=True, affine_prob=0.5, scale=0.1, translate=8)
    work = Path(a.work) / "work"; work.mkdir(parents=True, exist_ok=True)
    best, hist, start = -1, [], 0
    ck = work / "checkpoint.pt"
    if ck.is_file():
        s = torch.load(ck, weights_only=True); model.load_state_dict(s["model"]); opt.load_state_dict(s["opt"]); sched.load_state_dict(s["sched"])
        start, best = int(s["epoch"]) + 1, float(s["best"]); rng = np.random.default_rng(start)
        print("resumed at", start, flush=True)
    for ep in range(start, a.epochs):
        model.train(); te = time.time(); losses = []
        order = rng.permutation(len(tri))
        for s in range(0, len(order), 16):
            xs, ys = [], []
            for i in order[s:s+16]:
                _, img, m, b = tri[i]
                x, y = cut(img, m, square(b, jitter=a.jitter, scale=rng.uniform(0.85, 1.2), rng=rng))
                it = aug({"image": x[None], "mask": y[None]})
                xs.append(torch.as_tensor(np.asarray(it["image"]))); ys.append(torch.as_tensor(np.asarray(it["mask"])))
            x = normalise_intensity(torch.stack(xs)).contiguous(memory_format=torch.channels_last); y = torch.stack(ys)
            logits = model(x).float()
            loss = F.binary_cross_entropy_with_logits(logits, y) + dice_loss(logits, y)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
            losses.append(float(loss.detach()))
        d = val_dice(model, vx, vy)
        hist.append({"epoch": ep+1, "loss": float(np.mean(losses)), "val_dice": d, "s": time.time()-te})
        if d > best:
            best = d; torch.save(model.state_dict(), work / "best.pt")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": ep, "best": best}, ck)
        print(json.dumps(hist[-1]), flush=True)

@torch.inference_mode()
def val_dice(model, vx, vy):
    model.eval(); ds = []
    for s in range(0, len(vx), 64):
        x = normalise_intensity(torch.from_numpy(vx[s:s+64])[:, None]).contiguous(memory_format=torch.channels_last)
        p = (torch.sigmoid(model(x).float()[:, 0]) > 0.5).numpy()
        t = vy[s:s+64] > 0.5
        inter = (p & t).sum((1, 2)); ds += list(2 * inter / np.maximum(p.sum((1, 2)) + t.sum((1, 2)), 1))
    return float(np.mean(ds))


def coarse(cases, cache):
    if cache.is_file():
        return dict(np.load(cache, allow_pickle=True)["d"].item())
    from BreastDLRLib.pipeline import Pipeline
    pipe = Pipeline.from_paths(device="cpu"); out = {}
    for c in cases:
        sp = c.row.get("pixel_spacing_mm") or None
        vol = read_volume(c.image, spacing=float(sp) if sp else None)
        seg = pipe.segment(vol)
        out[c.case_id] = [l.lesion.full_mask(vol.shape)[0] for l in seg.lesions]
    np.savez_compressed(cache, d=np.array(out, dtype=object))
    return out

@torch.inference_mode()
def refine(model, img, m, tta=True, margin=MARGIN):
    ys, xs = np.nonzero(m)
    box = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
    pb = square(box, margin=margin)
    x, _ = cut(img, None, pb)
    t = normalise_intensity(torch.from_numpy(x)[None, None]).contiguous(memory_format=torch.channels_last)
    y = model(t).float()
    if tta:
        y = (y + model(t.flip(-1)).float().flip(-1)) / 2
    p = paste(torch.sigmoid(y[0, 0]).numpy(), pb, img.shape) > 0.5
    lab, n = ndi.label(p)
    if n == 0:
        return m
    keep = np.unique(lab[m & (lab > 0)])
    if keep.size == 0:
        return m
    # the largest component overlapping the coarse lesion
    sizes = ndi.sum(np.ones_like(lab), lab, keep)
    r = lab == keep[int(np.argmax(sizes))]
    return ndi.binary_fill_holes(r)

def evaluate(a):
    torch.set_num_threads(a.threads)
    cases = read_manifest_csv(a.manifest)
    _, va = segmenter_split(cases, 5, 0, 0, "shared")
    va = [c for c in va if c.label in ("benign", "malignant")]
    co = coarse(va, Path(a.work) / "coarse_fold0.npz")
    model = build_segmenter(); model.load_state_dict(torch.load(Path(a.work) / "work" / "best.pt", weights_only=True)); model.eval()
    model = model.to(memory_format=torch.channels_last)
    d_c, d_r, feats = [], [], {}
    t0 = time.time()
    for c in va:
        sp = c.row.get("pixel_spacing_mm") or None
        vol = read_volume(c.image, spacing=float(sp) if sp else None)
        img = vol.array[0]
        gt = load_mask(c.mask, img.shape).astype(bool)
        if gt.shape != img.shape or not gt.any():
            continue
        les = co[c.case_id]
        img8 = np.clip(img, 0, 255).astype(np.uint8) if img.dtype != np.uint8 else img
        ref = [refine(model, img8, m) for m in les]
        uc = np.any(les, 0) if les else np.zeros_like(gt)
        ur = np.any(ref, 0) if ref else np.zeros_like(gt)
        d_c.append(dice_scores(uc[None], gt[None])[0]); d_r.append(dice_scores(ur[None], gt[None])[0])
        f = {}
        for name, m in (("reader", gt), ("coarse", les[0] if les else None), ("refined", ref[0] if ref else None)):
            if m is None:
                continue
            try:
                f[name] = feature_vector(lesion_features(img, m))
            except BreastDLRError:
                pass
        feats[c.case_id] = f
    print(f"{len(d_c)} lesion images in {time.time()-t0:.0f}s; Dice coarse {np.mean(d_c):.3f} (median {np.median(d_c):.3f}), "
          f"refined {np.mean(d_r):.3f} (median {np.median(d_r):.3f})", flush=True)
    res = {"n_images": len(d_c), "dice_coarse": float(np.mean(d_c)), "dice_refined": float(np.mean(d_r)),
           "dice_coarse_median": float(np.median(d_c)), "dice_refined_median": float(np.median(d_r))}
    for task in ("malignancy", "risk"):
        z = np.load(Path(a.val) / f"val_{task}.npz", allow_pickle=False)
        head = default_bundle(f"morphology-{task}").model()
        ys, img_p, fused = [], [], {k: [] for k in ("reader", "coarse", "refined")}
        for cid, y, p in zip(z["case_id"], z["labels"], z["probs"]):
            f = feats.get(str(cid), {})
            if not all(k in f for k in fused):
                continue
            ys.append(int(y)); img_p.append(float(p))
            for k in fused:
                fused[k].append(float(head.predict_proba(head_inputs([p], f[k]))[0, 1]))
        ys = np.array(ys)
        r = {"lesions": len(ys), "image_only": roc_auc(ys, np.array(img_p)).auc}
        for k, v in fused.items():
            r["fused_" + k] = roc_auc(ys, np.array(v)).auc
        r["p_refined_vs_image"] = delong_test(ys, np.array(fused["refined"]), np.array(img_p)).p_value
        res[task] = r
        print(task, json.dumps(r), flush=True)
    (Path(a.work) / "evaluation.json").write_text(json.dumps(res, indent=1))

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--work", default="runs/refine", help="folder for checkpoints, caches and evaluation.json")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--jitter", type=float, default=0.15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--evaluate", action="store_true", help="evaluate the trained refiner instead of training it")
    ap.add_argument("--val", default="runs/cv/fold0", help="folder of val_malignancy.npz and val_risk.npz")
    a = ap.parse_args()
    evaluate(a) if a.evaluate else train(a)


if __name__ == "__main__":
    main()
