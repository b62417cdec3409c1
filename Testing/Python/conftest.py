"""Shared fixtures.  Real data lives in ../shared/data beside the repository (tests only; the product
never needs it at run time)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("BREASTDLR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (set BREASTDLR_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    """Keep the CPU tests polite on a 2-core machine."""
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))
    except ImportError:
        pass
    yield


def write_csv(path: Path, header, rows) -> Path:
    """A small CSV table for a test (header, then rows)."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def make_tiny_bundles(folder: Path, seg_bias: float = 5.0, seed: int = 0) -> dict:
    """Small real bundles for pipeline tests (built and saved through the product's own code).

    The segmenter is the real UNet/EfficientNet-b0 with its last layer set so that every pixel is lesion
    (``seg_bias`` > 0) or none is (< 0): the pipeline's mechanics then have a known answer.  The classifiers
    are EmbeddingNet/ResNet18 at 64×64 with seeded random weights; their probabilities are not meaningful,
    only their plumbing is tested.
    """
    import torch

    from BreastDLRLib.bundles import save_bundle
    from BreastDLRLib.networks.classifiers import build_classifier
    from BreastDLRLib.networks.segmenter import build_segmenter

    torch.manual_seed(seed)
    common = {"version": "0.0.1", "provenance": {"data": "none: test bundle"}, "metrics": {},
              "licence": "Apache-2.0", "intended_use": "Tests only."}
    seg = build_segmenter()
    head = seg.segmentation_head[0]
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.constant_(head.bias, seg_bias)
    out = {}
    out["segmenter"] = save_bundle(folder / "seg", seg, {
        **common, "name": "test-segmenter", "role": "segmenter", "architecture": "Unet",
        "arguments": {"encoder_name": "efficientnet-b0", "in_channels": 1, "classes": 1},
        "input": {"size": [64, 64], "normalisation": "zscore"}, "labels": ["background", "lesion"],
        "thresholds": {"probability": 0.5, "min_lesion_mm3": 1.0, "min_lesion_mm2": 2.0}}, "test card").path
    for role in ("malignancy", "risk"):
        net = build_classifier("EmbeddingNet", backbone="resnet18", embedding_dim=16)
        out[role] = save_bundle(folder / role, net, {
            **common, "name": f"test-{role}", "role": role, "architecture": "EmbeddingNet",
            "arguments": {"backbone": "resnet18", "embedding_dim": 16},
            "input": {"size": [64, 64], "margin": 0.3, "frames": 1}, "labels": ["negative", "positive"],
            "thresholds": {"probability": 0.5}}, "test card").path
    return out


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory) -> dict:
    return make_tiny_bundles(tmp_path_factory.mktemp("bundles"))
