"""Map convergence over training, ranking stability, chance baselines.

* `map_change`: how much each layer's map changed between two callback
  epochs, ``1 - Spearman`` of the upsampled maps.
* `settle_epochs`: the first epoch from which a layer's change stays below a
  threshold (the layer's "settle epoch").
* `kendall_tau`: stability of the per-layer ybROAD ranking between epochs.
* `chance_maps` / `chance_road`: ROAD of maps that know nothing about the
  image (a seeded random map, a centred Gaussian blob), the zero line the
  layers' ybROAD should clear.

Why rank correlation of upsampled maps: maps are compared on the H x W
input grid that ROAD perturbs, so a 7 x 7 layer and a 56 x 56 layer are
measured on the same pixels and the value does not depend on the layer's
own resolution. Only the ordering of pixels counts, which is all ROAD uses
(it thresholds maps at percentiles): rescaling a map, or any monotone
change of its values (raw magnitudes grow and shrink as the weights
train; "local" and "global" normalization differ by one), leaves the
measure unchanged. Ties are common (ReLU zeros, flat regions of a bilinear
upsample) and get average ranks, as ``scipy.stats.spearmanr`` does, so the
value does not depend on the order of tied pixels in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core.maps import LayerMaps, exact_dtype
from ..errors import CAManimError

if TYPE_CHECKING:
    from .road import FoldCache

CHANCE_NAMES = ("random", "blob")
DEFAULT_SETTLE_THRESHOLD = 0.1   # a Spearman correlation of 0.9 with the previous epoch's map


# ------------------------------------------------------------------ ranks

def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension, ties given their average rank.

    Args:
        x: ``(N, n)`` tensor.

    Returns:
        ``(N, n)`` ranks 1..n (float64 on the CPU, float32 elsewhere) (ties
        share the mean of their ranks, as ``scipy.stats.rankdata(method="average")``).
    """
    n_rows, n = x.shape
    s, order = x.sort(dim=1)
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    group = first.flatten().cumsum(0) - 1          # a new group starts every row too
    acc = exact_dtype(x.device)                  # float64 on the CPU only (MPS has none)
    pos = torch.arange(n, device=x.device, dtype=acc).repeat(n_rows)
    count = torch.bincount(group).to(acc)
    total = torch.bincount(group, weights=pos)
    ranked = (total / count + 1)[group].reshape(n_rows, n)
    return torch.empty_like(ranked).scatter_(1, order, ranked)


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of matching rows of ``(N, n)`` float64 tensors;
    NaN where a row is constant."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    den = (a.square().sum(1) * b.square().sum(1)).sqrt()
    r = (a * b).sum(1) / den
    return torch.where(den > 0, r.clamp(-1.0, 1.0), torch.full_like(r, float("nan")))


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of matching rows.

    Args:
        a, b: ``(N, n)`` tensors (each row a flattened map).

    Returns:
        ``(N,)`` float64; NaN where either row is constant (the correlation
        is undefined: a constant map orders no pixel before another).
    """
    acc = exact_dtype(a.device)
    return pearson_rows(average_ranks(a.to(acc)), average_ranks(b.to(acc)))


def _as_maps(x: Any, what: str) -> torch.Tensor:
    """``(L, B, H, W)`` float tensor from a tensor, an array or `LayerMaps`."""
    if isinstance(x, LayerMaps):
        x = x.upsample("local")
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise CAManimError(f"{what} must be an (L, B, H, W) tensor of upsampled maps or a "
                           f"camanim.LayerMaps, got {type(x).__name__}")
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise CAManimError(f"{what} must have shape (L, B, H, W) (or (B, H, W) for one layer), "
                           f"got {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise CAManimError(f"{what} must hold real numbers, got {x.dtype}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise CAManimError(f"{what} contains NaN or inf: pass finite maps")
    out: torch.Tensor = x.detach()
    return out


def rank_maps(maps: Any) -> torch.Tensor:
    """Average ranks of every map's pixels, to keep for the next epoch.

    `map_change` ranks both epochs' maps; a caller comparing each epoch
    with the previous one can rank every epoch once with this and compare
    with `rank_change`.

    Args:
        maps: ``(L, B, H, W)`` upsampled maps (tensor, array or `LayerMaps`).

    Returns:
        ``(L, B, H * W)`` float32 ranks (exact: ranks and half ranks up to
        2^23 pixels are whole float32 numbers).
    """
    m = _as_maps(maps, "maps")
    n_layers, b = m.shape[:2]
    if m.shape[2] * m.shape[3] > 2 ** 23:
        raise CAManimError(f"maps of {m.shape[2]}x{m.shape[3]} pixels are too large to rank in "
                           "float32; downsample them first")
    out = torch.empty((n_layers, b, m.shape[2] * m.shape[3]), dtype=torch.float32, device=m.device)
    for i in range(n_layers):                       # one layer at a time: memory stays flat
        out[i] = average_ranks(m[i].reshape(b, -1)).float()
    return out


def rank_change(prev_ranks: torch.Tensor, cur_ranks: torch.Tensor) -> np.ndarray:
    """``1 - Spearman`` from two `rank_maps` results: ``(L, B)`` float64."""
    if not isinstance(prev_ranks, torch.Tensor) or not isinstance(cur_ranks, torch.Tensor) \
            or prev_ranks.dim() != 3 or prev_ranks.shape != cur_ranks.shape:
        raise CAManimError("prev_ranks and cur_ranks must be (L, B, H*W) tensors of the same shape "
                           "from rank_maps: compare the same layers, images and input size")
    out = np.empty(tuple(prev_ranks.shape[:2]), dtype=np.float64)
    for i in range(prev_ranks.shape[0]):
        r = pearson_rows(prev_ranks[i].double(), cur_ranks[i].to(prev_ranks.device).double())
        out[i] = (1.0 - r).cpu().numpy()
    return out


def map_change(prev: Any, cur: Any) -> np.ndarray:
    """How much every layer's map changed: ``1 - Spearman``.

    Args:
        prev, cur: ``(L, B, H, W)`` upsampled maps of the same layers and
            images at two callback epochs (tensors, arrays, or `LayerMaps`,
            which are upsampled with "local" normalization).

    Returns:
        ``(L, B)`` float64 in [0, 2]: 0 for maps ordering the pixels alike,
        about 1 for unrelated maps, 2 for reversed ones. NaN where either
        map is constant (no pixel ordering to compare, e.g. an all-zero map
        after ReLU).
    """
    p, c = _as_maps(prev, "prev"), _as_maps(cur, "cur")
    if p.shape != c.shape:
        raise CAManimError(f"prev and cur must have the same shape (L, B, H, W), got "
                           f"{tuple(p.shape)} and {tuple(c.shape)}: compare the same layers, "
                           "images and input size")
    return rank_change(rank_maps(p), rank_maps(c))


# ------------------------------------------------------------ settle epoch

def settle_epochs(changes: Any, epochs: Sequence[int] | None = None,
                  threshold: float = DEFAULT_SETTLE_THRESHOLD) -> list[int | None]:
    """Each layer's settle epoch.

    ``changes[e, l]`` is layer l's `map_change` from the previous callback
    epoch to ``epochs[e]`` (averaged over probes/images by the caller). The
    settle epoch is the first ``epochs[e]`` from which every later change
    is ``< threshold``. A NaN change (no previous epoch, or a constant map)
    does not count as below.

    Args:
        changes: ``(E, L)`` array.
        epochs: the E epoch numbers (default ``0..E-1``).
        threshold: change below which a map counts as settled (default 0.1,
            a Spearman correlation of 0.9).

    Returns:
        L entries: the settle epoch, or ``None`` where the last change is
        not below the threshold (the layer has not settled).
    """
    ch = np.asarray(changes, dtype=np.float64)
    if ch.ndim == 1:
        ch = ch[:, None]
    if ch.ndim != 2:
        raise CAManimError(f"changes must be an (epochs, layers) array, got shape {ch.shape}")
    ep = list(range(ch.shape[0])) if epochs is None else [int(e) for e in epochs]
    if len(ep) != ch.shape[0]:
        raise CAManimError(f"epochs has {len(ep)} entries but changes has {ch.shape[0]} rows "
                           "(one row per callback epoch)")
    _check_threshold(threshold)
    below = np.nan_to_num(ch, nan=np.inf) < float(threshold)
    out: list[int | None] = []
    for col in below.T:
        if not col.size or not col[-1]:
            out.append(None)
            continue
        bad = np.flatnonzero(~col)
        out.append(ep[int(bad[-1]) + 1] if bad.size else ep[0])
    return out


def share_below(changes: Any, threshold: float = DEFAULT_SETTLE_THRESHOLD) -> float:
    """Share of layers (entries of ``changes``, NaN ignored) with a change
    below ``threshold``; NaN when no entry is defined."""
    _check_threshold(threshold)
    ch = np.asarray(changes, dtype=np.float64).ravel()
    ch = ch[~np.isnan(ch)]
    return float((ch < float(threshold)).mean()) if ch.size else float("nan")


def _check_threshold(threshold: Any) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (Real, np.number)) \
            or not math.isfinite(float(threshold)):
        raise CAManimError(
            f"threshold must be a finite number (a map change, 0..2), got {threshold!r}"
        )


# ------------------------------------------------------------ Kendall tau

def kendall_tau(a: Any, b: Any) -> float:
    """Kendall's tau-b between two per-layer score vectors.

    Equals ``scipy.stats.kendalltau(a, b)`` (variant "b", which corrects
    for ties). Pairs where either value is NaN are dropped first.

    Args:
        a, b: L scores each (e.g. per-layer ybROAD at two epochs).

    Returns:
        tau in [-1, 1]; NaN with fewer than 2 complete pairs or when either
        vector is constant.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise CAManimError(
            f"kendall_tau needs two vectors of the same length, got {x.size} and {y.size}"
        )
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if x.size < 2:
        return float("nan")
    iu = np.triu_indices(x.size, k=1)
    sx = np.sign(x[:, None] - x[None, :])[iu]
    sy = np.sign(y[:, None] - y[None, :])[iu]
    den = math.sqrt(float(np.abs(sx).sum()) * float(np.abs(sy).sum()))
    if den == 0:
        return float("nan")
    return float(np.clip((sx * sy).sum() / den, -1.0, 1.0))


