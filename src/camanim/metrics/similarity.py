"""Similarity of two maps, for the model-randomization sanity check
(`camanim.metrics.sanity`): SSIM (Wang et al. 2004) and the correlation of
HOG descriptors (Dalal and Triggs 2005), both in float64."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import CAManimError

__all__ = ["SsimReference", "descriptor_corr", "hog", "hog_similarity", "ssim"]


def _gaussian_1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma * sigma))
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` filtered by the separable window ``g`` (valid
    positions only): a row pass, then a column pass, the same sums as the
    2-D ``outer(g, g)`` window at 2k instead of k*k products per pixel."""
    c = x.shape[1]
    rows = F.conv2d(x, g.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(rows, g.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class SsimReference:
    """The local means and variances of the reference maps of `ssim`,
    computed once and compared with many maps (the sanity check compares
    every step's map of a layer with the same trained-model map)."""

    def __init__(self, a: torch.Tensor, window: int = 11, sigma: float = 1.5,
                 data_range: float = 1.0) -> None:
        self.x = a.double()[:, None]
        size = min(int(window), *self.x.shape[-2:])
        size -= 1 - size % 2
        self.g = _gaussian_1d(size, sigma, self.x.dtype, self.x.device)
        self.c1, self.c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
        stats = _blur(torch.cat([self.x, self.x * self.x], 1), self.g)
        self.mx = stats[:, :1]
        self.vx = (stats[:, 1:] - self.mx * self.mx).clamp_min(0)   # rounding can dip below 0

    def to(self, device: torch.device) -> SsimReference:
        """This reference on ``device``."""
        if self.x.device != device:
            for k in ("x", "g", "mx", "vx"):
                setattr(self, k, getattr(self, k).to(device))
        return self

    def __call__(self, b: torch.Tensor) -> torch.Tensor:
        y = b.double()[:, None]
        stats = _blur(torch.cat([y, y * y, self.x * y], 1), self.g)
        my = stats[:, :1]
        vy = (stats[:, 1:2] - my * my).clamp_min(0)
        cxy = stats[:, 2:] - self.mx * my
        mx, c1, c2 = self.mx, self.c1, self.c2
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (self.vx + vy + c2))
        return s.flatten(1).mean(1)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5,
         data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity of matching maps (Wang et al. 2004).

    Gaussian-weighted local means, variances and covariance; constants
    ``(0.01 R)^2`` and ``(0.03 R)^2``; the mean of the SSIM map over the
    window positions that fit inside the image (no padding). A map smaller
    than the window uses the largest odd window that fits. The Gaussian
    window is applied as two 1-D passes (it is separable).

    Args:
        a, b: ``(N, H, W)`` maps in [0, data_range].

    Returns:
        ``(N,)`` float64 (1 for identical maps).
    """
    if a.shape != b.shape or a.dim() != 3:
        raise CAManimError(f"ssim needs two (N, H, W) tensors of the same shape, got "
                           f"{tuple(a.shape)} and {tuple(b.shape)}")
    return SsimReference(a, window, sigma, data_range)(b)


def hog(maps: torch.Tensor, cell: int = 8, bins: int = 9, block: int = 2,
        clip: float = 0.2) -> torch.Tensor:
    """Histogram-of-oriented-gradients descriptors (Dalal and Triggs 2005).

    Centred differences (one-sided at the border) give each pixel a
    gradient; its magnitude votes for the unsigned orientation (0-180
    degrees) in ``bins`` bins, split linearly between the two nearest bin
    centres; votes are summed over ``cell x cell`` pixel cells (rows and
    columns that do not fill a cell are dropped); each ``block x block``
    group of cells (stride one cell) is normalized with L2-Hys (L2, clip at
    ``clip``, L2 again). Maps smaller than ``block`` cells use smaller cells.

    Args:
        maps: ``(N, H, W)``.

    Returns:
        ``(N, D)`` float64 descriptors.
    """
    x = maps.double()
    n, h, w = x.shape
    cell = max(1, min(int(cell), h // block, w // block))
    gy = torch.zeros_like(x)
    gx = torch.zeros_like(x)
    if h > 1:
        gy[:, 1:-1] = (x[:, 2:] - x[:, :-2]) / 2
        gy[:, 0], gy[:, -1] = x[:, 1] - x[:, 0], x[:, -1] - x[:, -2]
    if w > 1:
        gx[:, :, 1:-1] = (x[:, :, 2:] - x[:, :, :-2]) / 2
        gx[:, :, 0], gx[:, :, -1] = x[:, :, 1] - x[:, :, 0], x[:, :, -1] - x[:, :, -2]
    mag = torch.sqrt(gx.square() + gy.square())
    ang = torch.remainder(torch.atan2(gy, gx), math.pi)            # [0, pi)
    pos = ang / (math.pi / bins) - 0.5                              # bin centres at integers
    lo = torch.floor(pos)
    frac = pos - lo
    lo_i = torch.remainder(lo, bins).long()
    hi_i = torch.remainder(lo + 1, bins).long()
    ch, cw = h // cell, w // cell
    # each pixel's two votes go straight into its cell's histogram: one bincount
    # over (image, cell row, cell column, bin); rows/columns past the last full cell drop out
    rows = torch.arange(h, device=x.device) // cell
    cols = torch.arange(w, device=x.device) // cell
    inside = ((rows < ch)[:, None] & (cols < cw)[None, :]).expand(n, h, w)
    cell_id = (torch.arange(n, device=x.device)[:, None, None] * ch + rows[None, :, None]) * cw \
        + cols[None, None, :]
    base = (cell_id * bins)[inside]
    idx = torch.cat([base + lo_i[inside], base + hi_i[inside]])
    wts = torch.cat([(mag * (1 - frac))[inside], (mag * frac)[inside]])
    cells = torch.bincount(idx, weights=wts, minlength=n * ch * cw * bins)
    cells = cells.to(x.dtype).reshape(n, ch, cw, bins)             # (N, ch, cw, bins)
    bh, bw = ch - block + 1, cw - block + 1
    blocks = torch.stack([cells[:, i:i + bh, j:j + bw] for i in range(block) for j in range(block)],
                         dim=3).reshape(n, bh, bw, -1)
    eps = 1e-5
    v = blocks / torch.sqrt(blocks.square().sum(-1, keepdim=True) + eps ** 2)
    v = v.clamp_max(clip)
    v = v / torch.sqrt(v.square().sum(-1, keepdim=True) + eps ** 2)
    return v.reshape(n, -1)


def hog_similarity(a: torch.Tensor, b: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Pearson correlation of the `hog` descriptors of matching ``(N, H, W)``
    maps: ``(N,)`` float64, NaN where a descriptor is constant (a flat map)."""
    return descriptor_corr(hog(a, **kwargs), hog(b, **kwargs))


def descriptor_corr(da: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of ``(N, D)`` HOG descriptors (NaN below
    a 1e-20 spread: a flat map's descriptor is zero up to rounding)."""
    da = da - da.mean(1, keepdim=True)
    db = db - db.mean(1, keepdim=True)
    den = (da.square().sum(1) * db.square().sum(1)).sqrt()
    r = (da * db).sum(1) / den
    return torch.where(den > 1e-20, r.clamp(-1, 1), torch.full_like(r, float("nan")))
