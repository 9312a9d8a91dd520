"""Rendering benchmark: frames per second to MP4, and memory vs layer count.

    python benchmarks/bench_render.py            # prints one JSON object
    python benchmarks/bench_render.py --layers-small 50 --layers-big 500

* ``fps``: 53 layers (the Conv2d calls of ResNet-50, with their map
  resolutions 112..7) on one 224x224 image, written to MP4. Reported for the
  default panel (upscaled to 320 px so captions are legible), for 224 px
  panels, and for local | global side by side; ``render_only`` excludes
  the encoder.
* ``memory``: peak memory while writing an MP4 of 50 and of 500 layers, each
  in a fresh process: Python/numpy allocations during the write
  (tracemalloc peak) and the process's peak RSS above its RSS just before
  the write. The raw maps themselves (inputs, built before) are excluded;
  ffmpeg runs in its own process. Flat means: the 500-layer figures are
  those of 50 layers, not 10x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from camanim.core.layers import LayerInfo
from camanim.core.maps import LayerMaps

# ResNet-50's 53 Conv2d calls at 224x224: (count, channels, resolution)
_RESNET50 = [(1, 64, 112), (10, 256, 56), (1, 128, 56), (12, 512, 28), (1, 256, 28),
             (18, 1024, 14), (1, 512, 14), (9, 2048, 7)]


def synthetic_maps(n_layers: int, size: int = 224, seed: int = 0) -> LayerMaps:
    """``n_layers`` smooth random maps cycling through ResNet-50's shapes."""
    shapes = [(c, r) for k, c, r in _RESNET50 for _ in range(k)]
    g = torch.Generator().manual_seed(seed)
    raw, infos = [], []
    for i in range(n_layers):
        c, r = shapes[int(i * len(shapes) / n_layers)]
        m = torch.rand(1, 1, max(2, r // 4), max(2, r // 4), generator=g)
        m = torch.nn.functional.interpolate(m, size=(r, r), mode="bilinear", align_corners=False)[0]
        raw.append(m * (1 + i))
        name = f"layer{i}.conv"
        infos.append(LayerInfo(name=name, module_name=name, call=1, order=i, type="Conv2d",
                               output_shape=(1, c, r, r), params=c * 9 * c, params_total=c * 9 * c,
                               depth=1, layout="nchw"))
    return LayerMaps(names=[i.name for i in infos], raw=raw, input_size=(size, size), layers=infos,
                     targets=torch.tensor([3]), method="gradcam", seconds=[0.01] * n_layers)


def image(size: int = 224) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([yy, xx, 1 - yy])[None]


def bench_fps(n_layers: int = 53, repeats: int = 2) -> dict:
    from camanim.viz.render import FrameRenderer
    from camanim.viz.video import write_video

    maps, img = synthetic_maps(n_layers), image()
    road = np.linspace(-0.1, 0.5, n_layers)[:, None]
    out: dict = {"layers": n_layers, "input": "224x224"}
    with tempfile.TemporaryDirectory() as tmp:
        write_video(Path(tmp) / "warm.mp4", img, synthetic_maps(3), road=road[:3])  # imports, fonts
        for label, kw in (("default_panel", {}), ("panel_224", {"size": 224}),
                          ("both_side_by_side", {"normalization": "both"})):
            r = FrameRenderer(img, maps, road=road, **kw)
            best_r = best_w = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                for _frames in FrameRenderer(img, maps, road=road, **kw).iter_layers():
                    pass
                best_r = min(best_r, time.perf_counter() - t)
                t = time.perf_counter()
                path = write_video(Path(tmp) / f"{label}.mp4", img, maps, road=road, **kw)
                best_w = min(best_w, time.perf_counter() - t)
            out[label] = {"frame": f"{r.frame_size[1]}x{r.frame_size[0]}",
                          "mp4_fps": round(n_layers / best_w, 1),
                          "render_only_fps": round(n_layers / best_r, 1),
                          "mp4_seconds": round(best_w, 3),
                          "mp4_kib": round(path.stat().st_size / 1024, 1)}
        t = time.perf_counter()
        write_video(Path(tmp) / "g.gif", img, maps, road=road)
        out["gif_fps_default_panel"] = round(n_layers / (time.perf_counter() - t), 1)
    return out


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def memory_child(n_layers: int, fmt: str) -> dict:
    """Run in a fresh process: peak memory of writing ``n_layers`` frames."""
    import tracemalloc

    from camanim.viz.video import write_video

    img = image()
    with tempfile.TemporaryDirectory() as tmp:
        write_video(Path(tmp) / f"warm.{fmt}", img, synthetic_maps(3))  # imports, fonts, caches
        maps = synthetic_maps(n_layers)
        base = _rss_kib()
        tracemalloc.start()
        t = time.perf_counter()
        write_video(Path(tmp) / f"v.{fmt}", img, maps)
        secs = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"layers": n_layers, "format": fmt, "tracemalloc_peak_mib": round(peak / 2**20, 2),
            "rss_peak_above_start_mib": round(max(0, maxrss - base) / 1024, 1),
            "seconds": round(secs, 2)}


def bench_memory(small: int, big: int, formats: tuple[str, ...] = ("mp4", "gif")) -> dict:
    res: dict = {}
    for fmt in formats:
        rows = []
        for n in (small, big):
            p = subprocess.run([sys.executable, __file__, "--child", str(n), fmt],
                               capture_output=True, text=True, check=True)
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        a, b = rows
        res[fmt] = {
            f"{small}_layers": a,
            f"{big}_layers": b,
            "tracemalloc_ratio": round(
                b["tracemalloc_peak_mib"] / max(a["tracemalloc_peak_mib"], 1e-6), 2
            ),
        }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=53)
    ap.add_argument("--layers-small", type=int, default=50)
    ap.add_argument("--layers-big", type=int, default=500)
    ap.add_argument("--child", nargs=2, metavar=("N", "FMT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(memory_child(int(args.child[0]), args.child[1])))
        return
    report = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "fps": bench_fps(args.layers),
              "memory": bench_memory(args.layers_small, args.layers_big)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