# ------------------------------------------------------------ chance maps

def chance_maps(shape: Sequence[int], seed: int = 0, cells: int | None = 7,
                blob_sigma: float = 0.25, device: torch.device | str = "cpu") -> torch.Tensor:
    """Maps that know nothing about the image: the chance baseline of ROAD.

    Args:
        shape: ``(B, H, W)``.
        seed: seed of the random maps (a private generator; the global RNG
            is not touched). The same seed gives the same maps.
        cells: the random map is uniform noise on a ``cells x cells`` grid,
            bilinearly upsampled: as smooth as the CAM of a 7 x 7 layer
            (a ResNet's last block at 224 x 224), so ROAD removes regions
            as it does for real maps. ``None``: independent noise per pixel.
        blob_sigma: standard deviation of the Gaussian blob as a fraction of
            the image height (rows) and width (columns).

    Returns:
        ``(2, B, H, W)`` float32 maps in [0, 1]: ``[0]`` a different random
        map per image, ``[1]`` the same centred Gaussian blob for every
        image (the "the object is in the middle" prior).
    """
    if len(tuple(shape)) != 3 or any(
        isinstance(s, bool) or not isinstance(s, (Integral, np.integer)) or s < 1 for s in shape
    ):
        raise CAManimError(f"shape must be (B, H, W) positive ints, got {tuple(shape)!r}")
    if isinstance(seed, bool) or not isinstance(seed, (Integral, np.integer)):
        raise CAManimError(f"seed must be an int, got {seed!r}")
    if cells is not None and (
        isinstance(cells, bool) or not isinstance(cells, (Integral, np.integer)) or cells < 1
    ):
        raise CAManimError(f"cells must be None or an int >= 1, got {cells!r}")
    if isinstance(blob_sigma, bool) or not isinstance(blob_sigma, (Real, np.number)) \
            or not float(blob_sigma) > 0 or not math.isfinite(float(blob_sigma)):
        raise CAManimError(f"blob_sigma must be a number > 0 (a fraction of the image size), "
                           f"got {blob_sigma!r}")
    b, h, w = (int(s) for s in shape)
    gen = torch.Generator().manual_seed(int(seed))
    if cells is None:
        rand = torch.rand((b, h, w), generator=gen)
    else:
        grid = torch.rand((b, 1, int(cells), int(cells)), generator=gen)
        rand = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear",
                                               align_corners=False)[:, 0]
    rand = (rand - rand.amin((1, 2), keepdim=True)) / \
        (rand.amax((1, 2), keepdim=True) - rand.amin((1, 2), keepdim=True)).clamp_min(1e-12)
    yy = (torch.arange(h, dtype=torch.float64) - (h - 1) / 2) / (float(blob_sigma) * h)
    xx = (torch.arange(w, dtype=torch.float64) - (w - 1) / 2) / (float(blob_sigma) * w)
    blob = torch.exp(-0.5 * (yy[:, None] ** 2 + xx[None, :] ** 2)).float()
    return torch.stack([rand, blob.expand(b, h, w)]).to(device)


