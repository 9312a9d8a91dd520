"""Checks of `CAManimCallback`'s constructor arguments: everything that can
be told before training starts fails there, with the fix in the message."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..core.maps import NORMALIZATIONS
from ..errors import CAManimError
from .probes import Probes

__all__ = ["VIDEO_NORMS", "build_engine", "check_schedule", "check_targets", "check_videos",
           "check_road", "check_count", "resolve_module", "state_key_parts"]

VIDEO_NORMS = NORMALIZATIONS + ("both",)


def check_schedule(every_n_epochs: Any, epochs: Any) -> tuple[int, list[int] | None]:
    """``(every_n_epochs, sorted epochs or None)``."""
    if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, (int, np.integer)):
        raise CAManimError(f"every_n_epochs must be an int >= 1, got {every_n_epochs!r}")
    if every_n_epochs < 1:
        raise CAManimError(f"every_n_epochs must be >= 1, got {every_n_epochs} (to log "
                           "only at chosen epochs pass epochs=[...])")
    if epochs is None:
        return int(every_n_epochs), None
    if isinstance(epochs, (int, str)) or not isinstance(epochs, (Sequence, range, np.ndarray)):
        raise CAManimError(f"epochs must be a list of epoch numbers, e.g. [0, 4, 9]; "
                           f"got {epochs!r}")
    ep = list(epochs)
    bad = [e for e in ep if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or e < 0]
    if bad or not ep:
        raise CAManimError(f"epochs must be non-negative ints (0-based, as "
                           f"trainer.current_epoch); bad: {bad or ep!r}")
    if len(set(ep)) != len(ep):
        raise CAManimError(f"epochs lists an epoch twice: {sorted(ep)}")
    if every_n_epochs != 1:
        raise CAManimError("pass either every_n_epochs or epochs, not both")
    return 1, sorted(int(e) for e in ep)


def check_videos(normalization: str | Sequence[str], fps: Any, videos_on: bool,
                 mean: Sequence[float] | None, std: Sequence[float] | None,
                 channels: int) -> tuple[tuple[str, ...], float]:
    """``(normalizations, fps)``; mean/std must fit the probes' channels."""
    norms = (normalization,) if isinstance(normalization, str) else tuple(normalization)
    bad = [n for n in norms if n not in VIDEO_NORMS]
    if bad:
        raise CAManimError(f"unknown normalization {bad[0]!r}; use any of "
                           f"{', '.join(VIDEO_NORMS)}")
    if len(set(norms)) != len(norms):
        raise CAManimError(f"normalization lists a name twice: {norms}")
    if not norms and videos_on:
        raise CAManimError("normalization is empty: name at least one (local, global, "
                           "both, none) or pass log_videos=False, save_videos=False")
    if not (isinstance(fps, (int, float)) and fps > 0 and math.isfinite(fps)):
        raise CAManimError(f"fps must be a positive number, got {fps!r}")
    for what, v in (("mean", mean), ("std", std)):
        if v is not None:
            n = len(list(v))
            if n not in (1, channels):
                raise CAManimError(f"{what} has {n} values but the probes have {channels} "
                                   "channels")
    if std is not None and any(float(s) <= 0 for s in std):
        raise CAManimError(f"std values must be > 0, got {list(std)}")
    return norms, float(fps)


def check_road(road: bool, percentiles: Sequence[float], noise: Any) -> tuple[tuple[float, ...], float]:
    """``(percentiles, noise)``."""
    pct = list(percentiles)
    if road and (not pct or any(not 0 < float(p) < 100 for p in pct)):
        raise CAManimError(f"road_percentiles must be numbers strictly between 0 and 100, "
                           f"got {pct}")
    if not (isinstance(noise, (int, float)) and not isinstance(noise, bool) and noise >= 0):
        raise CAManimError(f"road_noise must be >= 0, got {noise!r}")
    return tuple(float(p) for p in pct), float(noise)


