"""Energy-based pointing game (EBPG, SISE paper): how much of a map's
energy falls inside the object mask, for every layer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..core.guard import one_torch_thread
from ..core.maps import LayerMaps, exact_dtype
from ..errors import CAManimError

__all__ = ["energy_pointing_game"]


def energy_pointing_game(maps: LayerMaps | torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Energy-based pointing game (SISE's EBPG) of every layer's map.

    The share of a map's energy inside the object mask::

        EBPG = sum(map * mask) / sum(map)

    computed on the ``"local"``-normalized map upsampled to the input size
    (the map each frame of a CAManim video shows).

    Args:
        maps: `LayerMaps` of B images, or an ``(L, B, H, W)`` (or
            ``(B, H, W)``) tensor of non-negative maps.
        masks: ``(B, H, W)`` masks at the input size: bool, or floats in
            [0, 1] (soft masks weight the energy).

    Returns:
        ``(L, B)`` float64 in [0, 1]; NaN for an image whose mask is empty
        (nothing to point at) or whose map is all zero.
    """
    m = torch.as_tensor(masks)
    if m.dim() == 2:
        m = m[None]
    if m.dim() != 3:
        raise CAManimError(f"masks must be (B, H, W), got shape {tuple(m.shape)}")
    if isinstance(maps, LayerMaps):
        it: Any = maps.iter_upsampled("local")
        n_layers = len(maps)
        device = maps.raw[0].device if maps.raw else torch.device("cpu")
    else:
        t = torch.as_tensor(maps).detach()
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4:
            raise CAManimError(f"maps must be (L, B, H, W), got shape {tuple(t.shape)}")
        it, n_layers, device = iter(t), t.shape[0], t.device
    m = m.detach().to(device=device, dtype=torch.float32)
    out = np.full((n_layers, m.shape[0]), np.nan)
    empty = (m.flatten(1).sum(1) <= 0).cpu().numpy()
    # small elementwise work: one CPU thread (OpenMP stalls on a busy CPU
    # make 2 threads ~30x slower here); sums accumulate in float64 on the CPU,
    # float32 on accelerators (MPS has no float64)
    acc = exact_dtype(device)
    with one_torch_thread(device.type == "cpu"):
        for i, u in enumerate(it):
            if u.shape != m.shape:
                raise CAManimError(f"maps of shape {tuple(u.shape)} (B, H, W) and masks of shape "
                                   f"{tuple(m.shape)} differ: resize the masks to the input size")
            u = u.detach().float()
            total = u.flatten(1).sum(1, dtype=acc)
            inside = (u * m).flatten(1).sum(1, dtype=acc)
            e = (inside / total.clamp_min(1e-300)).cpu().numpy()
            e[(total <= 0).cpu().numpy() | empty] = np.nan
            out[i] = e
    return out
