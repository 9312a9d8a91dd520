"""Noisy linear imputation (ROAD, Rong et al. 2022) in torch, batched.

The reference, ``pytorch_grad_cam.metrics.road.NoisyLinearImputer``, fills
every removed pixel ``i`` (mask 0) of an image so that

    sum_n w_n v_n - S_i x_i = 0,    S_i = sum of the weights of the
                                    in-image neighbours of i,

over its 8 neighbours ``n`` (weight 1/6 for the 4 direct ones, 1/12 for the
diagonals), where ``v_n`` is the neighbour's unknown value or its known
pixel. It builds one sparse system per image and mask and solves it with
SuperLU. Here the same systems are solved for many masks, images and
channels at once, on any device, by conjugate gradients preconditioned with
a geometric multigrid V-cycle (Galerkin coarse operators, Jacobi
smoothing).

With ``u`` the removed-pixel indicator, the system is used in SPD form and
multiplied by 12, so that every coefficient is a small integer (exact in
any float dtype; an inexact ``1/12`` would act as a spurious mass term that
float32 rounding turns into a visible bias on large removed regions):

    A x = b,   (A x)_i = u_i (T_i x_i - sum_n k_n u_n x_n),
               b_i     = u_i  sum_n k_n (1 - u_n) img_n,

with ``k_n = 12 w_n`` (2 direct, 1 diagonal) and ``T_i = 12 S_i`` (12
inside, 8 on an edge, 5 in a corner). Rows of kept pixels are zero, ``x``
stays 0 there and the result is ``where(u, x, img)``. An image whose every
pixel is removed has no known value to interpolate from; the reference's
solver returns 0 for it, and so does this one (``b = 0`` gives ``x = 0``).

Precision (`solve_dtype`): the solution and its true residual are float64
on the CPU and float32 on accelerators (CUDA, MPS, ...): consumer GPUs run
float64 at 1/32 to 1/64 of the float32 speed and MPS has no float64 at all.
No float64 tensor is ever created on a non-CPU device (the coarsest-level
pseudo-inverse is computed on the CPU). The preconditioner always runs in
float32. A float32 solve splits the image, the right-hand side and the
solution into a part on a power-of-two grid plus a small rest (`split`), so
that the true residual of the integer system is exact up to the rounding of
the rest: without it, float32's ``eps * |x|`` rounding floors the residual
and large regions stall above the tolerance. Both paths then reach the same
accuracy, well within 1e-5 of the reference (tests).

Convergence: every system must reach its tolerance. Systems that conjugate
gradients leave unconverged after ``max_iter`` iterations are solved again
by a direct sparse solve (SciPy's SuperLU on the CPU, as the reference), or,
when too large for that, by more iterations; a system that still misses its
tolerance raises `CAManimError` (never a warning with a partial result).

Layout: every vector lives on a zero-padded grid flattened to one axis,
``(N, C, Hp * Wp)``, so that a neighbour is a constant offset and every
stencil term is one contiguous, vectorized op (no padding copies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CAManimError

# (dy, dx) of the 3x3 neighbourhood in row-major order; index 4 is the pixel.
OFFSETS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
CENTER = 4
# Neighbour weights, as the reference's ``neighbors_weights``.
NEIGHBOUR_WEIGHTS = ((1 / 12, 1 / 6, 1 / 12),
                     (1 / 6, 0.0, 1 / 6),
                     (1 / 12, 1 / 6, 1 / 12))
# 12 x the weights: the integer coefficients of the scaled system.
NEIGHBOUR_WEIGHTS_12 = ((1.0, 2.0, 1.0),
                        (2.0, 0.0, 2.0),
                        (1.0, 2.0, 1.0))
# The solver stops when the multigrid estimate of every system's error,
# max |M^-1 r|, is below TOL * max(1, max |image|). Measured on 40 224x224
# ROAD masks of ResNet-50 GradCAM maps and a standard-normal image (max
# |pixel| ~4.5), the largest pixel difference to the reference's direct
# solve is then 3.6e-6 (TOL 1e-6 gave 6.8e-6; the contract is 1e-5, and
# the reference itself rounds its solution to float32).
TOL = 5e-7
MAX_ITER = 100
# Systems with at most this many unknown pixels that conjugate gradients
# leaves unconverged get a direct sparse solve on the CPU (a 224x224 mask
# has at most 50176; SuperLU needs well under a second and ~100 MB there).
DIRECT_MAX_UNKNOWNS = 1_000_000
# Larger ones get this many times max_iter more iterations instead.
MORE_ITER_FACTOR = 10
REPLACE = 1e-3  # recompute the true residual after this error reduction
_COARSEST_POINTS = 100   # coarsen until a level has at most this many points
# On CPU the solver is memory-bound: chunks of a few 224x224 masks run
# fastest (measured: 4-8 masks per chunk beat 16-32 by 20-40%); on CUDA a
# quarter of the free memory bounds the chunk.
_WORK_BYTES_CPU = 48 * 2 ** 20
_WORK_BYTES_OTHER = 512 * 2 ** 20   # MPS and other devices without a free-memory query


def solve_dtype(device: torch.device | str) -> torch.dtype:
    """dtype of the solution and its true residual on ``device``.

    float64 on the CPU (cheap there; keeps the solve far below the 1e-5
    contract), float32 on any other device (MPS has no float64; consumer
    GPUs run it 32-64x slower). `impute`'s ``dtype=`` overrides it, e.g. to
    test the float32 path on the CPU.
    """
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype in which imputed images and noise are accumulated for inputs of
    ``dtype``: float32 for half precision (bf16's step of 2^-6 at |x| >= 2
    would round the default ROAD noise of 0.01 away), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def neighbour_kernel(dtype: torch.dtype, device: torch.device | str, scaled: bool = False
                     ) -> torch.Tensor:
    """The ``(1, 1, 3, 3)`` neighbour-weight kernel (``scaled``: times 12)."""
    w = NEIGHBOUR_WEIGHTS_12 if scaled else NEIGHBOUR_WEIGHTS
    return torch.tensor(w, dtype=dtype, device=device)[None, None]


def quantum(scale: torch.Tensor) -> torch.Tensor:
    """Power of two ``q`` with ``scale <= 2^18 q`` (``scale >= 1``)."""
    return torch.exp2(torch.ceil(torch.log2(scale)) - 18)


def split(v: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``v = hi + lo`` exactly, ``hi`` a multiple of the power of two ``q``
    (broadcast), ``|lo| <= q / 2``.

    float32 keeps 24 bits: integer-weighted sums of such ``hi`` below
    ``2^24 q`` are exact, so the residual of the integer system is free of
    the ``eps * |x|`` rounding that otherwise floors float32 accuracy (the
    imputed values never exceed the image's range, maximum principle).
    """
    hi = torch.round(v / q) * q
    return hi, v - hi


