#!/usr/bin/env bash
# Set up .venv and run the main job on the bundled defaults: analyse the bundled synthetic ABVS volume and the
# bundled real 2D image (segmented automatically, then with its reader outline) with the bundled models.  Results go to demo-output/ (report.html, findings.json, ...).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh requirements.txt
out="${1:-demo-output}"
.venv/bin/breastdlr analyze Resources/Samples/synthetic_abvs.nrrd --out "$out/abvs" --birads 4a --clinical age=52
.venv/bin/breastdlr analyze Resources/Samples/breast_us_sample.png --spacing 0.109768 --out "$out/image" --birads 4a --clinical age=38
# the same image with the reader's outline (the sample's mask): the morphology models score it too
.venv/bin/breastdlr analyze Resources/Samples/breast_us_sample.png --spacing 0.109768 --out "$out/image-outline" --birads 4a \
    --outline Resources/Samples/breast_us_sample_mask.png
echo "Open $out/abvs/report.html, $out/image/report.html and $out/image-outline/report.html"
