"""Bytes each logger receives per callback epoch at the full setting.

ResNet-50 (random weights, torchvision), 4 probes (random 224x224 images),
every Conv2d layer (53), GradCAM maps computed by `camanim.CAManim`, videos
in local and global normalization. ROAD scores, the epoch-by-layer history
(``--epochs`` columns) and the map change are synthetic (uniform random):
ybROAD of 53 layers x 4 probes takes minutes on a CPU and does not change the
pictures' sizes. One callback epoch's media (`write_epoch_media`, exactly
what the callback runs in its background queue) go to a real TensorBoard
writer, a W&B offline run and an MLflow sqlite store; the bytes each one
stored for that epoch are measured on disk:

* ``tensorboard``: event-file bytes;
* ``wandb``: the run's media files (``files/media``: MP4s, PNGs);
* ``mlflow``: the run's artifacts (stepped images: PNG plus the ``.webp``
  thumbnail MLflow adds; the MP4s under ``camanim/epochNNN``);
* ``files``: the MP4s and heatmap PNGs in the output folder.

Repeated for each ``--video-size`` (``auto``: the callback's default MP4
size, 320 px panels; an int: ``CAManimCallback(video_size=...)``, the knob
that sets what W&B and MLflow receive). The report, sent once at the end of
fit, is not included. Prints one JSON object.

    WANDB_MODE=offline python benchmarks/bench_logger_media.py
    python benchmarks/bench_logger_media.py --video-size auto 224 160
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MIB = 2 ** 20


def folder_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def make_media(args: argparse.Namespace, root: Path, size: int | None) -> tuple:
    """The `EpochMedia` of one callback epoch and the loggers it feeds."""
    import torchvision
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
    from torch.utils.tensorboard import SummaryWriter

    import camanim
    from camanim.lightning.loggers import MLflowSink, WandbSink
    from camanim.lightning.media import EpochMedia

    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=3).eval()
    x = torch.randn(args.probes, 3, 224, 224)
    maps = camanim.CAManim(model, "gradcam", "conv")(x)
    L, E, rng = len(maps.names), args.epochs, np.random.default_rng(0)
    probes = [f"probe{b}" for b in range(args.probes)]
    names = list(maps.names)
    epochs = list(range(E))
    wb = WandbLogger(save_dir=str(root), offline=True, project="bench")
    ml = MLFlowLogger(experiment_name="bench", tracking_uri=f"sqlite:///{root / 'ml.db'}",
                      artifact_location=(root / "mlartifacts").as_uri())
    writer = SummaryWriter(str(root / "tb"))
    out = root / "cam"
    for sub in ("videos", "heatmaps", "maps"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    m = EpochMedia(
        epoch=E - 1, step=1000, images=x, maps=maps, probes=probes, out_dir=out,
        method="gradcam", road=rng.uniform(-0.2, 0.6, (L, args.probes)),
        history={p: (epochs, names, rng.uniform(-0.2, 0.6, (E, L))) for p in probes},
        writer=writer, fps=8, render=dict(size=size),
        convergence={p: (epochs, names, rng.uniform(0, 1, (E, L))) for p in probes},
        chance={p: 0.05 for p in probes},
        sinks=[WandbSink(wb), MLflowSink(ml)])
    return m, wb, ml, writer


def one(args: argparse.Namespace, size: int | None) -> dict:
    import wandb

    from camanim.lightning.media import MediaQueue, events_bytes, write_epoch_media

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        m, wb, ml, writer = make_media(args, root, size)
        queue = MediaQueue(workers=args.workers)
        t = time.perf_counter()
        write_epoch_media(m, queue.pool())
        seconds = time.perf_counter() - t
        queue.close()
        writer.close()
        wb_files = Path(wb.experiment.dir)
        wandb.finish()
        ml_root = root / "mlartifacts"
        return {
            "video_size": "auto" if size is None else size,
            "mp4_frame": list(next(iter_frames(m.out_dir))),
            "media_seconds": round(seconds, 2),
            "mib_per_epoch": {
                "tensorboard": round(events_bytes(root / "tb") / MIB, 3),
                "wandb": round(folder_bytes(wb_files / "media") / MIB, 3),
                "mlflow": round(folder_bytes(ml_root) / MIB, 3),
                "files": round((folder_bytes(m.out_dir / "videos")
                                + folder_bytes(m.out_dir / "heatmaps")) / MIB, 3),
            },
            "wandb_parts_mib": {
                "videos": round(folder_bytes(wb_files / "media" / "videos") / MIB, 3),
                "images": round(folder_bytes(wb_files / "media" / "images") / MIB, 3),
            },
            "mlflow_parts_mib": {
                "images_png": round(folder_bytes(ml_root, "*.png") / MIB, 3),
                "images_webp": round(folder_bytes(ml_root, "*.webp") / MIB, 3),
                "mp4": round(folder_bytes(ml_root, "*.mp4") / MIB, 3),
            },
        }


def iter_frames(out: Path):
    from camanim.viz.video import iter_video

    for f in sorted((out / "videos").glob("*.mp4")):
        yield next(iter_video(f)).shape[:2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=10, help="heatmap columns (default 10)")
    ap.add_argument("--video-size", nargs="+", default=["auto", "224"])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    runs = [one(args, None if s == "auto" else int(s)) for s in args.video_size]
    print(json.dumps({"setting": f"ResNet-50 224x224, {args.probes} probes x 53 Conv2d layers, "
                      "local + global, GradCAM maps (random weights), synthetic ROAD/history",
                      "cpu": platform.processor() or platform.machine(),
                      "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
