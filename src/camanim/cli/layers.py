"""``camanim layers``: the layers a selector draws, and those it skips."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from ..core.images import parse_size
from ..errors import CAManimError
from .common import layer_selector
from .models import build_model, in_channels


def cmd_layers(args: argparse.Namespace) -> int:
    """``camanim layers``: print the layer table."""
    from ..core.layers import list_layers

    size = parse_size(args.size)
    if size is None:
        raise CAManimError("camanim layers needs an example size, e.g. --size 224")
    model, _ = build_model(args.model, "none", None, args.num_classes, quiet=True)
    x = torch.zeros(1, in_channels(model), *size)
    table = list_layers(model, x, layers=layer_selector(args.layers))
    rows = [(str(i), info.name, info.type, _shape(info.output_shape), f"{info.params_total:,}",
             info.layout) for i, info in enumerate(table.selected)]
    print(_table(("#", "name", "type", "output shape", "params", "layout"), rows))
    print("(output shape per image, as the layout stores it: CxHxW for nchw, HxWxC for nhwc)")
    print(f"\n{len(table.selected)} layers selected by --layers {args.layers} "
          f"({len(table.calls)} module calls in one forward at {size[0]}x{size[1]})")
    if table.skipped:
        print(f"\nskipped ({len(table.skipped)}):")
        skipped = [(s.name, s.type, _shape(s.output_shape), s.skipped or "")
                   for s in table.skipped]
        print(_table(("name", "type", "output shape", "reason"), skipped))
    return 0


def _shape(shape: Sequence[int]) -> str:
    """Per-image output shape (the batch dimension dropped): ``64x56x56``."""
    return "x".join(str(s) for s in shape[1:]) if len(shape) > 1 else "-"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
    ]
    right = {"#", "params"}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if h in right else c.ljust(w)
                         for c, w, h in zip(cells, widths, head, strict=False)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


