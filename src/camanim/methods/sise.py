"""SISE (Sattarzadeh et al., AAAI 2021) and Ada-SISE (Sudhakar et al., ICASSP 2021).

Both explain a prediction from the last layer of every block (the
``"blocks"`` layers; torchvision ResNet-50: ``relu, layer1..layer4``, 3904
channels in all):

1. One forward and one backward give every block's activations ``A`` and
   the mean gradient ``a_k`` of the target score w.r.t. each channel.
2. Channel selection. SISE keeps ``a_k > 0`` with ``a_k >= mu * max_k a_k``
   (``mu = 0``: every positive channel; ``mu = 1``: the strongest one).
   Ada-SISE normalizes ``a / max a`` and keeps, among the positive ones,
   those above Otsu's threshold of their 256-bin histogram. Channels whose
   map is constant are dropped; a layer with no channel left is skipped.
3. Every kept map is upsampled bilinearly to the input, min-max scaled to
   a mask ``m_k`` in [0, 1], and the masked input ``x * m_k`` (masking in the
   model's normalized input space) is scored: ``s_k`` = softmax probability
   of the target class by default. The layer map is
   ``V = minmax(sum_k s_k * m_k / sum_xy m_k)`` (see "mask normalization").
4. Fusion from low to high level: ``E = V_1``, then
   ``E = (E + V_b) * Bin(V_b)`` for ``b = 2..L``, ``Bin`` = Otsu binarization
   of ``V_b`` (hard by default, or the authors' soft
   ``sigmoid(100 (V_b - t))``), and a final min-max.

Mask normalization (``mask_norm``): the authors' code divides every mask by
its own spatial sum before the score-weighted sum
(``masks /= masks.sum(axis=(0, 1))``), i.e. ``V = sum_k s_k m_k / sum_xy m_k``:
a score per unit of mask area, so a small mask that keeps the score high
counts more than a large one. That is the default (``"area"``). ``"pixel"``
is the RISE-style conditional expectation ``sum_k s_k m_k / sum_k m_k``
(element-wise): it loses where the masks are (one kept channel gives a
constant map), so it is offered, not the default. ``"none"`` is the plain
score-weighted sum (what several re-implementations do).

Gradients and scores use the same target score: the softmax probability of
the class by default, as in the authors' code (``score="logit"`` for the raw
logit). Target callables without a class index score themselves.

Layers: with ``CAManim(method="sise")`` the default (``layers=None``) is
``"blocks"`` (the SISE rule, see `camanim.core.layers.block_layers`). An explicit
``layers="conv"`` is replaced by ``"blocks"`` with a warning (SISE fuses one
map per block; every convolution is not a block). Any other selector
(``"all"``, names, a callable) is honoured as given.

Precision: the model runs in its own dtype (masked images are cast to it);
masks, mask areas, scores, layer maps and the fusion are float32 for a
float16 / bfloat16 model (a float16 sum over a 256 x 256 mask overflows).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.capture import capture, forward_logits
from ..core.guard import eval_mode
from ..core.inputs import SCORES, Target, check_images, logit_target, score_outputs
from ..core.layers import LayerInfo, Selector, list_layers
from ..core.layout import NCHW
from ..core.maps import LayerMaps, image_size, minmax, wide
from ..errors import CAManimError
from .otsu import bin_index, histogram, otsu_binarize, otsu_split
from .seed_common import ExplanationMaps, clean_targets

MASK_NORMS = ("area", "pixel", "none")
FUSIONS = ("hard", "soft")
MASK_EPS = 1e-6  # the authors' code's epsilon on mask sums
ADA_SISE_OPTIONS = ("score", "mask_norm", "fusion", "temperature", "bins")
SISE_OPTIONS = ("mu",) + ADA_SISE_OPTIONS


# --------------------------------------------------------------- options
@dataclass(frozen=True)
class SISEOptions:
    """Validated SISE / Ada-SISE options (see module docstring)."""

    mu: float = 0.0
    adaptive: bool = False
    score: str = "softmax"
    mask_norm: str = "area"
    fusion: str = "hard"
    temperature: float = 100.0
    bins: int = 256


def sise_options(options: dict[str, Any], adaptive: bool) -> SISEOptions:
    """Check ``CAManim(..., **options)`` for SISE (``adaptive=False``) or Ada-SISE."""
    name = "ada-sise" if adaptive else "sise"
    valid = set(ADA_SISE_OPTIONS if adaptive else SISE_OPTIONS)
    unknown = sorted(set(options) - valid)
    if unknown:
        hint = " (Ada-SISE chooses channels itself; use method='sise' for mu)" \
            if adaptive and "mu" in unknown else ""
        raise CAManimError(f"unknown {name} option(s) {unknown}{hint}; valid options: "
                           f"{', '.join(sorted(valid))}")
    o = SISEOptions(adaptive=adaptive, **options)
    try:
        mu = float(o.mu)
    except (TypeError, ValueError):
        raise CAManimError(f"mu must be a number in [0, 1], got {o.mu!r}") from None
    if not 0.0 <= mu <= 1.0:
        raise CAManimError(f"mu must be in [0, 1] (0: every positive channel, 1: the "
                           f"strongest only), got {o.mu}")
    for key, allowed in (("score", SCORES), ("mask_norm", MASK_NORMS), ("fusion", FUSIONS)):
        if getattr(o, key) not in allowed:
            raise CAManimError(f"{name} option {key}={getattr(o, key)!r} is not one of "
                               f"{', '.join(map(repr, allowed))}")
    if isinstance(o.bins, bool) or not isinstance(o.bins, int) or o.bins < 2:
        raise CAManimError(f"bins must be an int >= 2, got {o.bins!r}")
    if not isinstance(o.temperature, (int, float)) or not o.temperature > 0:
        raise CAManimError(f"temperature must be a positive number, got {o.temperature!r}")
    return SISEOptions(mu=mu, adaptive=adaptive, score=o.score, mask_norm=o.mask_norm,
                       fusion=o.fusion, temperature=float(o.temperature), bins=o.bins)


# ------------------------------------------------------ channel selection
def select_channels(grad_mean: torch.Tensor, mu: float = 0.0) -> torch.Tensor:
    """SISE: ``(B, C)`` mean gradients -> ``(B, C)`` bool, ``a > 0`` and
    ``a >= mu * max a`` per image."""
    top = grad_mean.amax(1, keepdim=True)
    return (grad_mean > 0) & (grad_mean >= mu * top)


def adaptive_channels(grad_mean: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Ada-SISE: ``(B, C)`` mean gradients -> ``(B, C)`` bool.

    ``a / max a``; among the positive channels, those whose value is in the
    upper class of Otsu's split of their ``bins``-bin histogram on [0, 1].
    No positive channel: nothing kept.
    """
    top = grad_mean.amax(1, keepdim=True)
    norm = grad_mean / torch.where(top > 0, top, torch.ones_like(top))
    pos = (norm > 0) & (top > 0)
    split = otsu_split(histogram(norm, bins, 0.0, 1.0, weight=pos))
    return pos & (bin_index(norm, bins, 0.0, 1.0) >= split[:, None])


