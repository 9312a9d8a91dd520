"""Grouped options of `CAManimCallback`: small, typed, documented objects.

The callback takes the knobs that belong together as one object each, the
way ``cam_options`` already gathers the CAM method's options:

* `VideoOptions`: what the per-layer videos look like and where they go;
* `RoadOptions`: how ybROAD scores every layer (``road=False`` turns it off);
* `ConvergenceOptions`: the map-change tracker (``convergence=False``: off);
* `MediaOptions`: the background media work and the raw maps on disk.

Every value is checked once, when the callback is built
(`camanim.lightning.validation`), never later. The old flat keyword names
(``fps=``, ``road_noise=``, ``media_queue=``, ...) and positional arguments
after ``probes`` still work for one release through `translate_legacy`,
with a ``DeprecationWarning`` naming the new spelling.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from lightning.pytorch.utilities import rank_zero_warn

from ..errors import CAManimError

__all__ = ["VideoOptions", "RoadOptions", "ConvergenceOptions", "MediaOptions", "LEGACY_NAMES",
           "LEGACY_POSITIONAL", "translate_legacy", "deprecated_spellings"]


@dataclass(frozen=True)
class VideoOptions:
    """How the per-layer CAM videos look and where they go.

    Args:
        normalization: one video per name: ``"local"`` (min-max per layer),
            ``"global"`` (over all layers of an image), ``"none"`` or
            ``"both"`` (local and global side by side).
        fps: frames (layers) per second.
        log: log animated GIFs to TensorBoard (``camanim/<probe>/...``).
        save: write full-size MP4 files under ``save_dir/videos``.
        size: MP4 panel size: ``None`` (automatic), an int (long side) or
            ``(height, width)``.
        tb_size: long side of a TensorBoard GIF panel in pixels (``None``:
            as ``size``). GIFs are the bulk of the event files, which
            TensorBoard loads whole: at the full setting (4 probes x 53
            layers) the defaults keep an epoch under 6 MiB.
        tb_colors: colours of the TensorBoard GIFs' shared palette (2..256).
        mean: the probes' input normalization (one value or one per
            channel), undone in the frames; also Integrated Grad-CAM's black
            baseline when ``cam_options`` names none.
        std: as ``mean``; every value > 0.
        class_names: class names for the frames' captions and the text
            summaries.

    Example:
        >>> VideoOptions(normalization="both", fps=4, save=False)  # doctest: +ELLIPSIS
        VideoOptions(normalization='both', fps=4, log=True, save=False, ...)
    """

    normalization: str | Sequence[str] = ("local", "global")
    fps: float = 8.0
    log: bool = True
    save: bool = True
    size: int | tuple[int, int] | None = None
    tb_size: int | None = 128
    tb_colors: int = 64
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    class_names: Sequence[str] | None = None

    @property
    def norms(self) -> tuple[str, ...]:
        """``normalization`` as a tuple of names."""
        n = self.normalization
        return (n,) if isinstance(n, str) else tuple(n)

    @property
    def gif_size(self) -> int | tuple[int, int] | None:
        """The TensorBoard GIF panel size (``tb_size``, else ``size``)."""
        return self.tb_size if self.tb_size is not None else self.size


@dataclass(frozen=True)
class RoadOptions:
    """How ybROAD scores every layer's map (pytorch-grad-cam's ROAD).

    Args:
        percentiles: ROAD percentiles ``p`` in (0, 100), with
            pytorch-grad-cam's convention: MoRF keeps the pixels whose map
            value is below the ``p``-th percentile (removes the top
            ``100 - p`` %), LeRF keeps those above the ``(100 - p)``-th.
        noise: imputation noise (>= 0).
        score: what ROAD scores: ``"softmax"`` (the target's probability),
            ``"logit"``, or ``"auto"`` (softmax; the logit for a
            single-output head, with a notice).
        chance: also score a seeded random map and a centred blob, the line
            a layer must clear (``ybroad/<probe>/above_chance``).
    """

    percentiles: Sequence[float] = (20, 40, 60, 80)
    noise: float = 0.01
    score: str = "auto"
    chance: bool = True


@dataclass(frozen=True)
class ConvergenceOptions:
    """Each layer's map change (``1 - Spearman``) against the previous
    callback epoch (`camanim.lightning.convergence`).

    Args:
        settle_threshold: the change below which a layer counts as settled,
            in (0, 2].
    """

    settle_threshold: float = 0.1


@dataclass(frozen=True)
class MediaOptions:
    """The background work that draws and writes an epoch's pictures.

    Args:
        workers: threads that render and encode one epoch's pictures
            (``None``: 2 to 8, by the CPU count).
        queue: epochs whose pictures may still be in the works while
            training goes on (the training thread waits when the queue is
            full); ``0`` draws everything before training resumes.
        save_maps: also save the raw maps (``maps/epoch{E:03d}.npz``,
            `camanim.LayerMaps`).
        viewer: write ``viewer/``, every layer's map at every epoch, small,
            for TensorBoard's CAManim tab and ``camanim report``
            (docs/VIEWER.md).
    """

    workers: int | None = None
    queue: int = 1
    save_maps: bool = False
    viewer: bool = True


# ------------------------------------------------------------- old spellings

#: old flat keyword -> (new argument, field of its option object); the
#: ``cam_options`` field is a key of that dict
LEGACY_NAMES: dict[str, tuple[str, str]] = {
    "normalization": ("video", "normalization"), "fps": ("video", "fps"),
    "log_videos": ("video", "log"), "save_videos": ("video", "save"),
    "video_size": ("video", "size"), "tb_video_size": ("video", "tb_size"),
    "tb_colors": ("video", "tb_colors"), "mean": ("video", "mean"), "std": ("video", "std"),
    "class_names": ("video", "class_names"),
    "road_percentiles": ("road", "percentiles"), "road_noise": ("road", "noise"),
    "score": ("road", "score"), "chance": ("road", "chance"),
    "settle_threshold": ("convergence", "settle_threshold"),
    "media_workers": ("media", "workers"), "media_queue": ("media", "queue"),
    "save_maps": ("media", "save_maps"), "max_layers": ("cam_options", "max_layers"),
}

#: the order of the positional parameters after ``probes`` up to 0.1.0
LEGACY_POSITIONAL = ("targets", "method", "layers", "every_n_epochs", "epochs", "normalization",
                     "road", "road_percentiles", "fps", "log_videos", "save_dir", "probe_names",
                     "max_layers", "batch_size", "seed", "on_fit_end", "masks", "mean", "std",
                     "save_maps", "road_noise")

_CLASSES: dict[str, type] = {"video": VideoOptions, "road": RoadOptions,
                             "convergence": ConvergenceOptions, "media": MediaOptions}


def _spelling(old: str) -> str:
    group, name = LEGACY_NAMES[old]
    if group == "cam_options":
        return f"cam_options={{{name!r}: ...}}"
    return f"{group}={_CLASSES[group].__name__}({name}=...)"


def translate_legacy(args: Sequence[Any], kwargs: Mapping[str, Any],
                     stacklevel: int = 3) -> dict[str, Any]:
    """Keyword arguments in today's spelling from positional arguments after
    ``probes`` and the old flat keywords, with one ``DeprecationWarning``
    naming each new spelling (``stacklevel`` points at the user's call).

    Raises:
        CAManimError: too many positional arguments, an argument given twice,
            or an old name next to the option object that now holds it.
    """
    out = dict(kwargs)
    if len(args) > len(LEGACY_POSITIONAL):
        raise CAManimError(f"CAManimCallback takes probes and {len(LEGACY_POSITIONAL)} "
                           f"positional arguments at most; got {len(args) + 1}: pass the "
                           "others by keyword")
    moved: list[str] = []
    if args:
        names = LEGACY_POSITIONAL[:len(args)]
        twice = [n for n in names if n in out]
        if twice:
            raise CAManimError(f"CAManimCallback got {twice[0]!r} both by position and by keyword")
        out.update(zip(names, args, strict=True))
        moved.append("arguments after probes are keyword-only now (pass "
                     + ", ".join(f"{n}=" for n in names) + ")")
    groups: dict[str, dict[str, Any]] = {}
    for old in [k for k in out if k in LEGACY_NAMES]:
        group, name = LEGACY_NAMES[old]
        groups.setdefault(group, {})[name] = out.pop(old)
        moved.append(f"{old}= is now {_spelling(old)}")
    for group, values in groups.items():
        out[group] = _merge(group, out.get(group), values)
    if moved:
        # once under DDP (rank zero); +3: the frames of Lightning's rank-zero wrappers
        rank_zero_warn("CAManimCallback: " + "; ".join(moved) + ". The old spelling goes "
                       "away in the next release.", category=DeprecationWarning,
                       stacklevel=stacklevel + 3)
    return out


def _merge(group: str, given: Any, values: dict[str, Any]) -> Any:
    """The option object (or dict) ``group`` with the old flat ``values``."""
    if group == "cam_options":
        base = dict(given or {})
        clash = sorted(set(base) & set(values))
        if clash:
            raise CAManimError(f"CAManimCallback: {clash[0]} given both as max_layers= and in "
                               "cam_options; keep cam_options only")
        return {**base, **values}
    cls = _CLASSES[group]
    if isinstance(given, cls):
        raise CAManimError(f"CAManimCallback: {', '.join(values)} given next to {group}="
                           f"{cls.__name__}(...); pass them inside {cls.__name__} only")
    if given is False:  # road=False, road_noise=0.1 (old spelling): still off
        return False
    return cls(**values)


_Init = TypeVar("_Init", bound=Callable[..., None])


def deprecated_spellings(init: _Init) -> _Init:
    """Let ``__init__(self, probes, *, ...)`` take, for one more release,
    positional arguments after ``probes`` and the old flat keywords
    (`translate_legacy`); its signature shows today's spelling only."""

    @functools.wraps(init)
    def wrapper(self: Any, probes: Any, *args: Any, **kwargs: Any) -> None:
        if args or any(k in LEGACY_NAMES for k in kwargs):
            kwargs = translate_legacy(args, kwargs, stacklevel=3)
        init(self, probes, **kwargs)

    return cast(_Init, wrapper)
