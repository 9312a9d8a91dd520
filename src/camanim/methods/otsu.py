"""Otsu's threshold in torch, batched over rows, on a fixed-range histogram.

Used twice by the SISE family:

* SISE fusion: ``Bin(V_b)``, the Otsu binarization of a layer map in [0, 1];
* Ada-SISE: the adaptive cut on the normalized mean gradients of the
  positive channels (in (0, 1]).

Values are put in ``bins`` equal bins on ``[lo, hi]`` (bin ``i`` holds
``lo + i * width <= x < lo + (i + 1) * width``; the top edge belongs to the
last bin). A split ``j`` puts bins ``0 .. j-1`` in the lower class and
``j .. bins-1`` in the upper one; Otsu picks the ``j`` that maximizes the
between-class variance ``w0 * w1 * (mu0 - mu1) ** 2`` (first one on ties).
Binarizing compares bin indices, so a value is "above" exactly when its bin
is in the upper class, never off by the rounding of a threshold.
"""

from __future__ import annotations

import torch

from ..core.maps import exact_dtype
from ..errors import CAManimError

# Counts and sums are float64 on the CPU and float32 on accelerators (MPS
# has no float64; counts stay exact in float32 up to 2**24 per bin).


def _check(bins: int, lo: float, hi: float) -> None:
    if int(bins) < 2:
        raise CAManimError(f"Otsu needs at least 2 histogram bins, got bins={bins}")
    if not hi > lo:
        raise CAManimError(f"Otsu histogram range must have hi > lo, got [{lo}, {hi}]")


def bin_index(x: torch.Tensor, bins: int = 256, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Bin of every value (same shape as ``x``, int64), clamped to ``[0, bins-1]``."""
    idx = torch.floor((x.to(exact_dtype(x.device)) - lo) * (bins / (hi - lo)))
    return idx.clamp_(0, bins - 1).long()


def histogram(x: torch.Tensor, bins: int = 256, lo: float = 0.0, hi: float = 1.0,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row counts: ``x`` ``(N, P)`` -> ``(N, bins)`` (float64 on the CPU).

    ``weight`` ``(N, P)`` (0/1) leaves values out of their row's histogram
    (Ada-SISE counts only the positive channels).
    """
    _check(bins, lo, hi)
    x = x.reshape(x.shape[0], -1)
    acc = exact_dtype(x.device)
    w = torch.ones_like(x, dtype=acc) if weight is None else weight.reshape(x.shape).to(acc)
    hist = torch.zeros((x.shape[0], int(bins)), dtype=acc, device=x.device)
    return hist.scatter_add_(1, bin_index(x, bins, lo, hi), w)


def otsu_split(hist: torch.Tensor) -> torch.Tensor:
    """Otsu split of histograms ``(..., bins)`` -> ``(...,)`` int64 in ``[1, bins-1]``:
    the first bin of the upper class.

    A split with an empty class has variance 0; a histogram with one occupied
    bin (or none) gets split 1.
    """
    h = hist.to(exact_dtype(hist.device))
    c = torch.arange(h.shape[-1], dtype=h.dtype, device=h.device)
    w0 = h.cumsum(-1)[..., :-1]                     # lower class: bins < j, j = 1..bins-1
    s0 = (h * c).cumsum(-1)[..., :-1]
    w1 = h.sum(-1, keepdim=True) - w0
    s1 = (h * c).sum(-1, keepdim=True) - s0
    ok = (w0 > 0) & (w1 > 0)
    mu0 = s0 / torch.where(ok, w0, torch.ones_like(w0))
    mu1 = s1 / torch.where(ok, w1, torch.ones_like(w1))
    var = torch.where(ok, w0 * w1 * (mu0 - mu1) ** 2, torch.zeros_like(w0))
    return var.argmax(-1) + 1


def otsu_threshold(x: torch.Tensor, bins: int = 256, lo: float = 0.0, hi: float = 1.0,
                   weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Otsu threshold of each row of ``x`` ``(N, P)``.

    Returns:
        ``(threshold (N,), split (N,))``: ``threshold = lo + split * width`` is
        the lower edge of the upper class (in ``x``'s units and dtype).
    """
    split = otsu_split(histogram(x, bins, lo, hi, weight))
    thr = lo + split.to(x.dtype) * ((hi - lo) / bins)
    return thr, split


def otsu_binarize(x: torch.Tensor, bins: int = 256, lo: float = 0.0, hi: float = 1.0,
                  soft: bool = False, temperature: float = 100.0) -> torch.Tensor:
    """Otsu binarization of each image ``x`` ``(N, H, W)`` (or ``(N, P)``).

    Hard (default): 1 where the value's bin is in the upper class, else 0.
    Soft (SISE authors' code): ``sigmoid(temperature * (x - t))`` with ``t``
    the Otsu threshold of that row.
    """
    thr, split = otsu_threshold(x.reshape(x.shape[0], -1), bins, lo, hi)
    view = (-1,) + (1,) * (x.dim() - 1)
    if soft:
        return torch.sigmoid(temperature * (x - thr.view(view)))
    return (bin_index(x, bins, lo, hi) >= split.view(view)).to(x.dtype)


__all__ = ["bin_index", "histogram", "otsu_split", "otsu_threshold", "otsu_binarize"]
