"""All-layer CAMs: camanim's one pass vs pytorch-grad-cam looped per layer.

ResNet-50 (random weights), 224x224, GradCAM, batch 1 and 4, on
``layers="conv"`` (53 Conv2d layers) and ``layers="all"`` (every spatial
layer). Both sides produce every layer's map at input size, min-max
normalized (ours: ``maps.upsample("local")``). Runs are interleaved in one
process; the median of ``--repeats`` is reported with the max map difference
and peak memory. Prints one JSON object.

    python benchmarks/bench_cam.py                # full (several minutes on 2 CPU cores)
    python benchmarks/bench_cam.py --ref-layers 8 # time the reference on 8 evenly
                                                  # spaced layers, extrapolate
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from pytorch_grad_cam import GradCAM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import peak_memory, timed  # noqa: E402 - after the sys.path set-up above

import camanim  # noqa: E402 - after the sys.path set-up above


def reference(model, layers, x, targets):
    """pytorch-grad-cam, one GradCAM per layer: (L, B, H, W)."""
    modules = dict(model.named_modules())
    out = []
    for info in layers:
        with GradCAM(model, [modules[info.module_name]]) as cam:
            out.append(cam(x, targets))
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--selectors", nargs="+", default=["conv", "all"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-repeats", type=int, default=1)
    ap.add_argument(
        "--ref-layers",
        type=int,
        default=0,
        help="time the reference on N evenly spaced layers only and extrapolate (0 = all)",
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().to(device)
    results = []
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size, device=device)
        for sel in args.selectors:
            anim = camanim.CAManim(model, "gradcam", sel, progress=False)
            layers = anim.layer_table(x).selected
            anim(x)  # warm-up (discovery is cached per input shape)
            ref_layers = layers
            if args.ref_layers and args.ref_layers < len(layers):
                idx = np.unique(
                    np.linspace(0, len(layers) - 1, args.ref_layers).round().astype(int)
                )
                ref_layers = [layers[i] for i in idx]
            ours_t, ref_t, ours_mem, ref_mem = [], [], [], []
            diff, trapped_diff = 0.0, 0.0
            # the reference is fooled on outputs overwritten in place later and
            # on modules called more than once (PRODUCT.md traps): report those apart
            calls = anim.layer_table(x).calls
            reused = {i.module_name for i in calls if i.call > 1}
            trapped = {i.name for i in layers if i.overwritten or i.module_name in reused}
            for rep in range(max(args.repeats, args.ref_repeats)):
                if rep < args.repeats:
                    with peak_memory(device) as mem:
                        (up, targets), t = timed(lambda: _ours(anim, x), device)  # noqa: B023 - run now
                    ours_t.append(t)
                    ours_mem.append(mem["peak_mib"])
                if rep < args.ref_repeats:
                    tg = [camanim.core.inputs.logit_target(int(c)) for c in targets]
                    with peak_memory(device) as mem:
                        ref, t = timed(lambda: reference(model, ref_layers, x, tg),  # noqa: B023 - run now
                                   device)
                    ref_t.append(t * len(layers) / len(ref_layers))
                    ref_mem.append(mem["peak_mib"])
                    for j, info in enumerate(ref_layers):
                        d = float(np.abs(up[layers.index(info)].cpu().numpy() - ref[j]).max())
                        if info.name in trapped:
                            trapped_diff = max(trapped_diff, d)
                        else:
                            diff = max(diff, d)
            ours, refm = statistics.median(ours_t), statistics.median(ref_t)
            results.append(
                {
                    "batch": batch,
                    "layers": sel,
                    "n_layers": len(layers),
                    "ours_s": round(ours, 4),
                    "reference_s": round(refm, 3),
                    "reference_layers_timed": len(ref_layers),
                    "reference_extrapolated": len(ref_layers) < len(layers),
                    "speedup": round(refm / ours, 1),
                    "max_abs_map_diff": diff,
                    "layers_where_reference_is_trapped": len(trapped),
                    "max_abs_map_diff_on_trapped_layers": trapped_diff,
                    "ours_peak_mib": round(max(ours_mem), 1),
                    "reference_peak_mib": round(max(ref_mem), 1),
                }
            )
            print(json.dumps(results[-1]), file=sys.stderr)
    print(
        json.dumps(
            {
                "benchmark": "bench_cam",
                "model": "resnet50 (random weights)",
                "method": "gradcam",
                "size": args.size,
                "device": str(device),
                "device_name": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "results": results,
            },
            indent=2,
        )
    )


def _ours(anim, x):
    maps = anim(x)
    return maps.upsample("local"), maps.targets


if __name__ == "__main__":
    main()
