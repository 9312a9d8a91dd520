"""``camanim layers``: the layers a selector draws, and those it skips."""

from __future__ import annotations

import argparse

import torch

from ..core.images import parse_size
from ..errors import CAManimError
from .common import layer_selector
from .models import build_model, in_channels


def cmd_layers(args: argparse.Namespace) -> int:
    """``camanim layers``: print the layer table (`camanim.LayerTable`) to stdout."""
    from ..core.layers import list_layers

    size = parse_size(args.size)
    if size is None:
        raise CAManimError("camanim layers needs an example size, e.g. --size 224")
    model, _ = build_model(args.model, "none", None, args.num_classes, quiet=True)
    x = torch.zeros(1, in_channels(model), *size)
    table = list_layers(model, x, layers=layer_selector(args.layers))
    print(table)
    print(f"(--layers {args.layers}, one forward at {size[0]}x{size[1]})")
    return 0
