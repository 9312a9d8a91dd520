"""SISE (mu = 0, 0.3, 0.5) vs Ada-SISE vs Grad-CAM: runtime, mask forwards, ROAD.

Prints one JSON object. Random weights (no download here); the model and the
images are seeded, so counts are repeatable. Defaults reproduce the papers'
setting (ResNet-50, 224 x 224, one image); shrink with ``--size`` / ``--arch``
for a quick run on a busy CPU.

    python benchmarks/bench_seed_methods.py                       # ResNet-50, 224
    python benchmarks/bench_seed_methods.py --arch resnet18 --size 64
    python benchmarks/bench_seed_methods.py \\
        --bus-checkpoint runs/finetune_bus/version_0/checkpoints/best-*.ckpt
        # the fine-tuning example's trained model on its malignant synthetic test
        # images: ROAD and EBPG (share of map energy inside the lesion mask) per method

Timing: one torch thread by default and both wall and process-CPU seconds
are reported; on a CPU shared with other jobs the CPU seconds (and the mask
forward counts) are the figures to compare, wall time swings with the load.

Anchors (SISE paper, ResNet-50 on a T4): SISE 9.21 s at mu = 0, 2.18 s at
0.3, 0.65 s at 0.5; Grad-CAM 19 ms. Targets (product brief): Ada-SISE >= 30%
less time than SISE at mu = 0, with ROAD within 10% of SISE's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import camanim  # noqa: E402 - after the sys.path set-up above
from camanim.methods.sise import ada_sise, sise  # noqa: E402 - after the sys.path set-up above

ANCHORS_T4 = {"sise_mu0_s": 9.21, "sise_mu0.3_s": 2.18, "sise_mu0.5_s": 0.65,
              "gradcam_s": 0.019}


def road_of(model, x, maps, trials, note):
    """ROAD (ybroad's, softmax score) of the last frame of ``maps``, mean over
    images and noise trials, or None when camanim.metrics.road is not there."""
    try:
        from camanim.metrics.road import ybroad
    except ImportError:
        note.append("camanim.metrics.road is not there yet: ROAD skipped")
        return None
    last = maps.select([len(maps) - 1])
    res = ybroad(model, x, last, targets=maps.targets, trials=trials, progress=False)
    return round(float(res.scores.mean()), 4)


def timed(fn, repeat):
    """Median wall and process-CPU seconds of ``repeat`` calls, and the last result.
    CPU seconds are the steadier figure on a shared machine."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        c, t = time.process_time(), time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50", help="torchvision ResNet (resnet18/34/50/101)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--mus", default="0,0.3,0.5")
    p.add_argument("--batch-size", type=int, default=32, help="masked images per forward")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: steady timings on a shared CPU; 0: torch default)")
    p.add_argument("--repeat", type=int, default=1, help="SISE/Ada-SISE runs (median)")
    p.add_argument("--road-trials", type=int, default=3, help="ROAD noise trials")
    p.add_argument("--no-road", action="store_true")
    p.add_argument("--bus-checkpoint", default=None, metavar="CKPT",
                   help="use the examples/finetune_bus checkpoint and its synthetic malignant "
                        "test images (with lesion masks: EBPG per method); --arch/--size are "
                        "read from the run's args.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    masks = None
    if args.bus_checkpoint:
        model, x, masks = bus_model_and_probes(args)
        note: list[str] = [f"trained examples/finetune_bus model {args.bus_checkpoint}, "
                           f"{args.images} malignant synthetic test image(s)"]
    else:
        torch.manual_seed(0)
        model = getattr(torchvision.models, args.arch)(weights=None).eval()
        x = torch.randn(args.images, 3, args.size, args.size,
                        generator=torch.Generator().manual_seed(0))
        note = ["random weights: runtimes and mask counts are meaningful, ROAD "
                "values only compare methods on the same untrained model"]

    def ebpg_of(maps):
        """Energy-based pointing game of the final frame, mean over images."""
        if masks is None:
            return None
        from camanim.lightning.callback import energy_pointing_game
        return round(float(energy_pointing_game(maps.select([len(maps) - 1]), masks).mean()), 4)

    gradcam = camanim.CAManim(model, "gradcam", layers=["layer4"], progress=False)
    gradcam(x)                                                        # warm-up, discovery
    with torch.no_grad():                                             # warm-up, mask batches
        model(x[:1].expand(args.batch_size, -1, -1, -1))
    t_gc, c_gc, gc_maps = timed(lambda: gradcam(x), 5)
    result: dict = {
        "benchmark": "seed_methods", "arch": args.arch, "size": args.size,
        "images": args.images, "batch_size": args.batch_size,
        "device": "cpu", "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(),
        "anchors_t4_resnet50_224": ANCHORS_T4,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "gradcam": {"seconds": round(t_gc, 4), "cpu_seconds": round(c_gc, 4),
                    "layer": "layer4"},
        "sise": {}, "ada_sise": {},
    }
    if not args.no_road:
        result["gradcam"]["road"] = road_of(model, x, gc_maps, args.road_trials, note)
    if masks is not None:
        result["gradcam"]["ebpg"] = ebpg_of(gc_maps)
        result["uniform_map_ebpg"] = round(float(masks.float().mean()), 4)

    def entry(seconds, cpu, maps):
        n = maps.extra["n_masks"][-1]
        e = {
            "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu, 3),
            "mask_forwards": n,
            "ms_per_mask_forward": round(1000 * seconds / max(n, 1), 1),
            "masks_per_layer": dict(zip(maps.names[:-1], maps.extra["n_masks"][:-1], strict=False)),
            "channels": maps.extra["n_channels"][-1],
        }
        if not args.no_road:
            e["road"] = road_of(model, x, maps, args.road_trials, note)
        if masks is not None:
            e["ebpg"] = ebpg_of(maps)
        return e

    for mu in [float(m) for m in args.mus.split(",")]:
        t, c, maps = timed(lambda: sise(model, x, mu=mu,  # noqa: B023 - run now
                                        batch_size=args.batch_size),
                           args.repeat)
        result["sise"][f"mu={mu:g}"] = entry(t, c, maps)
    t, c, maps = timed(lambda: ada_sise(model, x, batch_size=args.batch_size), args.repeat)
    result["ada_sise"] = entry(t, c, maps)

    base = result["sise"].get("mu=0")
    if base:
        ada = result["ada_sise"]
        saving = 1 - ada["seconds"] / base["seconds"]
        cpu_saving = 1 - ada["cpu_seconds"] / base["cpu_seconds"]
        cmp = {"time_saving_vs_sise_mu0": round(saving, 3),
               "cpu_time_saving_vs_sise_mu0": round(cpu_saving, 3),
               "time_target_met": min(saving, cpu_saving) >= 0.30,
               "mask_forward_saving": round(1 - ada["mask_forwards"] / base["mask_forwards"], 3)}
        if base.get("road") is not None and ada.get("road") is not None:
            rel = abs(ada["road"] - base["road"]) / max(abs(base["road"]), 1e-12)
            cmp.update(road_abs_diff=round(ada["road"] - base["road"], 4),
                       road_rel_diff=round(rel, 3), road_target_met=rel <= 0.10)
        result["ada_vs_sise"] = cmp
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    result["notes"] = sorted(set(note))
    print(json.dumps(result, indent=2))


def bus_model_and_probes(args):
    """The fine-tuning example's model from ``args.bus_checkpoint`` and the
    first ``args.images`` malignant test probes of its synthetic set."""
    root = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(root))
    from finetune_bus import train

    from camanim.cli.models import load_checkpoint
    ckpt = Path(args.bus_checkpoint)
    run = json.loads((ckpt.parent.parent / "args.json").read_text())
    args.arch, args.size = run["arch"], int(run["image_size"])
    targs = train.parse_args(["--image-size", str(args.size), "--seed", str(run["seed"])]
                             + (["--limit", str(run["limit"])] if run.get("limit") else []))
    dm = train.build_datamodule(targs)
    model = getattr(torchvision.models, args.arch)(weights=None, num_classes=dm.num_classes)
    model = load_checkpoint(model, ckpt).eval()
    probes = dm.probes(n=args.images, part="test")
    keep = [i for i, label in enumerate(probes["label"].tolist())
            if dm.classes[label] == "malignant"]
    return model, probes["image"][keep], probes["mask"][keep]


if __name__ == "__main__":
    main()
