"""Every check of `CAManimCallback`'s arguments, in two passes.

* `validate_init`, at construction: the probes (`camanim.lightning.probes`),
  targets, method and its options, layers, schedule and every option object.
  Everything that can be told before training starts fails here, with the
  fix in the message, and comes back as one resolved, frozen `Settings`.
* At fit start, what needs the trainer and the model: `check_setup` (the
  strategy, in ``setup``) and `check_model_outputs` (the model's output
  against the targets and the ROAD score, in ``on_fit_start``, once the
  model is on its device).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..core.layers import Selector
from ..core.maps import NORMALIZATIONS
from ..errors import CAManimError
from .options import ConvergenceOptions, MediaOptions, RoadOptions, VideoOptions
from .probes import Probes, load_probes

__all__ = ["VIDEO_NORMS", "SCORES", "SANITY_WHEN", "ON_ERROR", "Settings", "validate_init",
           "check_setup", "check_model_outputs", "resolve_module", "check_count",
           "check_schedule", "check_targets", "check_video", "check_road", "check_convergence",
           "check_media", "check_score", "check_sanity"]

VIDEO_NORMS = (*NORMALIZATIONS, "both")
SCORES = ("auto", "softmax", "logit")
SANITY_WHEN = ("start", "end")
ON_ERROR = ("warn", "raise")
#: `camanim.CAManim` keywords that ``cam_options`` may hold besides the method's options
ENGINE_KEYS = ("max_layers", "reshape_transform")
#: `camanim.CAManim` keywords that are the callback's own arguments (they also drive ROAD)
OWN_KEYS = ("batch_size", "seed", "progress")

ModelSpec = str | Callable[[nn.Module], nn.Module] | None


@dataclass(frozen=True)
class Settings:
    """The callback's arguments after `validate_init`: checked and resolved
    (``road`` / ``convergence`` None when off, ``video.normalization`` a
    tuple, ``media.workers`` a count)."""

    probes: Probes
    targets_mode: str                 # "labels", "predicted", "callables" or "given"
    targets: list[Any] | None         # B ints or B callables; None: predicted
    method: Any                       # a method name or a BaseCAM subclass
    layers: Selector
    every_n_epochs: int
    epochs: list[int] | None
    on_fit_end: bool
    sanity: tuple[str, ...]
    video: VideoOptions
    road: RoadOptions | None
    convergence: ConvergenceOptions | None
    media: MediaOptions
    save_dir: Path | None
    model: ModelSpec
    cam_options: dict[str, Any]
    batch_size: int | None
    seed: int
    progress: bool
    on_error: str


def validate_init(probes: Any, *, targets: Any, method: Any, layers: Selector,
                  every_n_epochs: Any, epochs: Any, on_fit_end: bool, sanity: Any,
                  video: Any, road: Any, convergence: Any, media: Any,
                  save_dir: str | Path | None, probe_names: Sequence[str] | None, masks: Any,
                  model: Any, cam_options: dict[str, Any] | None, batch_size: Any, seed: Any,
                  progress: bool, on_error: Any) -> Settings:
    """The construction pass: check every argument, return the `Settings`.

    Raises:
        CAManimError: naming the argument, what is wrong and the fix.
    """
    loaded = load_probes(probes, masks, probe_names)
    mode, resolved = check_targets(targets, loaded)
    every, chosen = check_schedule(every_n_epochs, epochs)
    cam = _check_method(method, cam_options)
    if not (model is None or isinstance(model, str) or callable(model)):
        raise CAManimError("model must be None, an attribute name of the LightningModule "
                           "or a callable (lightning_module) -> nn.Module")
    if on_error not in ON_ERROR:
        raise CAManimError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise CAManimError(f"seed must be an int, got {seed!r}")
    return Settings(
        probes=loaded, targets_mode=mode, targets=resolved, method=method, layers=layers,
        every_n_epochs=every, epochs=chosen, on_fit_end=bool(on_fit_end),
        sanity=check_sanity(sanity),
        video=check_video(_group(video, VideoOptions, "video") or VideoOptions(),
                          int(loaded.images.shape[1])),
        road=check_road(_group(road, RoadOptions, "road")),
        convergence=check_convergence(_group(convergence, ConvergenceOptions, "convergence")),
        media=check_media(_group(media, MediaOptions, "media") or MediaOptions()),
        save_dir=Path(save_dir) if save_dir is not None else None, model=model,
        cam_options=cam, batch_size=check_count("batch_size", batch_size),
        seed=int(seed), progress=bool(progress), on_error=str(on_error))


def _group(value: Any, cls: type, name: str) -> Any:
    """``True`` -> ``cls()``; ``False`` / ``None`` -> None; an instance as it is."""
    if value is True:
        return cls()
    if value is False or value is None:
        return None
    if isinstance(value, cls):
        return value
    raise CAManimError(f"{name} must be True, False or a camanim.{cls.__name__}, got {value!r}")


def _check_method(method: Any, cam_options: dict[str, Any] | None) -> dict[str, Any]:
    """A method name that exists (a typo should not wait an epoch) and
    options it takes; returns ``cam_options`` as a dict."""
    from ..methods import check_method_options, get_method

    options = dict(cam_options or {})
    own = [k for k in OWN_KEYS if k in options]
    if own:
        raise CAManimError(f"cam_options holds {own[0]!r}: pass {own[0]}= to CAManimCallback "
                           "itself (it also drives ROAD)")
    spec = get_method(method)
    check_method_options(spec, {k: v for k, v in options.items() if k not in ENGINE_KEYS})
    check_count("cam_options['max_layers']", options.get("max_layers"))
    return options


# ------------------------------------------------------------------ values

def check_count(name: str, value: Any, minimum: int = 1, allow_none: bool = True) -> int | None:
    """An int >= ``minimum`` (or None when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise CAManimError(f"{name} must be an int >= {minimum}"
                           + (" or None" if allow_none else "") + f", got {value!r}")
    return int(value)


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


def check_video(video: VideoOptions, channels: int) -> VideoOptions:
    """The video options resolved: normalization a tuple, fps a float;
    mean / std must fit the probes' ``channels``."""
    norms = video.norms
    bad = [n for n in norms if n not in VIDEO_NORMS]
    if bad:
        raise CAManimError(f"unknown normalization {bad[0]!r}; use any of "
                           f"{', '.join(VIDEO_NORMS)}")
    if len(set(norms)) != len(norms):
        raise CAManimError(f"normalization lists a name twice: {norms}")
    if not norms and (video.log or video.save):
        raise CAManimError("normalization is empty: name at least one (local, global, "
                           "both, none) or pass VideoOptions(log=False, save=False)")
    fps = video.fps
    if isinstance(fps, bool) or not (isinstance(fps, Real) and fps > 0 and math.isfinite(fps)):
        raise CAManimError(f"fps must be a positive number, got {fps!r}")
    mean, std = (None if v is None else [float(x) for x in v] for v in (video.mean, video.std))
    for what, v in (("mean", mean), ("std", std)):
        if v is not None and len(v) not in (1, channels):
            raise CAManimError(f"{what} has {len(v)} values but the probes have {channels} "
                               "channels")
    if std is not None and any(s <= 0 for s in std):
        raise CAManimError(f"std values must be > 0, got {std}")
    check_count("tb_size", video.tb_size, 16)
    colors = check_count("tb_colors", video.tb_colors, 2, allow_none=False)
    if colors is not None and colors > 256:
        raise CAManimError(f"tb_colors must be within 2..256 (a GIF palette), got {colors}")
    return replace(video, normalization=norms, fps=float(fps), log=bool(video.log),
                   save=bool(video.save), mean=mean, std=std,
                   class_names=None if video.class_names is None else list(video.class_names))


def check_road(road: RoadOptions | None) -> RoadOptions | None:
    """The ROAD options resolved (percentiles floats), or None (off)."""
    if road is None:
        return None
    pct = list(road.percentiles)
    if not pct or any(isinstance(p, bool) or not isinstance(p, Real) or not 0 < float(p) < 100
                      for p in pct):
        raise CAManimError(f"road percentiles must be numbers strictly between 0 and 100, "
                           f"got {pct}")
    noise = road.noise
    if isinstance(noise, bool) or not (isinstance(noise, Real) and noise >= 0):
        raise CAManimError(f"road noise must be >= 0, got {noise!r}")
    return replace(road, percentiles=tuple(float(p) for p in pct), noise=float(noise),
                   score=check_score(road.score), chance=bool(road.chance))


def check_score(score: Any) -> str:
    """``score``: ``"auto"``, ``"softmax"`` or ``"logit"``."""
    if score not in SCORES:
        raise CAManimError(f"score must be one of {', '.join(map(repr, SCORES))} (what ROAD "
                           f"scores: the target's softmax probability or its logit), got {score!r}")
    return str(score)


def check_convergence(options: ConvergenceOptions | None) -> ConvergenceOptions | None:
    """The settle threshold is a map change in (0, 2]."""
    if options is None:
        return None
    value = options.settle_threshold
    if isinstance(value, bool) or not isinstance(value, (Real, np.number)) \
            or not math.isfinite(float(value)) or not 0 < float(value) <= 2:
        raise CAManimError(f"settle_threshold must be a map change in (0, 2] (1 - Spearman; "
                           f"default 0.1), got {value!r}")
    return replace(options, settle_threshold=float(value))


def check_media(media: MediaOptions) -> MediaOptions:
    """Workers resolved (``None``: 2 to 8 by the CPU count), queue >= 0."""
    workers = check_count("media workers", media.workers)
    queue = check_count("media queue", media.queue, 0, allow_none=False)
    return replace(media, workers=workers or max(2, min(8, os.cpu_count() or 2)),
                   queue=int(media.queue if queue is None else queue),
                   save_maps=bool(media.save_maps))


def check_sanity(value: Any) -> tuple[str, ...]:
    """``sanity=`` as a tuple of ``"start"`` / ``"end"`` (empty: off)."""
    if value is None or value is False or value == "":
        return ()
    parts = value.split(",") if isinstance(value, str) else value
    if not isinstance(parts, (list, tuple)):
        raise CAManimError(f"sanity must be None, 'start', 'end' or 'start,end', got {value!r}")
    parts = [str(p).strip() for p in parts]
    bad = [p for p in parts if p not in SANITY_WHEN]
    if bad or not parts:
        raise CAManimError(f"sanity must be None, 'start', 'end' or 'start,end' (when to run "
                           f"the model-randomization check), got {value!r}")
    return tuple(w for w in SANITY_WHEN if w in parts)


def check_targets(targets: Any, probes: Probes) -> tuple[str, list[Any] | None]:
    """``(mode, targets)``: mode is ``"labels"``, ``"predicted"``, ``"callables"``
    or ``"given"``; targets a list of B ints or callables, or None."""
    labels, b = probes.labels, probes.images.shape[0]
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
                           f"{b} ints or {b} callables; got {targets!r}")
    if isinstance(targets, torch.Tensor):
        if targets.is_floating_point():
            raise CAManimError("targets must be integer class indices, got a float tensor")
        targets = [int(t) for t in targets.reshape(-1)]
    if isinstance(targets, (int, np.integer)) and not isinstance(targets, bool):
        targets = [int(targets)] * b
    if isinstance(targets, (list, tuple)) and targets and all(callable(t) for t in targets):
        if len(targets) != b:
            raise CAManimError(f"got {len(targets)} target callables for {b} probes; "
                               "pass one per probe")
        return "callables", list(targets)
    return "given", _class_targets(targets, b, probes.num_classes)


