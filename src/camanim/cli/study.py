"""``camanim study``: compare epoch-wise ybROAD across runs, models and methods."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import CAManimError


def add_study_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``study`` subcommand to an ``argparse`` subparsers object;
    dispatch with ``run_study(args)``."""
    p = subparsers.add_parser(
        "study", help="compare epoch-wise ybROAD across runs (reads ybroad.csv files)",
        description="Read the ybroad.csv files that CAManimCallback wrote (searched "
                    "recursively under each RUN_DIR) and write per run and probe the "
                    "epoch-by-layer ROAD heatmap, the best-layer-per-epoch trajectories "
                    "and a table (final mean/max ybROAD, best layer, settling epoch), and "
                    "from the convergence columns each layer's settle epoch (settle.csv), "
                    "the share of layers above chance and the ranking tau per epoch "
                    "(epochs.csv, chance_tau.png) and the map-change heatmaps.")
    _add_arguments(p)
    p.set_defaults(func=run_study)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run folders (searched recursively for ybroad.csv) or CSV files")
    p.add_argument("--out", "-o", default="camanim_study",
                   help="output folder (default: %(default)s)")
    p.add_argument("--probe", action="append", default=None,
                   help="only this probe (repeatable)")
    p.add_argument("--no-plots", action="store_true", help="write the table only")
    p.add_argument("--settle-threshold", type=float, default=0.1, metavar="T",
                   help="map change (1 - Spearman) below which a layer counts as settled "
                        "(default: %(default)s)")


def run_study(args: argparse.Namespace) -> int:
    """Run the ``study`` subcommand from parsed arguments; exit status."""
    from ..runs.study import study
    from .common import prepare_out

    try:
        prepare_out(Path(args.out))
        study(args.run_dirs, out=args.out, probes=args.probe, plots=not args.no_plots,
              settle_threshold=args.settle_threshold)
    except CAManimError as e:
        print(f"camanim study: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``camanim study RUN_DIR... [--out DIR] [--probe NAME] [--no-plots]``."""
    p = argparse.ArgumentParser(prog="camanim study", description=(
        "Compare epoch-wise ybROAD across runs, models and CAM methods."))
    _add_arguments(p)
    return run_study(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