def check_count(name: str, value: Any, minimum: int = 1, allow_none: bool = True) -> int | None:
    """An int >= ``minimum`` (or None when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise CAManimError(f"{name} must be an int >= {minimum}"
                           + (" or None" if allow_none else "") + f", got {value!r}")
    return int(value)


def check_targets(targets: Any, probes: Probes) -> tuple[str, Any]:
    """``(mode, targets)``: mode is ``"labels"``, ``"predicted"``, ``"callables"``
    or ``"given"``; targets a list of B ints or callables, or None."""
    labels, k, B = probes.labels, probes.num_classes, probes.images.shape[0]
    if targets is None:
        return ("labels", list(labels)) if labels is not None else ("predicted", None)
    if isinstance(targets, str):
        if targets == "predicted":
            return "predicted", None
        if targets in ("labels", "label"):
            if labels is None:
                raise CAManimError("targets='labels' needs probes from a dataset whose "
                                   "items all carry an integer label")
            return "labels", list(labels)
        raise CAManimError(f"targets must be None, 'predicted', 'labels', an int, "
                           f"{B} ints or {B} callables; got {targets!r}")
    if isinstance(targets, torch.Tensor):
        if targets.is_floating_point():
            raise CAManimError("targets must be integer class indices, got a float tensor")
        targets = [int(t) for t in targets.reshape(-1)]
    if isinstance(targets, (int, np.integer)) and not isinstance(targets, bool):
        targets = [int(targets)] * B
    if isinstance(targets, (list, tuple)) and targets and all(callable(t) for t in targets):
        if len(targets) != B:
            raise CAManimError(f"got {len(targets)} target callables for {B} probes; "
                               "pass one per probe")
        return "callables", list(targets)
    if not isinstance(targets, (list, tuple, np.ndarray)) or not all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in targets):
        raise CAManimError(f"targets must be None, 'predicted', 'labels', an int, {B} ints "
                           f"or {B} callables; got {targets!r}")
    targets = [int(t) for t in targets]
    if len(targets) != B:
        raise CAManimError(f"got {len(targets)} targets for {B} probes; pass one per probe")
    bad = [t for t in targets if t < 0 or (k is not None and t >= k)]
    if bad:
        rng = f" (the dataset has {k} classes: 0..{k - 1})" if k is not None else ""
        raise CAManimError(f"target class {bad[0]} is out of range{rng}")
    return "given", targets


def resolve_module(spec: Any, pl_module: nn.Module) -> nn.Module:
    """The module to explain: ``spec`` is None, an attribute path or a callable."""
    if spec is None:
        return pl_module
    m: Any = pl_module
    if isinstance(spec, str):
        for part in spec.split("."):
            if not hasattr(m, part):
                raise CAManimError(f"model={spec!r}: the LightningModule has no "
                                   f"attribute {part!r}")
            m = getattr(m, part)
    else:
        m = spec(pl_module)
    if not isinstance(m, nn.Module):
        raise CAManimError(f"model={spec!r} gave a {type(m).__name__}, not an "
                           "nn.Module")
    return m


def build_engine(cb: Any, model: nn.Module) -> Any:
    """The `camanim.CAManim` of a callback's method, layers and options
    (``max_layers``, ``seed``, ``progress``, ``batch_size``, ``cam_options``)."""
    from ..engine import CAManim
    from ..methods import get_method

    kw = dict(max_layers=cb.max_layers, seed=cb.seed, progress=cb.progress, **cb.cam_options)
    if cb.batch_size is not None:
        kw["batch_size"] = cb.batch_size
    if get_method(cb.method).name == "integrated-gradcam":
        # its black baseline lives in the model's input space
        for key in ("mean", "std"):
            if getattr(cb, key) is not None:
                kw.setdefault(key, getattr(cb, key))
    return CAManim(model, cb.method, cb.layers, **kw)


def state_key_parts(method: Any, layers: Any, probes: Sequence[str]) -> dict[str, Any]:
    """What tells two callbacks' checkpoint states apart: method, layers, probes."""
    if callable(layers) and not isinstance(layers, str):
        # a callable has no stable text: history is matched by position
        layers = f"callable:{getattr(layers, '__qualname__', type(layers).__name__)}"
    return dict(method=str(getattr(method, "__name__", method)), layers=str(layers),
                probes=list(probes))
