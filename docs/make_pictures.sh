#!/usr/bin/env bash
# The README's pictures, from a run of the default example:
#
#   docs/make_pictures.sh                  # runs examples/finetune_bus/train.py (~5-8 min
#                                          # on a 2-core CPU), then draws from that run
#   docs/make_pictures.sh RUN_DIR          # draws from an existing run, e.g.
#                                          # runs/finetune_bus/version_0
#
# Writes into docs/ (or $OUT_DIR):
#   tensorboard_images.png  TensorBoard's Images tab as the browser shows it
#                           (headless Chromium; skipped, with a note, without it)
#   ybroad_heatmap.png      the ybROAD heatmap (epoch x layer) of the first probe
#   frames_strip.png        CAManim frames of early, middle and late layers, last epoch
#   viewer_tab.png          TensorBoard's CAManim tab (headless Chromium, as above)
#   viewer_report.png       the run's `camanim report` opened from the file
#
# PYTHON picks the interpreter (default: python3), CHROMIUM the browser
# (default: chromium, or chromium-browser / google-chrome when found).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT_DIR:-$here}"
mkdir -p "$OUT_DIR"

if [[ $# -ge 1 ]]; then
    run="$1"
else
    out="$(mktemp -d "${TMPDIR:-/tmp}/camanim_pictures.XXXXXX")"
    echo "training the default example into $out (a few minutes) ..."
    (cd "$root" && "$PYTHON" examples/finetune_bus/train.py --out "$out" --no-progress)
    run="$(ls -d "$out"/finetune_bus/version_* | sort -V | tail -n 1)"
fi
if [[ ! -f "$run/ybroad.csv" ]]; then
    echo "error: $run has no ybroad.csv: pass the folder of one run of the example" \
         "(e.g. runs/finetune_bus/version_0), or no argument to train one" >&2
    exit 2
fi
echo "run: $run"

# ------------------------------------------------ heatmap and frame strip
"$PYTHON" - "$run" "$OUT_DIR" <<'PY'
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from PIL import Image

from camanim.runs.study import read_ybroad_csv
from camanim.viz.plots import heatmap_image

run, out = Path(sys.argv[1]), Path(sys.argv[2])


def save(img: Image.Image, name: str) -> None:
    path = out / name
    img.save(path, optimize=True)
    if path.stat().st_size > 300_000:          # a palette keeps the README light
        img.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"wrote {path} ({img.width}x{img.height}, {path.stat().st_size // 1024} KB)")


series = [s for s in read_ybroad_csv(run / "ybroad.csv", run=run.name) if s.probe != "mean"]
if not series:
    sys.exit(f"error: {run / 'ybroad.csv'} holds no probe")
s = series[0]
save(Image.fromarray(heatmap_image(s.road, s.epochs, s.names,
                                   title=f"{s.probe}: ybROAD by epoch ({s.method})")),
     "ybroad_heatmap.png")

videos = sorted((run / "videos").glob(f"{s.probe}_epoch*_local.mp4")) or \
    sorted((run / "videos").glob("*_local.mp4"))
if not videos:
    sys.exit(f"error: no *_local.mp4 in {run / 'videos'} (was the run made with --no-cam?)")
frames = np.stack(list(iio.imiter(videos[-1])))
picks = sorted({0, len(frames) // 2, len(frames) - 1})
gap = 6
h, w = frames.shape[1:3]
strip = Image.new("RGB", (len(picks) * w + (len(picks) - 1) * gap, h), (255, 255, 255))
for k, i in enumerate(picks):
    strip.paste(Image.fromarray(frames[i]), (k * (w + gap), 0))
print(f"frames {picks} of {len(frames)} from {videos[-1].name}")
save(strip, "frames_strip.png")
PY

# ------------------------------------------------ TensorBoard screenshot
browser="${CHROMIUM:-}"
if [[ -z "$browser" ]]; then
    for b in chromium chromium-browser google-chrome; do
        if command -v "$b" >/dev/null 2>&1; then browser="$b"; break; fi
    done
fi
if [[ -z "$browser" ]]; then
    echo "note: no Chromium found (Debian: apt-get install chromium): skipping" \
         "tensorboard_images.png; the other pictures are made"
    exit 0
fi
port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$PYTHON" -m tensorboard.main --logdir "$run" --host 127.0.0.1 --port "$port" \
    --samples_per_plugin images=100 >/dev/null 2>&1 &
tb=$!
trap 'kill "$tb" 2>/dev/null || true' EXIT
for _ in $(seq 60); do
    if "$PYTHON" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/data/plugins_listing', timeout=2)" 2>/dev/null; then
        break
    fi
    sleep 1
done
shoot() {  # shoot FILE URL WIDTH HEIGHT: a screenshot, kept light
    "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$3,$4" \
        --virtual-time-budget=20000 --screenshot="$1" "$2" >/dev/null 2>&1
    "$PYTHON" - "$1" <<'PY'
import sys
from pathlib import Path

from PIL import Image

path = Path(sys.argv[1])
img = Image.open(path).convert("RGB")
img.save(path, optimize=True)
if path.stat().st_size > 300_000:
    img.quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
print(f"wrote {path} ({img.width}x{img.height}, {path.stat().st_size // 1024} KB)")
PY
}
shoot "$OUT_DIR/tensorboard_images.png" "http://127.0.0.1:$port/#images" 1400 1700
if [[ -d "$run/viewer" ]]; then
    shoot "$OUT_DIR/viewer_tab.png" "http://127.0.0.1:$port/#camanim" 1400 1000
    report="$(mktemp -d "${TMPDIR:-/tmp}/camanim_report.XXXXXX")/report.html"
    "$PYTHON" -m camanim report "$run" --out "$report"
    # one layer (two thirds down) at the first and the last epoch, side by side
    view="$("$PYTHON" -c 'import json, sys; i = json.load(open(sys.argv[1]))
print("layer=%d&compare_epoch=%d" % (2 * len(i["layers"]) // 3, i["epochs"][0]["epoch"]))' \
        "$run/viewer/index.json")"
    shoot "$OUT_DIR/viewer_report.png" "file://$report#$view" 1300 900
else
    echo "note: $run has no viewer/ (a run made before the CAManim tab): skipping" \
         "viewer_tab.png and viewer_report.png"
fi
