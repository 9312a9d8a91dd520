"""ybROAD of every Conv2d layer of ResNet-50 vs ROADCombined run per layer.

Prints one JSON object. Both sides run in this process, interleaved in
groups of layers (and of masks for the imputation-alone comparison) so that
a change of load on a shared machine hits both alike:

* end to end: ``camanim.ybroad`` on the GradCAM maps of the selected layers
  vs ``pytorch_grad_cam.metrics.road.ROADCombined`` called once per layer,
  both with imputation noise 0 (the reference's imputer is patched to
  noise 0), softmax score of the predicted class, percentiles 20/40/60/80;
* imputation alone: our batched solver vs ``NoisyLinearImputer(noise=0)``
  on the same masks (the ROAD masks of the selected layers), per mask.

Usage:
    python benchmarks/bench_road.py                 # all 53 Conv2d layers
    python benchmarks/bench_road.py --layers 4      # quick check
    python benchmarks/bench_road.py --device cuda --threads 2
    # the accelerators' solver path on the CPU:
    python benchmarks/bench_road.py --solve-dtype float32

The imputation solves float32 images in float32 (``solve_dtype``); the
JSON says which dtype each part used and whether ybROAD's forwards ran
through the BatchNorm-folded stand-in (``--no-fold``: the model itself).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gradcam_maps(model, x, target):
    """LayerMaps of every Conv2d call (camanim's engine, or pytorch-grad-cam
    looped per layer when the engine is not there)."""
    try:
        from camanim import CAManim
        return CAManim(model, "gradcam", layers="conv", progress=False)(x, [target])
    except ImportError:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        from camanim.core.layers import list_layers
        from camanim.core.maps import LayerMaps
        table = list_layers(model, x, "conv")
        modules = dict(model.named_modules())
        raw = []
        for info in table.selected:
            with GradCAM(model, [modules[info.module_name]]) as cam:
                raw.append(torch.from_numpy(cam(x, [ClassifierOutputTarget(target)])))
        return LayerMaps(names=table.names, raw=raw, input_size=tuple(x.shape[-2:]),
                         layers=list(table.selected), targets=torch.tensor([target]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=None,
                    help="evenly spaced subset of the 53 Conv2d layers (default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--group", type=int, default=4, help="layers per interleaved group")
    ap.add_argument("--masks", type=int, default=32,
                    help="masks for the imputation-alone comparison (from the selected layers)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("end-to-end", "imputation"), default=None,
                    help="run one of the two comparisons")
    ap.add_argument("--solve-dtype", choices=("auto", "float32", "float64"), default="auto",
                    help="dtype of the imputation-alone solve (auto: solve_dtype of the device and "
                         "the float32 images: float32)")
    ap.add_argument(
        "--no-fold",
        action="store_true",
        help="ybroad(fold=False): run the model itself, not the BatchNorm-folded stand-in",
    )
    args = ap.parse_args(argv)

    import torchvision
    from pytorch_grad_cam.metrics import road as ref_road
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    from camanim.metrics.imputation import impute, solve_dtype
    from camanim.metrics.road import road_masks, ybroad

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sdt = (solve_dtype(device, torch.float32) if args.solve_dtype == "auto"
           else getattr(torch, args.solve_dtype))
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet50(weights=None).to(device).eval()
    x = torch.randn(1, 3, args.size, args.size, device=device)
    with torch.no_grad():
        target = int(model(x).argmax(1))
    t = time.perf_counter()
    maps = gradcam_maps(model, x, target)
    t_maps = time.perf_counter() - t
    n_all = len(maps)
    if args.layers and args.layers < n_all:
        idx = np.unique(np.round(np.linspace(0, n_all - 1, args.layers)).astype(int)).tolist()
        maps = maps.select(idx)
    cams = maps.upsample("local")                       # (L, 1, H, W)

    class NoiselessImputer(ref_road.NoisyLinearImputer):
        def __init__(self, noise=0.0, weighting=ref_road.neighbors_weights):  # noqa: ARG002 - the reference's signature; noise is forced to 0
            super().__init__(noise=0.0, weighting=weighting)

    ref_road.NoisyLinearImputer = NoiselessImputer
    targets = [ClassifierOutputSoftmaxTarget(target)]

    # ------------------------------------------------------ end to end
    ours_s = ref_s = 0.0
    ours_scores, ref_scores = [], []
    extra: dict = {}
    load0 = os.getloadavg()
    for g in range(0, len(maps) if args.only != "imputation" else 0, args.group):
        sub = maps.select(list(range(g, min(g + args.group, len(maps)))))
        _sync(device)
        t = time.perf_counter()
        res = ybroad(model, x, sub, targets=[target], noise=0.0, progress=False,
                     fold=not args.no_fold)
        _sync(device)
        ours_s += time.perf_counter() - t
        ours_scores.append(res.scores[:, 0])
        extra = res.extra
        t = time.perf_counter()
        for c in cams[g:g + args.group]:
            ref_scores.append(float(ref_road.ROADCombined([20, 40, 60, 80])(
                x, c.cpu().numpy(), targets, model)[0]))
        ref_s += time.perf_counter() - t
    ours_scores = np.concatenate(ours_scores) if ours_scores else np.zeros(0)
    ref_scores = np.asarray(ref_scores)

    # ------------------------------------------------- imputation alone
    keep = torch.cat([road_masks(c.to(device), (20, 40, 60, 80))[:, 0] for c in cams])  # (8L, H, W)
    pick = np.unique(
        np.round(np.linspace(0, keep.shape[0] - 1, min(args.masks, keep.shape[0]))).astype(int)
    )
    keep = keep[torch.as_tensor(pick, device=device)]
    if args.only == "end-to-end":
        keep = keep[:0]
    ours_i = ref_i = 0.0
    diff = 0.0
    step = 8
    if keep.shape[0]:
        impute(x.expand(2, -1, -1, -1), keep[:2], dtype=sdt)     # warm-up
    for g in range(0, keep.shape[0], step):
        k = keep[g:g + step]
        _sync(device)
        t = time.perf_counter()
        filled = impute(x.expand(k.shape[0], -1, -1, -1), k, dtype=sdt)
        _sync(device)
        ours_i += time.perf_counter() - t
        t = time.perf_counter()
        refs = [NoiselessImputer()(x[0].cpu(), m.cpu().float()) for m in k]
        ref_i += time.perf_counter() - t
        diff = max(
            diff, max(float((f.cpu() - r).abs().max()) for f, r in zip(filled, refs, strict=False))
        )
    n_masks = int(keep.shape[0])

    out = {
        "benchmark": "ybROAD, ResNet-50 (random weights), GradCAM maps of Conv2d layers",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "image": [args.size, args.size], "layers": len(maps), "layers_available": n_all,
        "percentiles": [20, 40, 60, 80], "noise": 0.0, "target": target,
        "maps_seconds": round(t_maps, 3),
        "end_to_end": None if not len(ref_scores) else {
            "ours_s": round(ours_s, 3), "reference_s": round(ref_s, 3),
            "speedup": round(ref_s / ours_s, 2),
            "solve_dtype": str(solve_dtype(device, x.dtype)).replace("torch.", ""),
            "folded_model": extra.get("folded"),
            "forward_batch_size": extra.get("batch_size"),
            "layers_per_solve": extra.get("layers_per_solve"),
            "max_abs_score_diff": float(np.abs(ours_scores - ref_scores).max()),
            "score_range": [float(ref_scores.min()), float(ref_scores.max())],
        },
        "imputation": None if not n_masks else {
            "masks": n_masks, "mean_removed_fraction": round(float((~keep).float().mean()), 3),
            "solve_dtype": str(sdt).replace("torch.", ""),
            "ours_ms_per_mask": round(1000 * ours_i / n_masks, 2),
            "reference_ms_per_mask": round(1000 * ref_i / n_masks, 2),
            "speedup": round(ref_i / ours_i, 2), "max_abs_pixel_diff": diff,
        },
        "loadavg_start_end": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