# ------------------------------------------------------------ the masks
def attribution_masks(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(n, h, w)`` feature maps -> ``(n, H, W)`` masks: bilinear upsampling
    (``align_corners=False``), then min-max to [0, 1] per mask (a constant
    map gives an all-zero mask). Half-precision maps give float32 masks."""
    m = F.interpolate(wide(maps)[:, None], size=tuple(size), mode="bilinear",
                      align_corners=False)[:, 0]
    return minmax(m, eps=0)


def mask_areas(masks: torch.Tensor) -> torch.Tensor:
    """``(n, H, W)`` masks -> ``(n,)`` spatial sums, accumulated in float32 at
    least (a float16 sum overflows past 65504: a 256 x 256 mask of ones)."""
    return wide(masks).flatten(1).sum(1)


def fuse(maps: torch.Tensor, valid: torch.Tensor | None = None, soft: bool = False,
         temperature: float = 100.0, bins: int = 256) -> torch.Tensor:
    """SISE's block-wise fusion of layer maps, low to high level.

    Args:
        maps: ``(L, B, H, W)`` layer maps in [0, 1] (min-max scaled).
        valid: ``(L, B)`` bool; a ``False`` layer is skipped for that image
            (no channel was kept). Default: all valid.
        soft: ``sigmoid(temperature * (V - t))`` instead of the hard Otsu mask.

    Returns:
        ``(B, H, W)``: ``E = V_1``; ``E = (E + V_b) * Bin(V_b)``; min-max.
    """
    if maps.dim() != 4:
        raise CAManimError(f"fuse needs maps of shape (L, B, H, W), got {tuple(maps.shape)}")
    if maps.numel() and (maps.min() < 0 or maps.max() > 1 + 1e-6):
        raise CAManimError("fuse needs layer maps min-max scaled to [0, 1]; got values in "
                           f"[{float(maps.min()):.3g}, {float(maps.max()):.3g}]")
    n_layers, b = maps.shape[:2]
    if valid is None:
        valid = torch.ones((n_layers, b), dtype=torch.bool, device=maps.device)
    fused = torch.zeros_like(maps[0])
    started = torch.zeros(b, dtype=torch.bool, device=maps.device)
    for v, ok in zip(maps, valid.to(maps.device), strict=False):
        step = (fused + v) * otsu_binarize(v, bins, 0.0, 1.0, soft=soft, temperature=temperature)
        nxt = torch.where(started[:, None, None], step, v)
        fused = torch.where(ok[:, None, None], nxt, fused)
        started = started | ok
    return minmax(fused)


# ------------------------------------------------------------- targets
class SoftmaxTarget:
    """Score = softmax probability of ``category`` (``(K,)`` output row -> scalar)."""

    def __init__(self, category: int) -> None:
        self.category = int(category)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return torch.softmax(output, dim=-1)[..., self.category]


def score_targets(callables: Sequence[Target], idx: torch.Tensor | None,
                  score: str) -> list[Target]:
    """The per-image score SISE differentiates and scores masks with."""
    if idx is None:
        return list(callables)
    make = SoftmaxTarget if score == "softmax" else logit_target
    return [make(int(c)) for c in idx]


def _scorer(tgts: list[Target], idx: torch.Tensor | None, score: str
            ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(outputs (n, K), image index (n,)) -> (n,)`` scores, batched."""
    if idx is None:
        return lambda out, ii: score_outputs([tgts[i] for i in ii.tolist()], out)

    def fn(out: torch.Tensor, ii: torch.Tensor) -> torch.Tensor:
        val = torch.softmax(out, dim=-1) if score == "softmax" else out
        cls = idx.to(out.device)[ii]
        return val[torch.arange(len(ii), device=out.device), cls]
    return fn


# ------------------------------------------------------------ the method
def sise_maps(model: nn.Module, x: torch.Tensor, layers: Sequence[LayerInfo], targets: Any,
              opts: SISEOptions, batch_size: int = 32,
              reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
              progress: bool = False) -> ExplanationMaps:
    """SISE / Ada-SISE on checked images ``x`` ``(B, C, H, W)`` for ``layers``.

    Returns:
        `ExplanationMaps` with L+1 frames: every layer's ``V_l`` ``(B, H, W)``
        at input size, then ``"fused"``. ``extra``: ``n_masks`` (masked
        forwards per layer over the batch; fused: total),
        ``n_masks_per_image``, ``n_channels`` (fused: total) and ``channels``
        (per layer, per image: the kept channel indices; fused: ``None``).
    """
    with torch.inference_mode(False):  # also callable where Lightning validates
        return _sise_maps(model, x, layers, targets, opts, batch_size, reshape_transform,
                          progress)


def _sise_maps(model: nn.Module, x: torch.Tensor, layers: Sequence[LayerInfo], targets: Any,
               opts: SISEOptions, batch_size: int, reshape_transform: Any,
               progress: bool) -> ExplanationMaps:
    t0 = time.perf_counter()
    b, size = x.shape[0], image_size(x)
    callables, idx = clean_targets(model, x, targets)
    tgts = score_targets(callables, idx, opts.score)
    cap = capture(model, x, layers, tgts, gradients=True, reshape_transform=reshape_transform)
    assert cap.gradients is not None
    keeps = []
    for acts, grads in zip(cap.activations, cap.gradients, strict=False):
        a = wide(grads).mean(dim=(2, 3))                                 # (B, C)
        keep = adaptive_channels(a, opts.bins) if opts.adaptive else select_channels(a, opts.mu)
        flat = acts.flatten(2)
        keeps.append(keep & (flat.amax(2) > flat.amin(2)))               # drop constant maps
    n_total = int(sum(int(k.sum()) for k in keeps))
    shared = (time.perf_counter() - t0) / max(len(layers), 1)

    score = _scorer(tgts, idx, opts.score)
    name = "Ada-SISE" if opts.adaptive else "SISE"
    bar = tqdm(total=n_total, desc=name, unit="mask", leave=False, disable=not progress)
    vmaps, seconds = [], []
    with eval_mode(model), torch.no_grad():
        for acts, keep in zip(cap.activations, keeps, strict=False):
            t1 = time.perf_counter()
            num = torch.zeros((b,) + size, dtype=wide(x).dtype, device=x.device)
            den = torch.zeros_like(num) if opts.mask_norm == "pixel" else None
            jobs = keep.nonzero()                                        # (n, 2): image, channel
            for s in range(0, len(jobs), batch_size):
                ii, kk = jobs[s:s + batch_size].unbind(1)
                m = attribution_masks(acts[ii, kk].to(num.dtype), size)   # (n, H, W)
                masked = (x[ii].to(num.dtype) * m[:, None]).to(x.dtype)   # the model's dtype
                sc = score(forward_logits(model, masked), ii).to(num.dtype)
                if opts.mask_norm == "area":
                    sc = sc / (mask_areas(m) + MASK_EPS)
                num.index_add_(0, ii, sc[:, None, None] * m)
                if den is not None:
                    den.index_add_(0, ii, m)
                bar.update(len(ii))
            v = num / (den + MASK_EPS) if den is not None else num
            vmaps.append(torch.where(keep.any(1)[:, None, None], minmax(v), torch.zeros_like(v)))
            seconds.append(shared + time.perf_counter() - t1)
    bar.close()

    t2 = time.perf_counter()
    valid = torch.stack([k.any(1) for k in keeps])                       # (L, B)
    fused = fuse(torch.stack(vmaps), valid, soft=opts.fusion == "soft",
                 temperature=opts.temperature, bins=opts.bins)
    seconds.append(time.perf_counter() - t2)

    per_image = [k.sum(1).tolist() for k in keeps]
    channels = [int(a.shape[1]) for a in cap.activations]
    extra: dict[str, list[Any]] = {
        "n_masks": [int(sum(p)) for p in per_image] + [n_total],
        "n_masks_per_image": per_image + [[int(sum(c)) for c in zip(*per_image, strict=False)]],
        "n_channels": channels + [sum(channels)],
        "channels": [[row.nonzero()[:, 0].tolist() for row in k] for k in keeps] + [None],
    }
    return ExplanationMaps(
        names=[i.name for i in layers] + ["fused"],
        raw=[v.detach() for v in vmaps] + [fused.detach()],
        input_size=size, layers=list(layers) + [fusion_info(layers, b, size)],
        targets=idx, method="ada-sise" if opts.adaptive else "sise",
        seconds=seconds, extra=extra)


def fusion_info(layers: Sequence[LayerInfo], batch: int, size: tuple[int, int]) -> LayerInfo:
    """The `LayerInfo` of the fused frame (type ``SISEFusion``, no module)."""
    return LayerInfo(name="fused", module_name="", call=1,
                     order=max((i.order for i in layers), default=-1) + 1,
                     type="SISEFusion", output_shape=(batch, 1) + tuple(size),
                     params=0, params_total=0, depth=0, layout=NCHW)


# -------------------------------------------------------------- entries
def run_sise(anim: Any, x: torch.Tensor, layers: list[LayerInfo], targets: Any) -> LayerMaps:
    """`CAManim` runner for ``method="sise"``."""
    opts = sise_options(anim.options, adaptive=False)
    return sise_maps(anim.model, x, layers, targets, opts,
                     anim.batch_size, anim.reshape_transform, anim.progress)


def run_ada_sise(anim: Any, x: torch.Tensor, layers: list[LayerInfo], targets: Any) -> LayerMaps:
    """`CAManim` runner for ``method="ada-sise"``."""
    opts = sise_options(anim.options, adaptive=True)
    return sise_maps(anim.model, x, layers, targets, opts,
                     anim.batch_size, anim.reshape_transform, anim.progress)


def _standalone(model: nn.Module, images: torch.Tensor, targets: Any, layers: Selector,
                opts: SISEOptions, batch_size: int, reshape_transform: Any,
                progress: bool) -> ExplanationMaps:
    if not isinstance(model, nn.Module):
        raise CAManimError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if int(batch_size) < 1:
        raise CAManimError(f"batch_size must be >= 1, got {batch_size}")
    x = check_images(images, model)
    table = list_layers(model, x, layers, reshape_transform=reshape_transform)
    return sise_maps(model, x, table.selected, targets, opts, int(batch_size),
                     reshape_transform, progress)


def sise(model: nn.Module, images: torch.Tensor, targets: Any = None, mu: float = 0.0, *,
         layers: Selector = "blocks", score: str = "softmax", mask_norm: str = "area",
         fusion: str = "hard", temperature: float = 100.0, bins: int = 256,
         batch_size: int = 32, reshape_transform: Any = None,
         progress: bool = False) -> ExplanationMaps:
    """SISE explanation of ``images`` ``(B, C, H, W)`` (normalized as the model expects).

    Args:
        targets: ``None`` (predicted class), ints, or target callables.
        mu: channel threshold in [0, 1] relative to the largest mean gradient.
        layers: block layers by default (any camanim selector).
        score: ``"softmax"`` (default) or ``"logit"``, for gradients and masks.
        mask_norm: ``"area"`` (authors' code, default), ``"pixel"`` or ``"none"``.
        fusion: ``"hard"`` Otsu mask (default) or ``"soft"`` sigmoid.
        batch_size: masked images per forward.

    Returns:
        `ExplanationMaps`: one ``V_l`` per layer, then ``"fused"``;
        ``.final`` is the fused explanation ``(B, H, W)``.
    """
    opts = sise_options(dict(mu=mu, score=score, mask_norm=mask_norm, fusion=fusion,
                             temperature=temperature, bins=bins), adaptive=False)
    return _standalone(model, images, targets, layers, opts, batch_size, reshape_transform,
                       progress)


def ada_sise(model: nn.Module, images: torch.Tensor, targets: Any = None, *,
             layers: Selector = "blocks", score: str = "softmax", mask_norm: str = "area",
             fusion: str = "hard", temperature: float = 100.0, bins: int = 256,
             batch_size: int = 32, reshape_transform: Any = None,
             progress: bool = False) -> ExplanationMaps:
    """Ada-SISE explanation: SISE with Otsu's adaptive channel selection
    (see `sise` for the arguments; there is no ``mu``)."""
    opts = sise_options(dict(score=score, mask_norm=mask_norm, fusion=fusion,
                             temperature=temperature, bins=bins), adaptive=True)
    return _standalone(model, images, targets, layers, opts, batch_size, reshape_transform,
                       progress)


__all__ = ["ExplanationMaps", "SISEOptions", "SoftmaxTarget", "sise", "ada_sise", "sise_maps",
           "sise_options", "select_channels", "adaptive_channels", "attribution_masks",
           "mask_areas", "fuse", "run_sise", "run_ada_sise", "clean_targets",
           "SISE_OPTIONS", "ADA_SISE_OPTIONS"]
