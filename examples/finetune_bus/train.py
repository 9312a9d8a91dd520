#!/usr/bin/env python
"""Fine-tune a ResNet on breast ultrasound and watch CAManim while it trains.

The case study of the CAManim paper (Kaczmarek et al., PLOS ONE 2024):
a ResNet-50 pre-trained on ImageNet, fine-tuned on BUSI (Al-Dhabyani et al.)
to tell malignant from normal images, then explained layer by layer.

    # offline: synthetic set, ~4.5 min on 2 idle CPU cores
    python examples/finetune_bus/train.py
    python examples/finetune_bus/train.py --help

Importable: ``main(argv) -> dict``, ``build_parser()``, ``build_callbacks()``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: python examples/finetune_bus/train.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))


class _Lazy:
    """The example's ``data`` / ``model`` module, imported on first use so
    that ``--help`` answers without loading torch and Lightning."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        import importlib

        module = importlib.import_module(f".{self._name}", __package__) if __package__ \
            else importlib.import_module(self._name)
        return getattr(module, attr)


bus_data: Any = _Lazy("data")
bus_model: Any = _Lazy("model")
#: ``--arch`` choices, the same as ``model.ARCHS`` (here so that --help imports no torch)
ARCHS = ("resnet50", "resnet18", "resnet34", "resnet101")

# Defaults chosen so that the offline run (synthetic set, random init,
# ResNet-50) trains in ~2.5 minutes on an idle 2-core CPU (measured: 133 s,
# ~20 s per epoch); with the CAManim callback (4 probes x 16 layers, ybROAD
# every epoch) and the final `camanim explain` the whole run took 4 min 19 s (torch 2.15.0,
# 2 threads, idle); with --threads 1 and torch 2.14.1, beside another run, 17.5 min.
DEFAULTS = dict(image_size=128, epochs=6, batch_size=16, limit=None, lr_none=1e-3, lr_imagenet=1e-4)

PAPER = (
    "paper settings (BC-ResNet50): --data-dir /path/to/Dataset_BUSI_with_GT "
    "--weights imagenet --image-size 224 --epochs 30 --accelerator gpu "
    "(the paper does not state its epoch count)"
)


