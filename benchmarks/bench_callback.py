"""CAManimCallback: seconds added to a training epoch.

ResNet-50 (random weights, torchvision), 4 probes, every Conv2d layer
(``layers="conv"``: 53 layers), GradCAM + ybROAD (4 percentiles), both
normalizations, TensorBoard GIFs + heatmaps + MP4 files, on a tiny synthetic
data set. One ``fit`` runs ``2 * --pairs + 1`` epochs; the callback works at
every second epoch (``epochs=[1, 3, 5, ...]``), so plain epochs and epochs
with the callback are interleaved in one process. Epoch 0 is a plain
warm-up. Added seconds = median(epoch with callback) - median(plain epoch).
Also reports the callback's own phase timings (CAM, ROAD, the chance ROAD,
map ranks for the convergence, CSV, logging), ``blocking_s_per_epoch`` (the
time the training loop waits for the callback: its phases plus any wait for
the media queue), ``background_s_per_epoch`` (frames, GIF/MP4 encoding,
plots: done on worker threads while training goes on) and
``tensorboard_mib_per_epoch`` (event-file bytes over callback epochs).
Prints one JSON object.

    python benchmarks/bench_callback.py                       # full: 224 px, 4 probes, 53 layers
    python benchmarks/bench_callback.py --size 64 --probes 2  # quick run on a busy CPU
    python benchmarks/bench_callback.py --layers 12           # 12 evenly spaced conv layers
    python benchmarks/bench_callback.py --compare             # convergence + chance off, then on

``--no-convergence`` / ``--no-chance`` turn off the map-change and chance
additions (issue 14); ``--compare`` runs the fit twice, without and with
them, and reports how much they grow the callback's added time per epoch
(``overhead_pct_added``, from epoch times) and its blocking time
(``overhead_pct_blocking``, the callback's own clock, less noisy on a
shared CPU).

Targets (PRODUCT.md, issues 11 and 14) at the full setting: GPU: blocking
<= 3 s, ybROAD phase <= 2 s; 2-core CPU: blocking <= 100 s; TensorBoard
<= 6 MiB per epoch; the convergence and chance additions grow the
callback's time by <= 15 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import sync  # noqa: E402 - after the sys.path set-up above


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=224, help="image side (default 224)")
    ap.add_argument("--probes", type=int, default=4, help="probe images (default 4)")
    ap.add_argument("--layers", type=int, default=0,
                    help="keep N evenly spaced conv layers (0 = all 53)")
    ap.add_argument("--pairs", type=int, default=2, help="plain/callback epoch pairs")
    ap.add_argument("--train-images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-road", action="store_true")
    ap.add_argument("--no-videos", action="store_true")
    ap.add_argument("--no-convergence", action="store_true",
                    help="callback convergence=False (no map change per layer)")
    ap.add_argument("--no-chance", action="store_true",
                    help="callback chance=False (no ROAD of the random map and blob)")
    ap.add_argument("--compare", action="store_true",
                    help="run without, then with convergence and chance; report the growth")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument(
        "--media-queue",
        type=int,
        default=1,
        help="MediaOptions(queue=): 0 draws everything before training resumes",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.compare:
        print(json.dumps(run(args, not args.no_convergence, not args.no_chance), indent=1))
        return
    off = run(args, False, False)
    on = run(args, True, True)
    conv = on["callback_phases_s"]["convergence"] + on["callback_phases_s"]["chance"]
    out = {
        "benchmark": "callback_convergence_overhead",
        "off": off,
        "on": on,
        "overhead_pct_added": round(
            100
            * (on["added_s_per_epoch"] - off["added_s_per_epoch"])
            / max(off["added_s_per_epoch"], 1e-9),
            1,
        ),
        "overhead_pct_blocking": round(
            100
            * (on["blocking_s_per_epoch"] - off["blocking_s_per_epoch"])
            / max(off["blocking_s_per_epoch"], 1e-9),
            1,
        ),
        "addition_phases_s": {k: on["callback_phases_s"][k] for k in ("convergence", "chance")},
        "overhead_pct_phases": round(100 * conv / max(on["blocking_s_per_epoch"] - conv, 1e-9), 1),
        "target_pct": 15,
    }
    print(json.dumps(out, indent=1))


def run(args: argparse.Namespace, convergence: bool, chance: bool) -> dict:
    """One fit; the callback at every second epoch."""

    import lightning as L
    import torchvision
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger

    from camanim import MediaOptions, RoadOptions, VideoOptions
    from camanim.lightning.callback import CAManimCallback
    from camanim.lightning.media import events_bytes

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torchvision.models.resnet50(weights=None, num_classes=10)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.start: dict[int, float] = {}
            self.seconds: dict[int, float] = {}

        def on_train_epoch_start(self, trainer, pl_module):
            sync(pl_module.device)
            self.start[trainer.current_epoch] = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):  # after the CAManim callback
            sync(pl_module.device)
            e = trainer.current_epoch
            self.seconds[e] = time.perf_counter() - self.start[e]

    g = torch.Generator().manual_seed(0)
    s = args.size
    x = torch.randn(args.train_images, 3, s, s, generator=g)
    y = torch.randint(0, 10, (args.train_images,), generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                       batch_size=args.batch, shuffle=True)
    probes = torch.randn(args.probes, 3, s, s, generator=g)
    masks = torch.zeros(args.probes, s, s, dtype=torch.bool)
    masks[:, s // 4: 3 * s // 4, s // 4: 3 * s // 4] = True
    epochs = 2 * args.pairs + 1
    cam_epochs = list(range(1, epochs, 2))
    timings: list[dict] = []

    class Cam(CAManimCallback):
        def _run_synced(self, trainer, pl_module, epoch):
            super()._run_synced(trainer, pl_module, epoch)
            timings.append(self.last_timing)  # "media" arrives later, from the background

    with tempfile.TemporaryDirectory() as tmp:
        cb = Cam(probes, masks=masks, epochs=cam_epochs, on_fit_end=False,
                 road=RoadOptions(chance=chance) if not args.no_road else False,
                 video=VideoOptions(log=not args.no_videos, save=not args.no_videos),
                 cam_options={"max_layers": args.layers or None},
                 media=MediaOptions(queue=args.media_queue), convergence=convergence)
        timer = EpochTimer()
        trainer = L.Trainer(max_epochs=epochs, accelerator="gpu" if args.device.startswith("cuda")
                            else "cpu", devices=1, logger=TensorBoardLogger(tmp),
                            callbacks=[cb, timer], enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False,
                            log_every_n_steps=1, num_sanity_val_steps=0)
        t = time.perf_counter()
        trainer.fit(Module(), data)
        wall = time.perf_counter() - t
        n_layers = len(cb._history[cb.epochs_done[-1]]["names"])
        files = sum(1 for _ in Path(tmp).rglob("*") if _.is_file())
        gif_bytes = events_bytes(tmp)

    plain = [timer.seconds[e] for e in range(2, epochs, 2)]  # epoch 0 is the warm-up
    with_cb = [timer.seconds[e] for e in cam_epochs]
    phases = {k: round(statistics.median(t.get(k, 0.0) for t in timings), 3)
              for k in ("cam", "road", "chance", "ebpg", "convergence", "csv", "log",
                        "queue_wait", "blocking", "media")}
    return {
        "benchmark": "callback_epoch_overhead",
        "device": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0],
        "size": s, "probes": args.probes, "layers": n_layers,
        "road": not args.no_road, "videos": not args.no_videos,
        "convergence": convergence, "chance": chance,
        "train_images": args.train_images, "batch": args.batch,
        "plain_epoch_s": [round(v, 3) for v in plain],
        "callback_epoch_s": [round(v, 3) for v in with_cb],
        "added_s_per_epoch": round(statistics.median(with_cb) - statistics.median(plain), 3),
        "blocking_s_per_epoch": phases["blocking"],
        "background_s_per_epoch": phases["media"],
        "tensorboard_mib_per_epoch": round(gif_bytes / 2**20 / len(cam_epochs), 2),
        "media_queue": args.media_queue,
        "callback_phases_s": phases,
        "fit_wall_s": round(wall, 1),
        "tensorboard_event_mib": round(gif_bytes / 2**20, 2),
        "files": files,
    }


if __name__ == "__main__":
    main()
