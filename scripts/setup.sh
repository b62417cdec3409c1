#!/usr/bin/env bash
# Create .venv/ in the repository root and install BreastDLR with its pinned requirements.
# Idempotent: re-running with unchanged requirements only checks the stamp.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
req="${1:-requirements-test.txt}"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.breastdlr-$(cat requirements.txt "$req" pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing pinned requirements from $req into .venv (first time: several minutes)" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$req" 2> >(grep -v "is ignored: it is neither" >&2) || { echo "[setup] pip failed" >&2; exit 1; }
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e . 2> >(grep -v "is ignored: it is neither" >&2) || { echo "[setup] pip failed" >&2; exit 1; }
  .venv/bin/python -c "import torch, torchvision, segmentation_models_pytorch, SimpleITK, pydicom, BreastDLRLib" \
    || { echo "[setup] installation incomplete: see the messages above" >&2; exit 1; }
  touch "$stamp"
fi