def _arch(text: str) -> str:
    try:
        return bus_model.check_arch(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python examples/finetune_bus/train.py",
        description=(
            "Fine-tune a torchvision ResNet to classify breast ultrasound images (malignant vs "
            "normal, as in the CAManim paper's BC-ResNet50 case study), with accuracy/AUROC, a "
            "best-model checkpoint and TensorBoard logs.  Without --data-dir it runs offline on a "
            "synthetic ultrasound set made in code; without --weights imagenet it starts from "
            "random weights."
        ),
        epilog=(
            "Defaults are sized for a 2-core CPU without a GPU (ResNet-50, 128x128, 6 epochs: "
            "about 4.5 minutes on an idle 2-core CPU with the CAManim callback, ~2.5 without it "
            "(--no-cam); 224x224 costs ~3x more).  The " + PAPER + ".  "
            "Quick smoke run: --arch resnet18 --image-size 64 --limit 40 --epochs 1.\n"
            "Outputs: <out>/<name>/version_N/ holds checkpoints/, split.json, test_metrics.json "
            "and the TensorBoard event file."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="BUSI folder Dataset_BUSI_with_GT (sub-folders benign/, malignant/, normal/ with "
        "'name (N).png' and 'name (N)_mask[_k].png'), or the folder containing it. "
        "Omitted: a synthetic breast-ultrasound set made in code (133 normal, "
        "210 malignant, 437 benign images like BUSI; deterministic by --seed).",
    )
    d.add_argument(
        "--include-benign",
        action="store_true",
        help="three classes (normal, benign, malignant) instead of the paper's malignant vs normal",
    )
    d.add_argument(
        "--limit",
        type=int,
        default=DEFAULTS["limit"],
        metavar="N",
        help="use about N images in total (class proportions kept, seeded) before splitting; "
        "for quick runs. Default: all",
    )
    d.add_argument(
        "--split-file",
        type=Path,
        default=None,
        metavar="JSON",
        help="re-use the train/val/test split of an earlier run (its split.json) so runs are "
        "comparable. Default: a new stratified, seeded 80/10/10 split, written to "
        "<run dir>/split.json",
    )
    d.add_argument(
        "--image-size",
        type=int,
        default=DEFAULTS["image_size"],
        metavar="S",
        help="images are resized to S x S (the paper: 224; a ResNet-50 step costs ~3x more at "
        "224 than at 128 on CPU)",
    )
    d.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULTS["batch_size"],
        metavar="B",
        help="images per training step (also for validation/test); BatchNorm wants 8 or more",
    )
    d.add_argument(
        "--num-workers",
        type=int,
        default=0,
        metavar="W",
        help="DataLoader worker processes (0: load in the main process, best on a 2-core CPU; "
        "4-8 on a GPU machine)",
    )
    m = p.add_argument_group("model and training")
    m.add_argument("--arch", type=_arch, default="resnet50",
                   metavar="{{{},timm:NAME}}".format(",".join(ARCHS)),
                   help="torchvision ResNet (resnet50 as in the paper; resnet18 for quick runs) "
                        "or a timm model, e.g. timm:convnext_tiny (random initial weights)")
    m.add_argument("--weights", default="none", metavar="{none,imagenet,PATH}",
                   help="'imagenet': torchvision's ImageNet-1k weights (the paper; read from the "
                        "torch cache $TORCH_HOME/hub/checkpoints, downloaded if missing, else the "
                        "run stops and says how to get them); 'none': random initialization "
                        "(offline default); or a path to a torchvision .pth state dict")
    m.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], metavar="E",
                   help="training epochs (each ends with validation; the best epoch is "
                        "checkpointed)")
    m.add_argument("--lr", type=float, default=None,
                   help=f"AdamW learning rate (cosine schedule over the epochs). Default: "
                        f"{DEFAULTS['lr_none']:g} from random weights, "
                        f"{DEFAULTS['lr_imagenet']:g} when fine-tuning pre-trained weights")
    m.add_argument("--weight-decay", type=float, default=1e-4,
                   help="AdamW weight decay (decoupled L2 penalty)")
    m.add_argument("--monitor", choices=("val_loss", "val_auroc", "val_acc"), default="val_loss",
                   help="validation metric that picks the best checkpoint (min for loss, max "
                        "for auroc/acc; a tie goes to the later epoch). val_loss, the default, "
                        "does not saturate: AUROC and accuracy reach 1.000 on a few validation "
                        "images after an epoch or two and would keep a barely trained model")
    m.add_argument("--seed", type=int, default=0,
                   help="seeds everything: synthetic images, split, weights init, augmentation, "
                        "batch order")
    m.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads for PyTorch (0: PyTorch's default, one per core). On a CPU "
                        "shared with other jobs use 1: busy cores make parallel threads wait for "
                        "each other "
                        "(measured 5-7x slower with 2 threads on a loaded 2-core machine)")
    m.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu", "cuda", "mps"),
                   help="Lightning accelerator (auto: a GPU when there is one)")
    c = p.add_argument_group("CAManim (the callback that watches training)")
    c.add_argument("--cam-method", default="gradcam", metavar="M",
                   help="CAM method: gradcam, hirescam, gradcam++, layercam, xgradcam, eigencam, "
                        "scorecam, ablationcam, integrated-gradcam, sise, ada-sise, ...")
    c.add_argument("--cam-layers", default="conv", metavar="SEL",
                   help="layers to animate: conv (every Conv2d call; ResNet-50 has 53), all, "
                        "blocks, or comma-separated layer names")
    c.add_argument("--cam-max-layers", type=int, default=16, metavar="N",
                   help="keep N evenly spaced layers of --cam-layers (0: all of them, as in the "
                        "paper; ybROAD of all 53 ResNet-50 layers x 4 probes at 224 px makes "
                        "training wait "
                        "250 s per callback epoch on a quiet 2-core CPU, benchmarks/RESULTS.md)")
    c.add_argument("--cam-every", type=int, default=1, metavar="K",
                   help="run CAManim and ybROAD on the probes every K epochs (and once at the end "
                        "of fit)")
    c.add_argument("--cam-probes", type=int, default=4, metavar="P",
                   help="fixed probe images from the test split, malignant first, with their "
                        "lesion masks (so the energy-based pointing game is logged beside ybROAD)")
    c.add_argument("--no-road", action="store_true", help="skip ybROAD (videos and EBPG only)")
    c.add_argument("--no-cam", action="store_true", help="train without the CAManim callback")
    c.add_argument("--no-explain", action="store_true",
                   help="skip the final 'camanim explain' run on the best checkpoint")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("runs"), metavar="DIR",
                   help="TensorBoard/checkpoint root; each run gets <out>/<name>/version_N")
    o.add_argument("--name", default="finetune_bus", help="experiment name (sub-folder of --out)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("image_size", "batch_size", "epochs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.image_size < 32:
        parser.error("--image-size must be at least 32 (ResNet downsamples by 32)")
    if args.limit is not None and args.limit < 6:
        parser.error("--limit must be at least 6 (three per class, one per split)")
    if args.num_workers < 0:
        parser.error("--num-workers must be >= 0")
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    if args.cam_max_layers < 0 or args.cam_every < 1 or args.cam_probes < 1:
        parser.error("--cam-max-layers must be >= 0, --cam-every and --cam-probes >= 1")
    if args.lr is None:
        args.lr = DEFAULTS["lr_none"] if args.weights == "none" else DEFAULTS["lr_imagenet"]
    return args


def build_datamodule(args: argparse.Namespace) -> bus_data.BUSDataModule:
    return bus_data.BUSDataModule(
        data_dir=args.data_dir, include_benign=args.include_benign, image_size=args.image_size,
        batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed, limit=args.limit,
        split_file=args.split_file)


def build_model(args: argparse.Namespace,
                datamodule: bus_data.BUSDataModule) -> bus_model.BUSClassifier:
    """The LightningModule; its checkpoints carry the input size, mean/std and class
    names (``hyper_parameters``), which ``camanim explain`` and ``sanity`` read."""
    return bus_model.BUSClassifier(
        arch=args.arch, num_classes=datamodule.num_classes, weights=args.weights, lr=args.lr,
        weight_decay=args.weight_decay, max_epochs=args.epochs, class_names=datamodule.classes,
        image_size=args.image_size, mean=list(bus_data.IMAGENET_MEAN),
        std=list(bus_data.IMAGENET_STD))


def build_callbacks(args: argparse.Namespace, datamodule: bus_data.BUSDataModule) -> list:
    """Callbacks of the Trainer: the best-model checkpoint and, unless
    ``--no-cam``, `camanim.CAManimCallback` on fixed test probes (malignant
    first, with their masks).  ``args.run_dir`` is this run's folder; the
    callback writes ``ybroad.csv`` and ``videos/`` there."""
    import lightning.pytorch.callbacks as plc
    mode = "min" if args.monitor == "val_loss" else "max"
    checkpoint = _later_ties(plc.ModelCheckpoint)(
        dirpath=Path(args.run_dir) / "checkpoints", monitor=args.monitor, mode=mode, save_top_k=1,
        save_last=True,
        save_weights_only=True,  # ResNet-50: ~95 MB per file (~280 MB with the optimizer state)
        filename="best-epoch{epoch:02d}-"
        + args.monitor.split("_")[1]
        + "{"
        + args.monitor
        + ":.3f}",
        auto_insert_metric_name=False,
    )
    callbacks: list = [checkpoint]
    if not args.no_cam:
        import camanim
        probes = datamodule.probes(n=args.cam_probes, part="test")
        layers = args.cam_layers if args.cam_layers in ("conv", "all", "blocks") \
            else [n.strip() for n in args.cam_layers.split(",") if n.strip()]
        callbacks.append(camanim.CAManimCallback(
            probes["image"], targets=probes["label"].tolist(), masks=probes["mask"],
            probe_names=[f"{datamodule.classes[int(label)]}_{_probe_name(i)}"
                         for label, i in zip(probes["label"], probes["id"], strict=True)],
            method=args.cam_method, layers=layers,
            cam_options={"max_layers": args.cam_max_layers or None},
            every_n_epochs=args.cam_every, road=not args.no_road, save_dir=args.run_dir,
            video=camanim.VideoOptions(mean=bus_data.IMAGENET_MEAN, std=bus_data.IMAGENET_STD,
                                       class_names=datamodule.classes),
            progress=not args.no_progress))
    return callbacks


def _later_ties(base: type) -> type:
    """``ModelCheckpoint`` whose best model moves to the later epoch on a tie
    (Lightning keeps the earlier one): an AUROC of 1.000 reached at epoch 0
    on a few validation images would otherwise keep that epoch's model."""

    class LaterTiesCheckpoint(base):  # type: ignore[valid-type, misc]
        def check_monitor_top_k(self, trainer: Any, current: Any = None) -> bool:
            if (current is not None and self.save_top_k == 1 and self.best_k_models
                    and bool(current == self.best_k_models[self.kth_best_model_path])):
                return True
            return super().check_monitor_top_k(trainer, current)

    return LaterTiesCheckpoint


def _probe_name(image_id: str) -> str:
    """A TensorBoard-tag-friendly probe name from a data set id."""
    name = "".join(ch if ch.isalnum() else "_" for ch in Path(str(image_id)).stem)
    return "_".join(part for part in name.split("_") if part)


def camanim_outputs(args: argparse.Namespace,
                    callbacks: list) -> dict[str, str]:  # noqa: ARG001 - public signature
    """Where the CAManim callback wrote its outputs, for the final summary."""
    if args.no_cam:
        return {}
    out = {"CAManim videos": str(args.run_dir / "videos")}
    if not args.no_road:
        out["ybROAD table"] = str(args.run_dir / "ybroad.csv")
        out["ybROAD heatmaps"] = str(args.run_dir / "heatmaps")
    return out


def explain_best(args: argparse.Namespace, datamodule: bus_data.BUSDataModule,
                 checkpoint: str | None, device: str = "cpu") -> Path | None:
    """``camanim explain`` on the best checkpoint for one malignant test
    image (the paper's Fig. 4), on the training device, explaining that
    image's class (malignant; the command says so when the model predicts
    another). The image is written as a PNG first, and the size, mean/std
    and class names come from the checkpoint, so this is exactly the command
    a user would type."""
    if args.no_explain or not checkpoint:
        return None
    import numpy as np
    import torch
    from PIL import Image

    from camanim.cli import main as camanim_main
    probe = datamodule.probes(n=1, part="test")
    mean = torch.tensor(bus_data.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(bus_data.IMAGENET_STD)[:, None, None]
    rgb = (
        ((probe["image"][0] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    )
    out = args.run_dir / "explain"
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{datamodule.classes[int(probe['label'][0])]}_{_probe_name(probe['id'][0])}.png"
    Image.fromarray(np.ascontiguousarray(rgb)).save(png)
    label = datamodule.classes[int(probe["label"][0])]
    argv = ["explain", str(png), "--model", args.arch, "--checkpoint", str(checkpoint),
            "--target", label, "--method", args.cam_method, "--layers", args.cam_layers,
            "--max-layers", str(args.cam_max_layers), "--out", str(out), "--norm", "local,global",
            "--device", device]
    if not args.no_road:
        argv.append("--road")
    if args.no_progress:
        argv.append("--quiet")
    print("\n$ camanim " + " ".join(shlex.quote(a) for a in argv), flush=True)
    rc = camanim_main(argv)
    if rc != 0:
        print(f"warning: camanim explain exited with status {rc}")
        return None
    return out


def write_run_report(args: argparse.Namespace) -> Path | None:
    """``camanim report``: the run's CAManim viewer (every layer's map at every
    epoch, the ybROAD heatmap) as one HTML file that opens offline."""
    if args.no_cam:
        return None
    from camanim.cli import main as camanim_main

    argv = ["report", str(args.run_dir), "--out", str(args.run_dir / "report.html")]
    print("\n$ camanim " + " ".join(shlex.quote(a) for a in argv), flush=True)
    if camanim_main(argv) != 0:
        print("warning: camanim report failed (see above)")
        return None
    return args.run_dir / "report.html"


def _checkpoint_callback(callbacks: list):
    from lightning.pytorch.callbacks import ModelCheckpoint
    return next(c for c in callbacks if isinstance(c, ModelCheckpoint))


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items()))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, validate, test the best checkpoint; returns a summary dict
    (``run_dir``, ``best_checkpoint``, ``test``, ``val``, ``seconds``)."""
    args = parse_args(argv)
    with warnings.catch_warnings():  # the filters below end with the run
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*The number of training batches.*")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")
        # imageio-ffmpeg's own import of pkg_resources: nothing a user can act on
        warnings.filterwarnings("ignore", message=r".*pkg_resources.*")
        import logging

        class _NoTips(logging.Filter):  # Lightning's advert for its cloud logger
            def filter(self, record: logging.LogRecord) -> bool:
                return "litlogger" not in record.getMessage()

        for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch"):
            logging.getLogger(name).addFilter(_NoTips())
        import torch
        threads = torch.get_num_threads()
        try:
            return _run(args)
        finally:  # --threads must not outlive the run when called in-process
            torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(args.seed, workers=True, verbose=False)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)

    dm = build_datamodule(args)
    try:
        dm.setup()
    except bus_data.BUSILayoutError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"data: {dm.source} ({', '.join(dm.classes)}), {args.image_size}x{args.image_size}, "
          f"seed {args.seed}\n{dm.describe()}", flush=True)
    if args.data_dir is None:
        print("note: no --data-dir: using the synthetic breast-ultrasound set (made in code). "
              "Pass --data-dir /path/to/Dataset_BUSI_with_GT for the real BUSI images.")

    if args.weights == "none":
        print(f"note: --weights none: {args.arch} starts from random weights (offline default). "
              f"The paper fine-tunes ImageNet weights: --weights imagenet.")
    try:
        model = build_model(args, dm)
    except bus_model.WeightsUnavailable as e:
        raise SystemExit(f"error: {e}") from None

    logger = TensorBoardLogger(save_dir=str(args.out), name=args.name, default_hp_metric=False)
    args.run_dir = Path(logger.log_dir)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    split_path = dm.save_split(args.run_dir / "split.json")
    (args.run_dir / "args.json").write_text(json.dumps(
        {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, indent=1))

    callbacks = build_callbacks(args, dm)
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator=args.accelerator, devices=1, logger=logger,
        callbacks=callbacks, deterministic="warn", log_every_n_steps=5,
        enable_progress_bar=not args.no_progress, enable_model_summary=False,
        num_sanity_val_steps=0)
    t_start = time.time()
    trainer.fit(model, datamodule=dm)
    t_fit = time.time() - t_start
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}

    ckpt = _checkpoint_callback(callbacks)
    best = ckpt.best_model_path or None
    test_results = trainer.test(model, datamodule=dm, ckpt_path=best or None, verbose=False)
    test = {k: float(v) for k, v in (test_results[0] if test_results else {}).items()}
    seconds = time.time() - t0
    (args.run_dir / "test_metrics.json").write_text(
        json.dumps(
            {
                "checkpoint": best,
                "test": test,
                "last_val": val,
                "fit_seconds": t_fit,
                "seconds": seconds,
            },
            indent=1,
        )
    )

    dev_type = trainer.strategy.root_device.type
    explained = explain_best(args, dm, best, dev_type if dev_type in ("cuda", "mps") else "cpu")
    report = write_run_report(args)
    seconds = time.time() - t0

    best_score = ckpt.best_model_score
    print()
    device = trainer.strategy.root_device
    print(
        f"done in {seconds:.0f} s (fit: {t_fit:.0f} s for {trainer.current_epoch} epochs) "
        f"on {device}"
    )
    print(f"last validation: {_fmt_metrics(val)}")
    print(
        f"best checkpoint ({args.monitor} {float(best_score):.3f}): {best}"
        if best_score is not None
        else f"best checkpoint: {best}"
    )
    print(
        f"test ({'best checkpoint' if best else 'last weights'}, {len(dm.parts['test'])} images): "
        f"{_fmt_metrics(test)}"
    )
    print()
    print(f"outputs in {args.run_dir}:")
    outputs = {"checkpoints": str(args.run_dir / "checkpoints"), "split": str(split_path),
               "test metrics": str(args.run_dir / "test_metrics.json"),
               **camanim_outputs(args, callbacks)}
    if explained is not None:
        outputs["camanim explain"] = str(explained)
    if report is not None:
        outputs["CAManim report"] = str(report)
        outputs["CAManim tab"] = "TensorBoard's CAManim tab (below)"
    for k, v in outputs.items():
        print(f"  {k + ':':16s}{v}")
    print()
    print("watch it in TensorBoard (the CAManim tab: every layer's map at every epoch):")
    print(f"  tensorboard --logdir {shlex.quote(str(args.out))} --samples_per_plugin images=100")
    return {"run_dir": args.run_dir, "best_checkpoint": best, "test": test, "val": val,
            "seconds": seconds, "fit_seconds": t_fit, "outputs": outputs}


if __name__ == "__main__":
    main()
