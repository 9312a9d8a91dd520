"""Checks of the model `CAManimCallback` explains: its output at the start of
``fit`` (shape, class count, a single-logit head) and, every monitored
epoch, whether each probe's logits are finite."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import CAManimError

__all__ = ["SCORES", "check_score", "check_outputs", "finite_probes", "pick", "epoch_record"]

SCORES = ("auto", "softmax", "logit")


def check_score(score: Any) -> str:
    """The ``score=`` argument: ``"auto"``, ``"softmax"`` or ``"logit"``."""
    if score not in SCORES:
        raise CAManimError(f"score must be one of {', '.join(map(repr, SCORES))} (what ROAD "
                           f"scores: the target's softmax probability or its logit), got {score!r}")
    return str(score)


def check_outputs(logits: torch.Tensor, targets_mode: str, targets: Sequence[int] | None,
                  score: str, road: bool) -> str:
    """Check one forward's output ``logits`` against the targets and the
    ROAD score; returns the score kind ROAD uses (``"softmax"`` or
    ``"logit"``; ``"auto"`` picks ``"logit"`` for a single-output head).

    Raises:
        CAManimError: output not ``(B, classes)`` (with class targets),
            targets outside the classes, ``score="softmax"`` on one output.
    """
    if targets_mode == "callables":
        return "softmax" if score == "auto" else score
    if logits.dim() != 2:
        raise CAManimError(f"CAManimCallback: the model returns shape {tuple(logits.shape)}, "
                           "not (B, classes); pass model= (the classifier to explain) or "
                           "target callables")
    k = int(logits.shape[-1])
    bad = [t for t in (targets or []) if not 0 <= t < k]
    if bad:
        raise CAManimError(f"CAManimCallback: target class {bad[0]} is out of range: "
                           f"the model has {k} classes (0..{k - 1})")
    if k == 1 and road:
        if score == "softmax":
            raise CAManimError("CAManimCallback: the model has a single output: its softmax is "
                               "always 1, so every ROAD score would be 0; pass score='logit' "
                               "(or score='auto')")
        if score == "auto":
            warnings.warn("CAManimCallback: single-output model: ROAD scores the logit "
                          "(score='logit'; a softmax of one output is always 1)", stacklevel=3)
            return "logit"
    return "softmax" if score == "auto" else score


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
        bad = [n for n, good in zip(names, ok) if not good]
        warnings.warn(f"CAManimCallback: {at}: the logits of probe(s) {', '.join(bad)} are "
                      "NaN or Inf: no map, target or ROAD for them this epoch (recorded as "
                      "missing, empty cells in ybroad.csv)", stacklevel=3)
    return ok


def pick(items: Any, keep: np.ndarray) -> Any:
    """The kept entries of ``items`` (None, a list, a tensor or an array of
    B entries)."""
    if items is None or bool(keep.all()):
        return items
    if isinstance(items, (torch.Tensor, np.ndarray)):
        return items[torch.as_tensor(keep) if isinstance(items, torch.Tensor) else keep]
    return [v for v, k in zip(items, keep) if k]


def epoch_record(step: int, maps: Any, road: np.ndarray | None, ebpg: np.ndarray | None,
                 probes: Sequence[str], keep: np.ndarray, masked: Sequence[str]) -> dict:
    """One epoch's history record (see `camanim.runs.history`). ``maps``,
    ``road`` ``(L, K)`` and ``ebpg`` ``(L, K)`` hold the K kept probes
    (``keep``, ``(B,)`` bool); the others get no target and missing (None)
    scores, never a number."""
    from ..runs.history import floats

    names = pick(list(probes), keep)
    targets = ([None] * maps.batch_size if maps.targets is None
               else [int(t) for t in maps.targets.reshape(-1)])
    missing = {n: None for n in probes if n not in names}
    nones = [None] * len(maps)
    return {
        "global_step": int(step), "names": list(maps.names), "method": str(maps.method),
        "targets": {**missing, **dict(zip(names, targets))},
        "road": None if road is None else {**{n: nones for n in missing},
                                           **{n: floats(road[:, b]) for b, n in enumerate(names)}},
        "ebpg": None if ebpg is None else {n: floats(ebpg[:, b]) for b, n in enumerate(names)
                                           if n in masked},
    }