def _class_targets(targets: Any, b: int, k: int | None) -> list[int]:
    if not isinstance(targets, (list, tuple, np.ndarray)) or not all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in targets):
        raise CAManimError(f"targets must be None, 'predicted', 'labels', an int, {b} ints "
                           f"or {b} callables; got {targets!r}")
    out = [int(t) for t in targets]
    if len(out) != b:
        raise CAManimError(f"got {len(out)} targets for {b} probes; pass one per probe")
    bad = [t for t in out if t < 0 or (k is not None and t >= k)]
    if bad:
        rng = f" (the dataset has {k} classes: 0..{k - 1})" if k is not None else ""
        raise CAManimError(f"target class {bad[0]} is out of range{rng}")
    return out


# ------------------------------------------------------------------ fit start

def check_setup(trainer: Any) -> None:
    """Sharded strategies hold a slice of each parameter per rank: the
    one-pass capture needs the whole model on every rank."""
    name = type(getattr(trainer, "strategy", None)).__name__
    if "FSDP" in name or "DeepSpeed" in name:
        raise CAManimError(f"CAManimCallback does not support the sharded strategy {name}: "
                           "its hooks need the whole model on every rank. Use DDP, or run "
                           "`camanim explain` on a checkpoint after training")


def resolve_module(spec: ModelSpec, pl_module: nn.Module) -> nn.Module:
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
        raise CAManimError(f"model={spec!r} gave a {type(m).__name__}, not an nn.Module")
    return m


def check_model_outputs(logits: torch.Tensor, targets_mode: str, targets: list[Any] | None,
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
                               "always 1, so every ROAD score would be 0; pass "
                               "RoadOptions(score='logit') (or score='auto')")
        if score == "auto":
            rank_zero_warn("CAManimCallback: single-output model: ROAD scores the logit "
                           "(score='logit'; a softmax of one output is always 1)")
            return "logit"
    return "softmax" if score == "auto" else score
