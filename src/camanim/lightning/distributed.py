"""Sharing the callback's ROAD work across distributed ranks.

Every rank scores an interleaved share of the layers (``rank, rank + world,
...``: neighbouring layers cost about the same, so the shares are even);
the shares are gathered on every rank through ``torch.distributed``'s object
collective (the process group Lightning's strategy set up) and merged into
the same ``(L, B)`` array a single process computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["layer_share", "merge_shares", "gather_objects", "score_share", "Share"]

Share = tuple[list[int], "np.ndarray | None"]   # (layer indices, (l, B) scores)


def layer_share(n_layers: int, rank: int, world: int) -> list[int]:
    """The layer indices one rank scores."""
    return list(range(rank, n_layers, max(1, world)))


def score_share(model: Any, x: Any, maps: Any, targets: Any, road_kw: dict[str, Any],
                rank: int, world: int) -> Share:
    """ybROAD (`camanim.metrics.road.ybroad` with ``road_kw``) of this rank's
    share of the layers of ``maps``: ``(indices, (l, B) scores or None)``."""
    from ..metrics.road import ybroad

    idx = layer_share(len(maps), rank, world)
    sub = maps.select(idx) if world > 1 else maps
    # layer_ids keep each layer's noise equal to a one-process run's (the
    # maps' logits spare the clean forward)
    res = (ybroad(model, x, sub, targets=targets, layer_ids=idx, **road_kw)
           if idx else None)
    return idx, None if res is None else np.asarray(res.scores, np.float64)


def merge_shares(shares: Sequence[Share | None]) -> np.ndarray | None:
    """``(L, B)`` scores from every rank's ``(indices, (l, B) scores)``."""
    parts = [(idx, s) for sh in shares if sh is not None for idx, s in [sh] if s is not None]
    if not parts:
        return None
    n = max(max(idx) for idx, _ in parts) + 1
    out = np.full((n, parts[0][1].shape[1]), np.nan)
    for idx, s in parts:
        out[idx] = s
    return out


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (every rank gets the list)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
