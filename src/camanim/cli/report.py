"""``camanim report RUN_DIR --out report.html``: the epoch x layer viewer as one
offline HTML file (`camanim.viewer.report.write_report`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CAManimError

__all__ = ["add_report_parser", "cmd_report"]


def _list(text: str | None, kind: type = str) -> list | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise CAManimError(f"{text!r} is not a comma-separated list of numbers") from None


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "report", help="the epoch x layer viewer as one HTML file that opens offline",
        description="Write the CAManim viewer of a training run (the TensorBoard CAManim "
                    "tab: ybROAD heatmap, every layer's map at every epoch, compare, "
                    "curves) as one HTML file that opens in a browser without a server.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                   help="the run's output folder (CAManimCallback save_dir or TensorBoard "
                        "log folder), or a folder of runs")
    p.add_argument("--out", "-o", type=Path, default=Path("report.html"),
                   help="the HTML file to write (default: %(default)s)")
    p.add_argument("--epochs", default=None, metavar="E,E,...", help="only these epochs")
    p.add_argument("--layers", default=None, metavar="NAME|N,...",
                   help="only these layers (names or numbers from 0)")
    p.add_argument("--probes", default=None, metavar="NAME,...", help="only these probes")
    p.add_argument("--frame-size", type=int, default=None, metavar="PX",
                   help="long side of the map panels (smaller than written: a smaller file)")
    p.add_argument("--max-mib", type=float, default=None, metavar="MIB",
                   help="refuse to write a file larger than this")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    """Run ``camanim report`` from parsed arguments; prints the file written."""
    from ..viewer.report import write_report

    out = write_report(args.run_dir, args.out, epochs=_list(args.epochs, int),
                       layers=_list(args.layers), probes=_list(args.probes),
                       frame_size=args.frame_size, max_mib=args.max_mib)
    print(f"{out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0