def _chance_layer_maps(maps: torch.Tensor, targets: Any) -> LayerMaps:
    """Wrap ``(2, B, H, W)`` chance maps as a two-"layer" `LayerMaps`."""
    from ..core.layers import LayerInfo

    b, h, w = (int(s) for s in maps.shape[1:])
    infos = [LayerInfo(name=f"chance:{n}", module_name="", call=1, order=i, type="Chance",
                       output_shape=(b, 1, h, w), params=0, params_total=0, depth=0,
                       layout="nchw") for i, n in enumerate(CHANCE_NAMES)]
    tgt = None
    if isinstance(targets, torch.Tensor) and targets.dim() == 1 and not targets.is_floating_point():
        tgt = targets
    return LayerMaps(names=list(CHANCE_NAMES), raw=list(maps), input_size=(h, w), layers=infos,
                     targets=tgt, method="chance")


def chance_road(model: torch.nn.Module, images: torch.Tensor, targets: Any = None,
                percentiles: Sequence[float] | None = None, noise: float = 0.01, seed: int = 0,
                *, map_seed: int | None = None, cells: int | None = 7, blob_sigma: float = 0.25,
                batch_size: int | None = None, score: str = "softmax", trials: int = 1,
                progress: bool = False, logits: torch.Tensor | None = None,
                fold: bool | FoldCache = True) -> Any:
    """ROAD of the two chance maps (`chance_maps`), scored like the layers.

    Call it with the same targets, percentiles, noise, seed and score as
    the layers' `camanim.metrics.road.ybroad`, so the only difference is the map.
    The maps go through ybROAD as a `LayerMaps` of two "layers" named
    ``random`` and ``blob`` (normalized "local" like every layer).

    Args:
        model, images: as for ``ybroad``; images ``(B, C, H, W)``.
        targets: the classes the layers' maps explain (pass ``maps.targets``
            so that the baseline scores the same class); ``None`` = predicted.
        percentiles: default ``camanim.metrics.road.DEFAULT_PERCENTILES``.
        noise, seed, batch_size, score, trials, progress, logits, fold: as
            for ``ybroad`` (pass the layers' ``maps.logits`` to spare a clean
            forward, and their `FoldCache` to spare a second fold).
        map_seed: seed of the random map (default ``seed``).
        cells, blob_sigma: see `chance_maps`.

    Returns:
        `camanim.metrics.road.YbRoad` with ``scores`` of shape ``(2, B)``: row 0 the
        random map, row 1 the blob.
    """
    from ..core.guard import eval_mode
    from .road import DEFAULT_PERCENTILES, ybroad

    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise CAManimError(
            "images must be a (B, C, H, W) tensor (the images the layers' maps explain)"
        )
    b, _, h, w = images.shape
    if targets is None:                     # the predicted class, as the docstring says
        if logits is None:
            with eval_mode(model), torch.no_grad():
                logits = model(images)
        targets = torch.as_tensor(logits).detach().argmax(-1).cpu()
    maps = chance_maps((b, h, w), seed if map_seed is None else map_seed, cells=cells,
                       blob_sigma=blob_sigma)
    lm = _chance_layer_maps(maps, targets)
    return ybroad(model, images, lm, targets=targets,
                  percentiles=DEFAULT_PERCENTILES if percentiles is None else percentiles,
                  noise=noise, seed=seed, batch_size=batch_size, score=score, trials=trials,
                  progress=progress, logits=logits, fold=fold)


__all__ = [
    "CHANCE_NAMES",
    "DEFAULT_SETTLE_THRESHOLD",
    "average_ranks",
    "chance_maps",
    "chance_road",
    "kendall_tau",
    "map_change",
    "pearson_rows",
    "rank_change",
    "rank_maps",
    "settle_epochs",
    "share_below",
    "spearman",
]
