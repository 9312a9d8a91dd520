"""The ``camanim`` command.

``camanim explain IMAGE... --model NAME`` writes, for every image, a CAManim
video per normalization, a contact sheet of every 10th-percentile layer, a
run summary (JSON) and with ``--road`` the ybROAD CSV, plot and summary.
``camanim layers --model NAME`` lists the layers a CAM can be drawn for.

Bad arguments, unreadable images, unknown models, output folders that
cannot be written, checkpoints that are not ones and every `CAManimError`
end with exit status 2 and a one-line message (no traceback). Every file is
complete under its final name or absent (`camanim.core.files`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import CAManimError
from .common import DEVICES, FORMATS, Parser, input_args, model_args

# Building the parser imports nothing heavy (torch, Lightning): `camanim --help`
# answers at once; a subcommand's module is imported when it runs.


def cmd_explain(args: argparse.Namespace) -> int:
    """Run ``camanim explain`` (imports torch and the engine)."""
    from .explain import cmd_explain as run

    return run(args)


def cmd_layers(args: argparse.Namespace) -> int:
    """Run ``camanim layers``."""
    from .layers import cmd_layers as run

    return run(args)

# ------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    """The ``camanim`` argument parser (subcommands ``explain`` and ``layers``)."""
    parser = Parser(prog="camanim", description="Class activation maps through every layer "
                     "of a CNN (CAManim), scored with ROAD (ybROAD).")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"camanim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{explain,layers,study,sanity,report}")

    ex = sub.add_parser("explain", help="CAManim videos, contact sheet and summary for images",
                        description="Write a CAManim video per image and normalization, a "
                        "contact sheet of every 10th-percentile layer, a run summary (JSON) and "
                        "with --road the ybROAD CSV, plot and summary.")
    input_args(ex)
    ex.add_argument("--method", default="gradcam", help="CAM method (default gradcam)")
    ex.add_argument("--layers", default=None, metavar="SEL",
                    help="conv, all, blocks, or comma-separated layer names (default: the "
                         "method's own, conv; blocks for sise and ada-sise)")
    ex.add_argument("--max-layers", type=int, default=None, metavar="N",
                    help="keep at most N evenly spaced layers (0: all, the default)")
    ex.add_argument("--norm", default="local,global", metavar="local,global,both",
                    help="normalizations, one video each; 'both' = side by side "
                         "(default local,global)")
    ex.add_argument("--size", default=None, metavar="224|HxW|none",
                    help="model input size; none keeps the original resolution (default: the "
                         "checkpoint's training size when it holds one, else 224)")
    ex.add_argument("--out", type=Path, default=Path("camanim_out"), metavar="DIR",
                    help="output folder (default camanim_out)")
    ex.add_argument("--format", default="mp4", choices=FORMATS,
                    help="video format: mp4 (default), webm, gif, or png (a folder of frames)")
    ex.add_argument("--fps", type=float, default=8.0, help="frames (layers) per second (default 8)")
    ex.add_argument("--hold-last", type=int, default=0, metavar="N",
                    help="show the last layer N frames longer (default 0)")
    ex.add_argument("--colormap", default="jet", help="matplotlib colormap (default jet)")
    ex.add_argument("--alpha", type=float, default=0.5, help="heatmap weight (default 0.5)")
    ex.add_argument("--road", action="store_true", help="also score every layer with ROAD (ybROAD)")
    ex.add_argument("--save-maps", action="store_true",
                    help="also save the raw maps (LayerMaps .npz) for re-rendering")
    ex.add_argument("--seed", type=int, default=0,
                    help="seed of random init (--weights none), random CAM methods and ROAD noise")
    ex.add_argument("--device", default="cpu", choices=DEVICES, help="default cpu")
    ex.add_argument("--quiet", "-q", action="store_true", help="no progress bars or notes")
    ex.set_defaults(func=cmd_explain)

    ly = sub.add_parser("layers", help="list the layers of a model a CAM can be drawn for",
                        description="Table of the layers a selector picks (index, name, type, "
                        "output shape, parameters, layout) and those it skips, with the reason.")
    model_args(ly)
    ly.add_argument("--layers", default="all", metavar="SEL",
                    help="conv, all (default), blocks, or comma-separated layer names")
    ly.add_argument("--size", default="224", metavar="224|HxW",
                    help="example input size (default 224)")
    ly.set_defaults(func=cmd_layers)
    from .report import add_report_parser
    from .sanity import add_sanity_parser
    from .study import add_study_parser

    add_study_parser(sub)
    add_sanity_parser(sub)
    add_report_parser(sub)
    return parser


# ------------------------------------------------------------------ entry

def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``camanim`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed)
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return int(args.func(args) or 0)
    except CAManimError as e:
        print(f"camanim {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that failed mid-run (a full disk, a removed folder)
        from ..core.files import os_cause

        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"camanim {args.command}: error: {where}{os_cause(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("camanim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
