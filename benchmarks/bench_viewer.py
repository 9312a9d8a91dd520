"""Viewer data benchmark: bytes the callback adds per epoch for the CAManim
tab and the report, and the report's size.

    python benchmarks/bench_viewer.py              # prints one JSON object
    python benchmarks/bench_viewer.py --maps synthetic   # no ResNet-50 pass (fast)

* ``full``: the full setting of issue 20: 4 probes x 53 layers (ResNet-50's
  Conv2d calls), local and global, 224 px input, written by
  `camanim.viewer.data.write_viewer_epoch` (what the callback's media queue
  calls). Maps: Grad-CAM of a random-weight ResNet-50 on 4 smooth random
  images (``--maps resnet50``, default), or smooth random maps of the same
  shapes (``--maps synthetic``). ``bytes_per_epoch``: the sprite sheets of
  one epoch plus the growth of ``index.json``; ``bytes_once``: the probes'
  backgrounds (written once per run); the budget is 3 MiB an epoch.
* ``example``: the default example run (examples/finetune_bus: 4 probes x
  16 layers, 128 px, 6 epochs plus the fit-end epoch): the report's size,
  measured with ``camanim.viewer.report.write_report`` on such a run's data.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_render import synthetic_maps  # noqa: E402 - the benchmarks' folder first

from camanim.core.maps import LayerMaps  # noqa: E402
from camanim.viewer.data import VIEWER_DIR, write_viewer_epoch  # noqa: E402
from camanim.viewer.report import write_report  # noqa: E402

MIB = 2**20


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 16, size // 16, generator=g)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear") * 2 - 1


def resnet50_maps(x: torch.Tensor, max_layers: int | None) -> LayerMaps:
    import torchvision

    from camanim import CAManim

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    return CAManim(model, "gradcam", layers="conv", max_layers=max_layers)(x)


def batch_maps(n_layers: int, n: int, size: int) -> LayerMaps:
    one = [synthetic_maps(n_layers, size, seed=b) for b in range(n)]
    m = one[0]
    return LayerMaps(names=m.names, raw=[torch.cat([o.raw[i] for o in one]) for i in range(len(m))],
                     input_size=m.input_size, layers=m.layers,
                     targets=torch.arange(n), method=m.method, seconds=m.seconds)


def du(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def run_epochs(out: Path, x: torch.Tensor, maps: LayerMaps, epochs: int) -> dict:
    probes = [f"probe{b}" for b in range(x.shape[0])]
    v = out / VIEWER_DIR
    sizes, seconds = [], []
    for e in range(epochs):
        before = du(v, "maps/*.png") + du(v, "index.json")
        t = time.perf_counter()
        write_viewer_epoch(out, epoch=e, step=e, images=x, maps=maps, probes=probes,
                           method="gradcam", road=torch.rand(len(maps), len(probes)).numpy(),
                           chance={p: 0.0 for p in probes})
        seconds.append(time.perf_counter() - t)
        sizes.append(du(v, "maps/*.png") + du(v, "index.json") - before)
    return {"layers": len(maps), "probes": len(probes), "input": list(x.shape[-2:]),
            "bytes_per_epoch": max(sizes), "mib_per_epoch": round(max(sizes) / MIB, 3),
            "bytes_once": du(v, "bg_*.f32"), "write_s_per_epoch": round(min(seconds), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", choices=("resnet50", "synthetic"), default="resnet50")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out: dict = {"maps": args.maps}
    with tempfile.TemporaryDirectory() as tmp:
        x = images(4, 224)
        maps = resnet50_maps(x, None) if args.maps == "resnet50" else batch_maps(53, 4, 224)
        out["full"] = run_epochs(Path(tmp) / "full", x, maps, epochs=2)
        out["full"]["within_3_mib"] = out["full"]["bytes_per_epoch"] <= 3 * MIB
        x = images(4, 128)
        maps = resnet50_maps(x, 16) if args.maps == "resnet50" else batch_maps(16, 4, 128)
        ex = run_epochs(Path(tmp) / "example", x, maps, epochs=7)
        t = time.perf_counter()
        html = write_report(Path(tmp) / "example", Path(tmp) / "report.html")
        ex["report_bytes"] = html.stat().st_size
        ex["report_mib"] = round(html.stat().st_size / MIB, 2)
        ex["report_s"] = round(time.perf_counter() - t, 2)
        ex["epochs"] = 7
        out["example"] = ex
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