# ------------------------------------------------------------------- grids

@dataclass(frozen=True)
class Grid:
    """An ``h x w`` grid stored zero-padded as ``hp x wp`` (flattened).

    ``hp = 2 hc + 1`` where ``hc = h // 2 + 1`` is the coarse size, so that
    restriction and prolongation are stride-2 slices of the padded array
    (one extra zero row/column when ``h``/``w`` is even).
    """

    h: int
    w: int

    @property
    def coarse(self) -> "Grid":
        # Vertex-centred: coarse point I sits on fine point 2I; for even
        # sizes the last coarse point lies just outside, so that every fine
        # point has two interpolation neighbours.
        return Grid(self.h // 2 + 1, self.w // 2 + 1)

    @property
    def hp(self) -> int:
        return 2 * (self.h // 2 + 1) + 1

    @property
    def wp(self) -> int:
        return 2 * (self.w // 2 + 1) + 1

    @property
    def numel(self) -> int:
        return self.hp * self.wp

    @property
    def span(self) -> tuple[int, int]:
        """Flat ``[start, end)`` covering every interior point."""
        return self.wp + 1, self.h * self.wp + self.w + 1

    def offset(self, k: int) -> int:
        dy, dx = OFFSETS[k]
        return dy * self.wp + dx

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., h, w) -> (..., hp * wp)`` zero-padded, flattened."""
        y = F.pad(x, (1, self.wp - self.w - 1, 1, self.hp - self.h - 1))
        return y.reshape(x.shape[:-2] + (self.numel,))

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., hp * wp) -> (..., h, w)`` view of the interior."""
        return x.reshape(x.shape[:-1] + (self.hp, self.wp))[..., 1:self.h + 1, 1:self.w + 1]


def _shifted(x: torch.Tensor, grid: Grid, k: int) -> torch.Tensor:
    s, e = grid.span
    o = grid.offset(k)
    return x[..., s + o:e + o]


# --------------------------------------------------------------- operators

def apply_stencil(coef: torch.Tensor, x: torch.Tensor, grid: Grid,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``y_i = sum_k coef[:, k, i] * x[i + OFFSETS[k]]`` on a padded grid.

    Args:
        coef: ``(N, 9, hp*wp)`` stencils, zero on the padding.
        x: ``(N, C, hp*wp)``, zero on the padding.
        out: optional ``(N, C, hp*wp)`` buffer with zero padding.

    Returns:
        ``(N, C, hp*wp)``, zero on the padding.
    """
    y = torch.zeros_like(x) if out is None else out
    s, e = grid.span
    ys = y[..., s:e]
    torch.mul(coef[:, CENTER:CENTER + 1, s:e], x[..., s:e], out=ys)
    for k in range(9):
        if k != CENTER:
            ys.addcmul_(coef[:, k:k + 1, s:e], _shifted(x, grid, k))
    return y


class FineOperator:
    """The reference's system for removed-pixel masks (times 12), matrix-free.

    ``A x = u * ((T + 4) x - (k121 x k121) x)`` for ``x`` that is zero on
    kept pixels: the integer neighbour kernel is the separable ``[1,2,1]^T
    [1,2,1]`` minus its center 4, so one application is 4 shifted adds
    instead of 8, with integer coefficients only.
    """

    def __init__(self, unknown: torch.Tensor, grid: Grid) -> None:
        """``unknown``: ``(N, 1, h, w)`` float (1 = imputed pixel)."""
        self.grid = grid
        dtype, dev = unknown.dtype, unknown.device
        ones = torch.ones((1, 1, grid.h, grid.w), dtype=dtype, device=dev)
        t = F.conv2d(ones, neighbour_kernel(dtype, dev, scaled=True), padding=1)  # 12 S: 5, 8, 12
        self.u = grid.pad(unknown)                       # (N, 1, P)
        self.s = grid.pad(t)                             # (1, 1, P)
        self.diag = grid.pad(t + 4)                      # (1, 1, P)
        self._t: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def to(self, dtype: torch.dtype) -> "FineOperator":
        op = FineOperator.__new__(FineOperator)
        op.grid, op._t, op._v = self.grid, None, None
        op.u, op.s, op.diag = self.u.to(dtype), self.s.to(dtype), self.diag.to(dtype)
        return op

    @property
    def active(self) -> torch.Tensor:
        return self.u

    def inv_diag(self) -> torch.Tensor:
        """``(N, 1, P)``: ``u / T`` (the Jacobi weights), 0 on padding."""
        return self.u / torch.where(self.s > 0, self.s, 1.0)

    def neighbour_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``sum_n k_n x_n + 4 x`` on the interior span: ``(N, C, e - s)``."""
        g = self.grid
        p = g.numel
        s, e = g.span
        if self._t is None or self._t.shape != x.shape or self._t.dtype != x.dtype:
            self._t = torch.empty_like(x)
            self._v = torch.empty(x.shape[:-1] + (e - s,), dtype=x.dtype, device=x.device)
        t, v = self._t, self._v
        # horizontal [1, 2, 1] on [1, P-1), then vertical [1, 2, 1] on the span
        th = t[..., 1:p - 1]
        torch.add(x[..., 0:p - 2], x[..., 2:p], out=th)
        th.add_(x[..., 1:p - 1], alpha=2.0)
        torch.add(t[..., s - g.wp:e - g.wp], t[..., s + g.wp:e + g.wp], out=v)
        return v.add_(t[..., s:e], alpha=2.0)

    def apply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``A x`` for ``x`` of shape ``(N, C, P)`` that is zero where kept."""
        s, e = self.grid.span
        y = torch.zeros_like(x) if out is None else out
        ys = y[..., s:e]
        torch.mul(x[..., s:e], self.diag[..., s:e], out=ys)   # 0 where kept, as x
        ys.addcmul_(self.u[..., s:e], self.neighbour_sum(x), value=-1.0)
        return y

    def residual(self, b: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``b - A x`` into ``out`` (``out`` may not alias ``x``)."""
        s, e = self.grid.span
        os_ = out[..., s:e]
        torch.addcmul(b[..., s:e], x[..., s:e], self.diag[..., s:e], value=-1.0, out=os_)
        os_.addcmul_(self.u[..., s:e], self.neighbour_sum(x))
        return out

    def residual_split(self, b_hi: torch.Tensor, b_lo: torch.Tensor, q: torch.Tensor,
                       x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``b - A x`` with ``b = b_hi + b_lo``, accurate to rounding of the
        result (not of ``|b|``) in float32 (see `split`).

        ``b_hi`` and ``x_hi`` are multiples of the power of two ``q`` (``(N,
        1, 1)``) below ``2^19 q``: with integer coefficients, ``b_hi - A
        x_hi`` is exact in float32, and only the small low parts round.
        """
        x_hi, x_lo = split(x, q)
        self.residual(b_hi, x_hi, out=out)
        return out.add_(self.residual(b_lo, x_lo, out=torch.zeros_like(out)))

    def rhs(self, images: torch.Tensor) -> torch.Tensor:
        """``b = u * sum_n k_n (1 - u_n) img_n`` for padded ``(N, C, P)`` images."""
        known = images * (1 - self.u)
        b = torch.zeros_like(images)
        s, e = self.grid.span
        # the kept image is zero where u = 1, so the center term drops out
        torch.mul(self.neighbour_sum(known), self.u[..., s:e], out=b[..., s:e])
        return b

    def coef(self) -> torch.Tensor:
        """``(N, 9, P)`` explicit stencil (coarsest solve of tiny grids, tests)."""
        g = self.grid
        w = NEIGHBOUR_WEIGHTS_12[0] + NEIGHBOUR_WEIGHTS_12[1] + NEIGHBOUR_WEIGHTS_12[2]
        s, e = g.span
        c = torch.zeros((self.u.shape[0], 9, g.numel), dtype=self.u.dtype, device=self.u.device)
        for k in range(9):
            if k == CENTER:
                c[:, k, s:e] = (self.u[..., s:e] * self.s[..., s:e])[:, 0]
            else:
                c[:, k, s:e] = (self.u[..., s:e] * _shifted(self.u, g, k) * (-w[k]))[:, 0]
        return c


class StencilOperator:
    """A 9-point operator given by per-point coefficients (coarse levels)."""

    def __init__(self, coef: torch.Tensor, grid: Grid) -> None:
        """``coef``: ``(N, 9, P)``, zero on the padding and on inactive rows."""
        self.coef, self.grid = coef, grid

    @property
    def active(self) -> torch.Tensor:
        return (self.coef[:, CENTER:CENTER + 1] > 0).to(self.coef.dtype)

    def inv_diag(self) -> torch.Tensor:
        """``1 / d`` with ``d = max(a_ii, sum_j |a_ij| / 2)``, 0 where inactive.

        Plain Jacobi (``d = a_ii``) is the optimal smoother for the fine
        stencil; the l1 bound keeps it convergent on Galerkin levels, whose
        off-diagonals can outweigh the diagonal, so the V-cycle stays SPD.
        """
        diag = self.coef[:, CENTER:CENTER + 1]
        d = torch.maximum(diag, self.coef.abs().sum(1, keepdim=True) / 2)
        return torch.where(diag > 0, 1.0 / torch.where(diag > 0, d, 1.0), 0.0)

    def apply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return apply_stencil(self.coef, x, self.grid, out=out)

    def residual(self, b: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``b - A x`` into ``out`` (``out`` may not alias ``x``)."""
        s, e = self.grid.span
        os_ = out[..., s:e]
        c = self.coef
        torch.addcmul(b[..., s:e], c[:, CENTER:CENTER + 1, s:e], x[..., s:e], value=-1.0, out=os_)
        for k in range(9):
            if k != CENTER:
                os_.addcmul_(c[:, k:k + 1, s:e], _shifted(x, self.grid, k), value=-1.0)
        return out


# ---------------------------------------------------------------- multigrid
# Vertex-centred bilinear interpolation on padded grids: coarse point I sits
# on padded fine row 2I + 1; padded rows 2I + 2 lie halfway between I, I + 1.

def restrict(x: torch.Tensor, fine: Grid, out: torch.Tensor | None = None) -> torch.Tensor:
    """Full weighting, the adjoint of `prolong_add`: ``(N, C, P) -> (N, C, hc, wc)``.

    ``x`` must be zero on the padding. ``out`` may be a strided view."""
    hc, wc = fine.coarse.h, fine.coarse.w
    x2 = x.view(x.shape[:-1] + (fine.hp, fine.wp))
    t = torch.add(x2[..., 0:2 * wc - 1:2], x2[..., 2:2 * wc + 1:2])
    t.add_(x2[..., 1:2 * wc:2], alpha=2.0)                      # 2 x horizontal
    c = torch.add(t[..., 0:2 * hc - 1:2, :], t[..., 2:2 * hc + 1:2, :])
    c.add_(t[..., 1:2 * hc:2, :], alpha=2.0)                    # 4 x full weighting
    if out is None:
        return c.mul_(0.25)
    return torch.mul(c, 0.25, out=out)


def prolong_add(x: torch.Tensor, xc: torch.Tensor, active: torch.Tensor, fine: Grid) -> torch.Tensor:
    """``x += active * P xc``: bilinear interpolation of ``(N, C, hc, wc)``
    onto the padded fine grid ``(N, C, P)``, masked by ``(N, 1, P)``."""
    hc, wc = xc.shape[-2], xc.shape[-1]
    x2 = x.view(x.shape[:-1] + (fine.hp, fine.wp))
    a2 = active.view(active.shape[:-1] + (fine.hp, fine.wp))
    horiz = torch.add(xc[..., :, :-1], xc[..., :, 1:]).mul_(0.5)      # (hc, wc-1)
    vert = torch.add(xc[..., :-1, :], xc[..., 1:, :]).mul_(0.5)       # (hc-1, wc)
    diag = torch.add(horiz[..., :-1, :], horiz[..., 1:, :]).mul_(0.5)  # (hc-1, wc-1)
    odd_r, even_r = slice(1, 2 * hc, 2), slice(2, 2 * hc - 1, 2)
    odd_c, even_c = slice(1, 2 * wc, 2), slice(2, 2 * wc - 1, 2)
    for rows, cols, val in ((odd_r, odd_c, xc), (odd_r, even_c, horiz),
                            (even_r, odd_c, vert), (even_r, even_c, diag)):
        x2[..., rows, cols].addcmul_(a2[..., rows, cols], val)
    return x


def _colors(grid: Grid, device: torch.device) -> torch.Tensor:
    """``(h, w)`` long: color ``3 (I mod 3) + (J mod 3)`` of every point."""
    i = torch.arange(grid.h, device=device) % 3
    j = torch.arange(grid.w, device=device) % 3
    return 3 * i[:, None] + j[None, :]


def galerkin(op: "FineOperator | StencilOperator", active: torch.Tensor) -> StencilOperator:
    """Coarse operator ``P^T A P`` of a 9-point operator, by probing.

    With bilinear ``P`` the coarse operator is again 9-point. Applying it to
    the 9 indicator vectors of a 3x3 coloring of the coarse grid gives, at
    each point, its coefficient towards its one neighbour of each color.

    Args:
        op: fine operator (zero columns where inactive).
        active: ``(N, 1, P)`` its active rows.
    """
    fine = op.grid
    coarse = fine.coarse
    n, dtype, dev = active.shape[0], active.dtype, active.device
    colors = _colors(coarse, dev)
    probes = (colors[None] == torch.arange(9, device=dev)[:, None, None]).to(dtype)
    fine_probes = torch.zeros((n, 9, fine.numel), dtype=dtype, device=dev)
    prolong_add(fine_probes, probes[None].expand(n, -1, -1, -1), active, fine)
    y = restrict(op.apply(fine_probes), fine)                        # (N, 9, hc, wc)
    cp = F.pad(colors, (1, 1, 1, 1))
    idx = torch.stack([cp[1 + dy:1 + dy + coarse.h, 1 + dx:1 + dx + coarse.w] for dy, dx in OFFSETS])
    coef = y.gather(1, idx[None].expand(n, -1, -1, -1))
    # a neighbour outside the grid has no coefficient (its probe is 0 anyway)
    inside = F.pad(torch.ones((1, 1, coarse.h, coarse.w), dtype=dtype, device=dev), (1, 1, 1, 1))
    valid = torch.cat([inside[..., 1 + dy:1 + dy + coarse.h, 1 + dx:1 + dx + coarse.w]
                       for dy, dx in OFFSETS], dim=1)
    return StencilOperator(coarse.pad(coef * valid).contiguous(), coarse)


def _dense(coef: torch.Tensor) -> torch.Tensor:
    """``(N, n, n)`` dense matrix of ``(N, 9, h, w)`` stencils; inactive
    points (zero diagonal) get a unit diagonal."""
    n, _, h, w = coef.shape
    dev = coef.device
    a = torch.zeros(n, h * w, h * w, dtype=coef.dtype, device=dev)
    ii, jj = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    for k, (dy, dx) in enumerate(OFFSETS):
        ok = (ii + dy >= 0) & (ii + dy < h) & (jj + dx >= 0) & (jj + dx < w)
        a[:, (ii * w + jj)[ok], ((ii + dy) * w + (jj + dx))[ok]] = coef[:, k][:, ok]
    diag = a.diagonal(dim1=1, dim2=2)
    diag.add_((diag == 0).to(coef.dtype))
    return a


def _pinv(a: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse of ``(N, n, n)`` symmetric PSD matrices, computed on
    the CPU in float64 (no float64 on accelerators; MPS has none), returned
    on ``a``'s device in ``a``'s dtype.

    Galerkin operators can be singular (two coarse points whose
    interpolation touches the same single removed pixel); the systems are
    still consistent and any solution gives the same masked correction.
    """
    lam, vec = torch.linalg.eigh(a.detach().cpu().double())
    cut = lam.amax(-1, keepdim=True) * (a.shape[-1] * 1e-12)
    inv = torch.where(lam > cut, 1.0 / torch.where(lam > cut, lam, 1.0), 0.0)
    return ((vec * inv[:, None, :]) @ vec.transpose(1, 2)).to(device=a.device, dtype=a.dtype)


class _Level:
    """One multigrid level: operator, smoother weights, work buffers."""

    def __init__(self, op: "FineOperator | StencilOperator") -> None:
        self.op = op
        self.grid: Grid = op.grid
        self.active = op.active
        self.inv_d = op.inv_diag()
        self.x: torch.Tensor | None = None
        self.r: torch.Tensor | None = None
        self.b: torch.Tensor | None = None   # rhs buffer (filled by the finer level)

    def buffers(self, like: torch.Tensor) -> None:
        shape = (like.shape[0], like.shape[1], self.grid.numel)
        if self.x is None or self.x.shape != shape:
            self.x = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.r = torch.zeros_like(self.x)
            self.b = torch.zeros_like(self.x)


class Multigrid:
    """Symmetric geometric multigrid V(1,1)-cycle for N masked operators.

    One Jacobi sweep before and after the coarse correction, restriction =
    prolongation transposed, exact (pseudo-inverse) coarsest solve: a
    symmetric positive definite preconditioner for conjugate gradients.
    Runs in ``dtype`` (float32: half the memory traffic of float64; the
    outer conjugate gradients recompute the true residual in the solution's
    dtype, so this does not limit the accuracy).
    """

    def __init__(self, fine: FineOperator, dtype: torch.dtype = torch.float32) -> None:
        op: FineOperator | StencilOperator = fine.to(dtype)
        self.levels: list[_Level] = []
        while op.grid.h * op.grid.w > _COARSEST_POINTS and min(op.grid.h, op.grid.w) > 3:
            level = _Level(op)
            self.levels.append(level)
            op = galerkin(op, level.active)
        self.coarsest = _Level(op)
        coef = op.coef if isinstance(op, StencilOperator) else op.coef()
        coef = op.grid.unpad(coef).contiguous()
        self.pinv = _pinv(_dense(coef))
        self.dtype = dtype
        self._out: torch.Tensor | None = None

    def _vcycle(self, level: int, b: torch.Tensor | None = None) -> torch.Tensor:
        """Solve approximately for the rhs ``b`` (default: the level's ``b``
        buffer, filled by the finer level); returns the level's ``x`` buffer."""
        if level == len(self.levels):
            lv = self.coarsest
            g = lv.grid
            n, c, _ = lv.x.shape
            b = lv.b if b is None else b
            sol = torch.bmm(g.unpad(b).reshape(n, c, -1), self.pinv)  # pinv is symmetric
            g.unpad(lv.x).copy_(sol.view(n, c, g.h, g.w))
            return lv.x
        lv = self.levels[level]
        x, r, b = lv.x, lv.r, (lv.b if b is None else b)
        torch.mul(b, lv.inv_d, out=x)
        lv.op.residual(b, x, out=r)
        nxt = self.levels[level + 1] if level + 1 < len(self.levels) else self.coarsest
        restrict(r, lv.grid, out=nxt.grid.unpad(nxt.b))
        ec = self._vcycle(level + 1)
        prolong_add(x, nxt.grid.unpad(ec), lv.active, lv.grid)
        lv.op.residual(b, x, out=r)
        return x.addcmul_(lv.inv_d, r)

    @property
    def fine(self) -> "FineOperator | StencilOperator":
        """The finest operator, in the multigrid's dtype."""
        return self.levels[0].op if self.levels else self.coarsest.op

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        """``M^-1 r`` for padded ``(N, C, P)`` ``r`` in the multigrid's dtype;
        the result is a buffer that the next call overwrites."""
        for lv in self.levels + [self.coarsest]:
            lv.buffers(r)
        return self._vcycle(0, r)


# ----------------------------------------------------------------- solvers

def _dot(a: torch.Tensor, b: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """Per-system dot product of ``(N, C, P)`` tensors: ``(N, C, 1)``.

    ``work`` holds the product: a fresh temporary of this size costs more
    (page faults) than the product itself."""
    return torch.mul(a, b, out=work).sum(-1, keepdim=True)


def solve_pcg(op: FineOperator, b: torch.Tensor, tol: float | torch.Tensor,
              max_iter: int = MAX_ITER, precond: Multigrid | None = None,
              residual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Multigrid-preconditioned conjugate gradients for ``A x = b``.

    Mixed precision: the iteration runs in the preconditioner's dtype
    (float32: half the memory traffic); whenever the error estimate has
    dropped ``1 / REPLACE``-fold since the last time, the steps are added to
    the solution (``b``'s dtype) and the residual is recomputed from it
    ("reliable updates"). Convergence is only declared on a true residual,
    so the drift of the recursive float32 residual cannot fake it.

    Args:
        op: the operator A in ``b``'s dtype.
        b: ``(N, C, P)`` padded right-hand sides (zero where kept).
        tol: absolute accuracy target, one number or an ``(N, 1, 1)``
            tensor (one per system): system n has converged when its error
            estimate ``max |M^-1 r|`` is at most ``tol[n]`` in every channel.
        max_iter: iteration cap.
        residual: ``residual(x, out)`` writes the true ``b - A x`` into
            ``out`` (default ``op.residual(b, x, out)``; float32 solves pass
            the split, exact form).

    Returns:
        (solution ``(N, C, P)`` in ``b``'s dtype, ``(N,)`` bool converged,
        iterations used). Unconverged systems are the caller's to handle.
    """
    mg = precond if precond is not None else Multigrid(op)
    if residual is None:
        def residual(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            return op.residual(b, x, out=out)
    low = mg.fine
    n = b.shape[0]
    tiny = torch.finfo(mg.dtype).tiny
    tol_t = torch.as_tensor(tol, dtype=torch.float32, device=b.device)
    inv_tol = 1.0 / tol_t.reshape(-1, 1, 1).clamp_min(tiny)           # (N or 1, 1, 1)
    x = torch.zeros_like(b)                         # solution, b's dtype
    dx = torch.zeros_like(b, dtype=mg.dtype)        # steps since the last true residual
    r = b.to(mg.dtype, copy=True)                   # never an alias of b
    r_true = torch.zeros_like(b)                    # outputs only write the interior span
    ap = torch.zeros_like(r)
    work = torch.empty_like(r)

    def rel_error(z: torch.Tensor) -> torch.Tensor:
        """``(N, C, 1)`` error estimate over tolerance (converged: <= 1)."""
        return torch.abs(z, out=work).amax(-1, keepdim=True).float() * inv_tol

    z = mg(r)
    e = rel_error(z)
    last_true = e.clone()
    fresh = torch.ones_like(e, dtype=torch.bool)   # r is the true residual of x
    done = torch.zeros_like(fresh)
    p = z.clone()
    rz = _dot(r, z, work)
    it = 0
    # Every decision is taken per (system, channel) row, so that a row's
    # iterates do not depend on the rows solved with it (the result does not
    # depend on chunking, i.e. on free memory). A row is done once a TRUE
    # residual meets its tolerance; a recursive one that seems to is
    # replaced by the true one after the next step, and checked again.
    while it < max_iter:
        done |= fresh & (e <= 1.0)
        if bool(done.all()):
            break
        it += 1
        low.apply(p, out=ap)
        # done rows, converged systems (p = 0, r^T z = 0) and rounding
        # (p^T A p <= 0) take no step instead of dividing by 0
        pap = _dot(p, ap, work)
        alpha = rz / pap.clamp_min(tiny) * ((pap > 0) & ~done)
        dx.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1.0)
        replace = ~done & ((e < REPLACE * last_true) | (e <= 1.0))
        if bool(replace.any()):
            x.add_(dx * replace)
            dx.mul_(~replace)
            r_new = residual(x, r_true).to(mg.dtype)
            r.copy_(torch.where(replace, r_new, r))
        fresh = replace
        z = mg(r)
        e = rel_error(z)
        last_true = torch.where(replace, e, last_true)
        rz_new = _dot(r, z, work)
        beta = rz_new / rz.clamp_min(tiny) * (rz > 0)
        torch.addcmul(z, beta, p, out=p)
        rz = rz_new
    done |= fresh & (e <= 1.0)
    if not bool(done.all()):
        x.add_(dx)
        dx.zero_()
        e = torch.where(done, e, rel_error(mg(residual(x, r_true).to(mg.dtype))))
    converged = (e <= 1.0).reshape(n, -1).all(1)      # NaN counts as unconverged
    return x, converged, it


def masks_per_solve(channels: int, h: int, w: int, device: torch.device | str,
                    dtype: torch.dtype | None = None) -> int:
    """Masks `impute` solves together for ``(C, h, w)`` images on ``device``:
    bounded by a working-memory budget (CUDA: a quarter of the memory that
    is free or cached by torch; CPU: a small, cache-friendly budget)."""
    device = torch.device(device)
    grid = Grid(h, w)
    size = torch.finfo(dtype or solve_dtype(device)).bits // 8
    # solution dtype: x, b, true residual, image; float32: ~10 vectors, 9 coarse coefs
    per_mask = grid.numel * (size * channels * 4 + 4 * channels * 10 + 4 * 9)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = free // 4
    elif device.type == "cpu":
        budget = _WORK_BYTES_CPU
    else:
        budget = _WORK_BYTES_OTHER
    return max(1, budget // max(per_mask, 1))


def impute(images: torch.Tensor, keep: torch.Tensor, noise: float = 0.0,
           generator: torch.Generator | None = None, tol: float = TOL,
           max_iter: int = MAX_ITER, chunk: int | None = None,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Noisy linear imputation of many images and masks at once.

    Args:
        images: ``(N, C, H, W)`` float images, one per mask (an expanded
            view of fewer images is fine).
        keep: ``(N, H, W)`` bool or float; True / 1 keeps the pixel, False / 0
            imputes it (the reference's binary-mask convention).
        noise: standard deviation of Gaussian noise added to every imputed
            pixel (the reference's ``noise``); 0 adds none and draws nothing.
            It is added in float32 or better (`work_dtype`) before the
            result is cast to the images' dtype.
        generator: source of the noise, a `torch.Generator` on the images'
            device (the global RNG is never used; ``None`` with ``noise > 0``
            is an error).
        tol: accuracy target of the solve, relative to ``max(1, max|img|)``
            of each image.
        max_iter: iterations of conjugate gradients before a system falls
            back to a direct solve.
        chunk: masks solved together (default: `masks_per_solve`).
        dtype: dtype of the solution, float32 or float64 (default:
            `solve_dtype` of the device: float64 on the CPU only).

    Returns:
        ``(N, C, H, W)`` in the images' dtype: kept pixels unchanged,
        imputed ones filled (plus noise).

    Raises:
        CAManimError: bad shapes, or a system that no solver path brought
            to its tolerance.
    """
    if images.dim() != 4 or keep.dim() != 3 or tuple(keep.shape) != (images.shape[0],) + tuple(images.shape[2:]):
        raise CAManimError(f"impute needs images (N, C, H, W) and keep (N, H, W) with the same "
                           f"N, H, W; got {tuple(images.shape)} and {tuple(keep.shape)}")
    if noise and generator is None:
        raise CAManimError("impute with noise > 0 needs a torch.Generator (generator=...); "
                           "the global RNG is never used")
    sdt = solve_dtype(images.device) if dtype is None else dtype
    if sdt not in (torch.float32, torch.float64):
        raise CAManimError(f"impute's dtype must be torch.float32 or torch.float64, got {sdt}")
    if sdt == torch.float64 and images.device.type != "cpu":
        raise CAManimError(f"a float64 solve runs on the CPU only (got images on "
                           f"{images.device}); leave dtype=None for float32 there")
    n, c, h, w = images.shape
    grid = Grid(h, w)
    unknown = (keep < 0.5) if keep.is_floating_point() else ~keep.bool()
    out = torch.empty(images.shape, dtype=work_dtype(images.dtype), device=images.device)
    step = chunk or masks_per_solve(c, h, w, images.device, sdt)
    for i in range(0, n, step):
        img = images[i:i + step].to(sdt)
        u = unknown[i:i + step, None].to(sdt)
        out[i:i + step] = _solve_chunk(img, u, grid, tol, max_iter)
    if noise:
        out = add_noise(out, keep, noise, generator)
    return out.to(images.dtype)


def add_noise(filled: torch.Tensor, keep: torch.Tensor, noise: float,
              generator: torch.Generator | None) -> torch.Tensor:
    """``filled + noise * N(0, 1)`` on the imputed pixels (a new tensor).

    As the reference, one standard normal draw per imputed pixel and channel
    (drawn for all pixels, in one call of shape ``filled.shape``, so the
    stream depends only on the shape), from ``generator``, never the global
    RNG. Half-precision ``filled`` is computed in float32 and cast back
    once; pass float32 images and cast the sum yourself to keep the noise
    unrounded until the end (as `camanim.metrics.road.ybroad` does).

    Args:
        filled: ``(N, C, H, W)`` imputed images.
        keep: ``(N, H, W)`` mask, True / 1 where the pixel was kept.
        noise: standard deviation.
        generator: a `torch.Generator` on ``filled``'s device.
    """
    if generator is None:
        raise CAManimError("noise > 0 needs a torch.Generator (generator=torch.Generator"
                           "(device).manual_seed(seed)); the global RNG is never used")
    wd = work_dtype(filled.dtype)
    unknown = (keep < 0.5) if keep.is_floating_point() else ~keep.bool()
    eps = torch.randn(filled.shape, generator=generator, dtype=wd, device=filled.device)
    out = torch.addcmul(filled.to(wd), unknown[:, None].to(wd), eps, value=float(noise))
    return out.to(filled.dtype)


def _solve_chunk(img: torch.Tensor, u: torch.Tensor, grid: Grid, tol: float,
                 max_iter: int) -> torch.Tensor:
    """Solve one chunk: ``(n, C, H, W)`` images and ``(n, 1, H, W)`` masks,
    both in the solution dtype; unconverged systems go to `_fallback`."""
    if not bool(u.any()):
        return img
    scale = img.abs().amax(dim=(1, 2, 3)).float().clamp_min(1.0)
    tol_n = (tol * scale).reshape(-1, 1, 1)
    x, ok = _pcg_system(img, u, grid, scale, tol_n, max_iter)
    out = torch.where(u.bool(), grid.unpad(x), img)
    if not bool(ok.all()):
        bad = torch.nonzero(~ok).flatten()
        out[bad] = _fallback(img[bad], u[bad], grid, scale[bad], tol_n[bad], max_iter)
    return out


def _pcg_system(img: torch.Tensor, u: torch.Tensor, grid: Grid, scale: torch.Tensor,
                tol_n: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Set up and solve the systems of ``img`` / ``u``; float32 uses the
    split rhs and residual (`split`). Returns (padded x, converged)."""
    op = FineOperator(u, grid)
    if img.dtype == torch.float64:
        x, ok, _ = solve_pcg(op, op.rhs(grid.pad(img)), tol_n, max_iter=max_iter)
        return x, ok
    q = quantum(scale).to(img.dtype).reshape(-1, 1, 1)
    img_hi, img_lo = split(img, q[..., None])
    b_hi, b_lo = op.rhs(grid.pad(img_hi)), op.rhs(grid.pad(img_lo))
    b = b_hi + b_lo
    x, ok, _ = solve_pcg(op, b, tol_n, max_iter=max_iter,
                         residual=lambda x, out: op.residual_split(b_hi, b_lo, q, x, out))
    return x, ok


def _fallback(img: torch.Tensor, u: torch.Tensor, grid: Grid, scale: torch.Tensor,
              tol_n: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Systems conjugate gradients left unconverged: a direct sparse solve on
    the CPU (float64, SciPy's SuperLU, as the reference) up to
    `DIRECT_MAX_UNKNOWNS` unknowns, else ``MORE_ITER_FACTOR * max_iter``
    more iterations; `CAManimError` if that still misses the tolerance.
    Returns the ``(n, C, H, W)`` filled images in ``img``'s dtype and device."""
    out = img.clone()
    counts = u.flatten(1).sum(1).tolist()
    small = [i for i, k in enumerate(counts) if k <= DIRECT_MAX_UNKNOWNS]
    large = [i for i, k in enumerate(counts) if k > DIRECT_MAX_UNKNOWNS]
    for i in small:
        sol = direct_solve(img[i].detach().cpu().double().numpy(), u[i, 0].detach().cpu().numpy() > 0.5)
        out[i] = torch.from_numpy(sol).to(device=img.device, dtype=img.dtype)
    if large:
        idx = torch.tensor(large, device=img.device)
        x, ok = _pcg_system(img[idx], u[idx], grid, scale[idx], tol_n[idx],
                            MORE_ITER_FACTOR * max_iter)
        if not bool(ok.all()):
            raise CAManimError(
                f"imputation: the linear solve of {int((~ok).sum())} mask(s) of "
                f"{grid.h}x{grid.w} pixels did not reach its tolerance after "
                f"{(MORE_ITER_FACTOR + 1) * max_iter} iterations; pass a larger tol= (or max_iter=) "
                "to impute, or smaller images")
        out[idx] = torch.where(u[idx].bool(), grid.unpad(x), img[idx])
    return out


def direct_solve(img: np.ndarray, unknown: np.ndarray) -> np.ndarray:
    """The reference's system for one image, solved directly (SuperLU).

    Args:
        img: ``(C, H, W)`` float64 image.
        unknown: ``(H, W)`` bool, True where the pixel is imputed.

    Returns:
        ``(C, H, W)`` float64: ``img`` with the unknown pixels filled.

    Raises:
        CAManimError: the solution is not finite or its residual is not at
            rounding level (a singular system: cannot happen for a mask
            that keeps at least one pixel).
    """
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    c, h, w = img.shape
    flat_u = unknown.reshape(-1)
    idx = np.flatnonzero(flat_u)
    m = idx.size
    out = img.astype(np.float64, copy=True)
    if m == 0:
        return out
    if m == h * w:              # nothing to interpolate from: the reference gives 0
        out[:] = 0.0
        return out
    var = np.full(h * w, -1, dtype=np.int64)
    var[idx] = np.arange(m)
    ii, jj = np.divmod(idx, w)
    flat_img = img.reshape(c, -1)
    rows, cols, vals = [np.arange(m)], [np.arange(m)], []
    diag = np.zeros(m)
    b = np.zeros((m, c))
    for (dy, dx) in OFFSETS:
        k = NEIGHBOUR_WEIGHTS_12[dy + 1][dx + 1]
        if k == 0:
            continue
        ni, nj = ii + dy, jj + dx
        inside = (ni >= 0) & (ni < h) & (nj >= 0) & (nj < w)
        diag += k * inside
        nflat = np.where(inside, ni * w + nj, 0)
        unk = inside & flat_u[nflat]
        rows.append(np.flatnonzero(unk))
        cols.append(var[nflat[unk]])
        vals.append(np.full(int(unk.sum()), -k))
        kn = inside & ~flat_u[nflat]
        b[kn] += k * flat_img[:, nflat[kn]].T
    a = csc_matrix((np.concatenate([diag] + vals), (np.concatenate(rows), np.concatenate(cols))),
                   shape=(m, m))
    x = np.asarray(spsolve(a, b)).reshape(m, c)
    resid = np.abs(a @ x - b).max() if m else 0.0
    scale = 12 * max(1.0, float(np.abs(img).max()))
    if not np.isfinite(x).all() or not resid <= 1e-9 * scale:
        raise CAManimError(
            f"imputation: the direct solve of a {h}x{w} mask with {m} removed pixels failed "
            f"(residual {resid:.1e}); a mask must keep at least one pixel next to every "
            "removed region")
    out.reshape(c, -1)[:, idx] = x.T
    return out
