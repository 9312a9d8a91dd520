"""The linear algebra of ROAD's imputation: the padded-grid layout, the
integer stencil operator, Galerkin coarse operators, a geometric multigrid
V-cycle and preconditioned conjugate gradients, batched over many systems.
The equations and the precision policy are explained in
`camanim.metrics.imputation`.
"""


from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# (dy, dx) of the 3x3 neighbourhood in row-major order; index 4 is the pixel.
OFFSETS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
CENTER = 4
# 12 x the reference's ``neighbors_weights`` (1/6 direct, 1/12 diagonal):
# the integer coefficients of the scaled system.
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
REPLACE = 1e-3  # recompute the true residual after this error reduction
_COARSEST_POINTS = 100   # coarsen until a level has at most this many points
# On CPU the solver is memory-bound: chunks of a few 224x224 masks run
# fastest (measured: 4-8 masks per chunk beat 16-32 by 20-40%); on CUDA a
# quarter of the free memory bounds the chunk.
WORK_BYTES_CPU = 48 * 2 ** 20
WORK_BYTES_OTHER = 512 * 2 ** 20   # MPS and other devices without a free-memory query


def neighbour_kernel(dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The ``(1, 1, 3, 3)`` neighbour-weight kernel, times 12."""
    return torch.tensor(NEIGHBOUR_WEIGHTS_12, dtype=dtype, device=device)[None, None]


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
    def coarse(self) -> Grid:
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
        t = F.conv2d(ones, neighbour_kernel(dtype, dev), padding=1)  # 12 S: 5, 8, 12
        self.u = grid.pad(unknown)                       # (N, 1, P)
        self.s = grid.pad(t)                             # (1, 1, P)
        self.diag = grid.pad(t + 4)                      # (1, 1, P)
        self._t: torch.Tensor = torch.empty(0)   # work buffers, sized at first use
        self._v: torch.Tensor = torch.empty(0)

    def to(self, dtype: torch.dtype) -> FineOperator:
        op = FineOperator.__new__(FineOperator)
        op.grid, op._t, op._v = self.grid, torch.empty(0), torch.empty(0)
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
        if self._t.shape != x.shape or self._t.dtype != x.dtype:
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


def prolong_add(
    x: torch.Tensor, xc: torch.Tensor, active: torch.Tensor, fine: Grid
) -> torch.Tensor:
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


def galerkin(op: FineOperator | StencilOperator, active: torch.Tensor) -> StencilOperator:
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
    idx = torch.stack(
        [cp[1 + dy : 1 + dy + coarse.h, 1 + dx : 1 + dx + coarse.w] for dy, dx in OFFSETS]
    )
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


def pinv(a: torch.Tensor) -> torch.Tensor:
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
    out: torch.Tensor = (vec * inv[:, None, :]) @ vec.transpose(1, 2)
    return out.to(device=a.device, dtype=a.dtype)


class _Level:
    """One multigrid level: operator, smoother weights, work buffers."""

    def __init__(self, op: FineOperator | StencilOperator) -> None:
        self.op = op
        self.grid: Grid = op.grid
        self.active = op.active
        self.inv_d = op.inv_diag()
        # work buffers, sized by `buffers` (empty until then)
        self.x: torch.Tensor = torch.empty(0)
        self.r: torch.Tensor = torch.empty(0)
        self.b: torch.Tensor = torch.empty(0)   # rhs buffer (filled by the finer level)

    def buffers(self, like: torch.Tensor) -> None:
        """Size the work buffers for a batch shaped like ``like`` ``(N, C, ...)``."""
        shape = (like.shape[0], like.shape[1], self.grid.numel)
        if self.x.shape != shape:
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
        self.pinv = pinv(_dense(coef))
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
    def fine(self) -> FineOperator | StencilOperator:
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
              max_iter: int = MAX_ITER,
              residual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
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
        (solution ``(N, C, P)`` in ``b``'s dtype, ``(N,)`` bool converged).
        Unconverged systems are the caller's to handle.
    """
    # Kept whole (a comment, not a split, per the 80-line rule): every line of
    # the iteration shares its state (x, dx, r, p, z, e, done, fresh), which
    # split functions would pass back and forth as a dozen arguments.
    mg = Multigrid(op)
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
    return x, converged


