"""The ``camanim sanity`` subcommand: the model-parameter randomization
check (`camanim.metrics.sanity.sanity_check`) from the command line.

``camanim sanity IMAGE... --model NAME [--method M] [--blocks children]``
writes ``sanity.txt`` (the table, also printed), ``sanity.json``,
``sanity.csv`` and ``sanity.png`` (layer x step heatmaps) to ``--out``.
Wire it with ``add_sanity_parser(subparsers)``; it dispatches to
`run_sanity` through ``args.func``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import CAManimError
from .common import DEVICES, input_args, layer_selector, max_layers

FAIL_ON = ("never", "method", "layer")


def add_sanity_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``sanity`` to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "sanity", help="model-parameter randomization sanity check of a CAM method",
        description="Cascading model-parameter randomization (Adebayo et al. 2018): randomize the "
                    "model's blocks from the logits down and measure, for every layer, how similar "
                    "the map stays to the trained model's map (Spearman, SSIM, HOG). Maps that do "
                    "not change do not explain the model and are flagged. Runs on a copy of the "
                    "model. Writes sanity.txt, sanity.json, sanity.csv and sanity.png to --out.")
    input_args(p)
    p.add_argument("--method", default="gradcam", metavar="NAME|module:Class",
                   help="CAM method name (default gradcam) or a pytorch_grad_cam BaseCAM subclass "
                        "as 'package.module:Class' / 'file.py:Class'")
    p.add_argument("--layers", default="conv", metavar="SEL",
                   help="conv (default), all, blocks, or comma-separated layer names")
    p.add_argument("--max-layers", type=int, default=None, metavar="N",
                   help="keep at most N evenly spaced layers (0: all, the default)")
    p.add_argument("--blocks", default="children", metavar="children|leaves|A,B,...",
                   help="what one randomization step covers: the model's top-level children "
                        "(default), every module with parameters (leaves), or module names, top "
                        "first")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="flag a layer whose mean Spearman after full randomization is above this "
                        "(default 0.9)")
    p.add_argument("--fail-on", default="never", choices=FAIL_ON,
                   help="exit with status 1 when the method (mean over layers) or any layer is "
                        "flagged (default never)")
    p.add_argument("--size", default=None, metavar="224|HxW|none",
                   help="model input size (default: the checkpoint's training size when it "
                        "holds one, else 224)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights drawn by the check (and of random init)")
    p.add_argument("--out", type=Path, default=Path("camanim_sanity"), metavar="DIR",
                   help="output folder (default camanim_sanity)")
    p.add_argument("--no-plot", action="store_true", help="skip sanity.png")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="default cpu")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no table")
    p.set_defaults(func=run_sanity)
    return p


def _method(text: str) -> Any:
    if ":" not in text:
        return text
    from .models import import_callable

    obj = import_callable(text)
    from ..methods.basecam import is_basecam_class

    if not is_basecam_class(obj):
        raise CAManimError(f"--method {text}: {obj!r} is not a pytorch_grad_cam BaseCAM subclass")
    return obj


def _blocks(text: str) -> Any:
    text = text.strip()
    if text in ("children", "leaves"):
        return text
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CAManimError("--blocks is empty: use children, leaves or module names")
    return names


def run_sanity(args: argparse.Namespace) -> int:
    """Run ``camanim sanity`` (errors are reported by `camanim.cli.main`)."""
    import torch

    from ..core.checkpoint import checkpoint_meta
    from ..core.files import write_text
    from ..core.images import load_image, to_model_input
    from ..metrics.sanity import sanity_check
    from .common import check_class_count, input_settings, prepare_out, target_index, torch_device
    from .models import build_model, in_channels, n_outputs

    n_layers = max_layers(args.max_layers)
    method = _method(args.method)
    rgbs = [load_image(Path(p)) for p in args.images]
    out: Path = prepare_out(args.out)
    device = torch_device(args.device)
    meta = checkpoint_meta(args.checkpoint) if args.checkpoint is not None else None
    size, mean, std, classes = input_settings(args, meta, args.quiet)
    if size is None and len({r.shape[:2] for r in rgbs}) > 1:
        raise CAManimError("the images differ in size: pass --size so they form one batch")
    model, categories = build_model(args.model, args.weights, args.checkpoint, args.num_classes,
                                    args.quiet, seed=args.seed)
    model = model.to(device)
    channels = in_channels(model)
    x = torch.cat([to_model_input(r, size, mean, std, channels) for r in rgbs]).to(device)
    n_out = n_outputs(model, x[:1])
    check_class_count(classes, n_out, args.classes is not None)
    target = target_index(args.target, classes if classes is not None else categories, n_out)
    report = sanity_check(model, x, method, layer_selector(args.layers),
                          targets=None if target is None else [target] * x.shape[0],
                          blocks=_blocks(args.blocks), threshold=args.threshold, seed=args.seed,
                          max_layers=n_layers, progress=not args.quiet)
    table = report.table()
    write_text(out / "sanity.txt", table + "\n")
    report.to_json(out / "sanity.json")     # each writer is atomic itself
    report.to_csv(out / "sanity.csv")
    if not args.no_plot:
        report.plot(out / "sanity.png", title=f"Randomization sanity check: {report.method} on "
                    f"{args.model} ({'FLAGGED' if report.method_flagged else 'passed'}; red = "
                    f"flagged layer)")
    if not args.quiet:
        print(table)           # results on stdout; the progress bar went to stderr
        png = "" if args.no_plot else ", sanity.png"
        print(f"\nwrote sanity.txt, sanity.json, sanity.csv{png} to {out}/")
    if args.fail_on == "method" and report.method_flagged:
        return 1
    if args.fail_on == "layer" and report.flagged_layers:
        return 1
    return 0

