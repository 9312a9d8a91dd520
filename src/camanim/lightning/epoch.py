"""Pieces of one monitored epoch's work in `CAManimCallback`: the CAM
engine, which probes have finite logits, and the epoch's `EpochRecord`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..core.layers import Selector
from ..core.maps import LayerMaps
from ..engine import CAManim
from ..errors import CAManimError
from ..runs.history import EpochRecord, floats

__all__ = ["build_engine", "finite_probes", "pick", "epoch_record", "state_key_parts"]

def build_engine(model: nn.Module, method: Any, layers: Selector, *,
                 cam_options: dict[str, Any], seed: int, progress: bool,
                 batch_size: int | None, mean: Sequence[float] | None,
                 std: Sequence[float] | None) -> CAManim:
    """The `camanim.CAManim` of the callback's method, layers and options;
    Integrated Grad-CAM's black baseline lives in the model's input space,
    so it gets ``mean`` / ``std`` unless ``cam_options`` names them."""
    from ..methods import get_method

    kw: dict[str, Any] = dict(seed=seed, progress=progress, **cam_options)
    if batch_size is not None:
        kw["batch_size"] = batch_size
    if get_method(method).name == "integrated-gradcam":
        for key, value in (("mean", mean), ("std", std)):
            if value is not None:
                kw.setdefault(key, value)
    return CAManim(model, method, layers, **kw)


def state_key_parts(method: Any, layers: Selector, probes: Sequence[str]) -> dict[str, Any]:
    """What tells two callbacks' checkpoint states apart: method, layers, probes."""
    text = str(layers)
    if callable(layers) and not isinstance(layers, str):
        # a callable has no stable text: history is matched by position
        text = f"callable:{getattr(layers, '__qualname__', type(layers).__name__)}"
    return dict(method=str(getattr(method, "__name__", method)), layers=text,
                probes=list(probes))


def finite_probes(model: nn.Module, x: torch.Tensor, names: Sequence[str],
                  epoch: int | None) -> np.ndarray:
    """``(B,)`` bool: which probes' logits are all finite (one forward of
    ``x``, ``(B, C, H, W)``, in eval mode without gradients). Probes with NaN
    or Inf logits are named in a warning: they have no target class and no
    score this epoch (recorded as missing).

    Raises:
        CAManimError: when every probe's logits are NaN or Inf (the model has
            diverged), naming the epoch.
    """
    from ..core.capture import forward_logits
    from ..core.guard import eval_mode

    with eval_mode(model), torch.no_grad():
        out = forward_logits(model, x)
    ok = torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1).cpu().numpy()
    at = f"epoch {epoch}" if epoch is not None else "this epoch"
    if not ok.any():
        raise CAManimError(f"{at}: the model's outputs are NaN or Inf for every probe: the "
                           "model has diverged (check the loss, the learning rate and the "
                           "data); nothing was recorded for this epoch")
    if not ok.all():
        bad = [n for n, good in zip(names, ok, strict=True) if not good]
        rank_zero_warn(f"CAManimCallback: {at}: the logits of probe(s) {', '.join(bad)} are "
                       "NaN or Inf: no map, target or ROAD for them this epoch (recorded as "
                       "missing, empty cells in ybroad.csv)")
    return ok


def pick(items: Any, keep: np.ndarray) -> Any:
    """The kept entries of ``items`` (None, a list, a tensor or an array of
    B entries)."""
    if items is None or bool(keep.all()):
        return items
    if isinstance(items, (torch.Tensor, np.ndarray)):
        return items[torch.as_tensor(keep) if isinstance(items, torch.Tensor) else keep]
    return [v for v, k in zip(items, keep, strict=True) if k]


def epoch_record(step: int, maps: LayerMaps, road: np.ndarray | None, ebpg: np.ndarray | None,
                 probes: Sequence[str], keep: np.ndarray, masked: Sequence[str]) -> EpochRecord:
    """One epoch's record. ``maps``, ``road`` ``(L, K)`` and ``ebpg``
    ``(L, K)`` hold the K kept probes (``keep``, ``(B,)`` bool); the others
    get no target and missing (None) scores, never a number."""
    names = pick(list(probes), keep)
    targets = ([None] * maps.batch_size if maps.targets is None
               else [int(t) for t in maps.targets.reshape(-1)])
    missing: dict[str, int | None] = {n: None for n in probes if n not in names}
    nones: list[float | None] = [None] * len(maps)
    return EpochRecord(
        global_step=int(step), names=list(maps.names), method=str(maps.method),
        targets={**missing, **dict(zip(names, targets, strict=True))},
        road=None if road is None else {**{n: nones for n in missing},
                                        **{n: floats(road[:, b]) for b, n in enumerate(names)}},
        ebpg=None if ebpg is None else {n: floats(ebpg[:, b]) for b, n in enumerate(names)
                                        if n in masked})
