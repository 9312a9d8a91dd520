"""``camanim sanity`` cost: one 224 px image, torchvision ResNet-50 (random
weights, seeded), Grad-CAM on its 53 Conv2d layers, cascading randomization
of the top-level children (fc, layer4, ..., conv1). Prints one JSON object.

The machine's load (``os.getloadavg``) is reported before and after, as the
wall time depends on it on a shared CPU; ``cpu_seconds`` (this process's
CPU time) does much less: with ``--threads 1`` it is about the wall time
the same work takes on one idle core.

Usage:
    python benchmarks/bench_sanity.py                  # the issue's setting
    python benchmarks/bench_sanity.py --threads 1 --profile 20   # + top-20 cProfile rows
    python benchmarks/bench_sanity.py --cli            # through `camanim sanity` (in process)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    """Time one sanity check and print the figures as JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--layers", default="conv", help="layer selector (default conv)")
    p.add_argument("--cli", action="store_true", help="run `camanim sanity` on a PNG instead")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print the N costliest functions (cumulative) to stderr")
    args = p.parse_args()
    load0 = os.getloadavg()
    t_import = time.perf_counter()
    import numpy as np
    import torch
    import torchvision

    import camanim

    if args.threads:
        torch.set_num_threads(args.threads)
    t_import = time.perf_counter() - t_import
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0, cpu0 = time.perf_counter(), time.process_time()
    if args.cli:
        from PIL import Image

        from camanim.cli import main as cli_main

        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "img.png"
            rgb = (np.random.default_rng(0).random((args.size, args.size, 3)) * 255).astype("uint8")
            Image.fromarray(rgb).save(png)
            rc = cli_main(["sanity", str(png), "--model", "resnet50", "--size", str(args.size),
                           "--layers", args.layers, "--out", str(Path(tmp) / "out"), "--quiet"])
        report = None
    else:
        report = camanim.sanity_check(model, x, "gradcam", args.layers)
        rc = 0
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - cpu0
    if prof is not None:
        import pstats

        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(args.profile)
    print(json.dumps({
        "what": "camanim sanity, ResNet-50, Grad-CAM, one image" + (" (CLI)" if args.cli else ""),
        "image_size": args.size, "layers": len(report.layers) if report else args.layers,
        "blocks": len(report.blocks) if report else None, "exit_status": rc,
        "seconds": round(seconds, 2), "import_seconds": round(t_import, 2),
        # CPU time of this process: with --threads 1, about the wall time on an idle core,
        # whatever else the machine runs
        "cpu_seconds": round(cpu_seconds, 2),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "loadavg_before": [round(v, 2) for v in load0],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
    }, indent=1))


if __name__ == "__main__":
    main()
