"""Noisy linear imputation (ROAD, Rong et al. 2022) in torch, batched.

The reference, ``pytorch_grad_cam.metrics.road.NoisyLinearImputer``, fills
every removed pixel ``i`` (mask 0) of an image so that

    sum_n w_n v_n - S_i x_i = 0,    S_i = sum of the weights of the
                                    in-image neighbours of i,

over its 8 neighbours ``n`` (weight 1/6 for the 4 direct ones, 1/12 for the
diagonals), where ``v_n`` is the neighbour's unknown value or its known
pixel. It builds one sparse system per image and mask and solves it with
SuperLU. Here the same system is solved for many masks, images and channels
at once with conjugate gradients preconditioned by a geometric multigrid
V-cycle (Galerkin coarse operators, Jacobi smoothing), on any device.

Written in SPD form, with ``u`` the removed-pixel indicator:

    A x = b,   (A x)_i = u_i (S_i x_i - sum_n w_n u_n x_n),
               b_i     = u_i  sum_n w_n (1 - u_n) img_n.

Rows of kept pixels are zero: ``x`` stays 0 there and the result is
``where(u, x, img)``. An image whose every pixel is removed has no known
value to interpolate; the reference's solver then returns 0 everywhere, and
so does this one (``b = 0`` gives ``x = 0``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import CAManimError

# (dy, dx) of the 3x3 neighbourhood in row-major order; index 4 is the pixel.
OFFSETS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
CENTER = 4
# Weights of the neighbours, as in the reference (``neighbors_weights``).
NEIGHBOUR_WEIGHTS = ((1 / 12, 1 / 6, 1 / 12),
                     (1 / 6, 0.0, 1 / 6),
                     (1 / 12, 1 / 6, 1 / 12))
# Solution accuracy: the solver stops when the multigrid estimate of the
# error, max |M^-1 r|, is below this (relative to the largest |pixel|).
DEFAULT_TOL = 1e-8
DEFAULT_MAX_ITER = 200
_COARSEST_POINTS = 128  # coarsen until a level has at most this many points


def neighbour_kernel(dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The ``(1, 1, 3, 3)`` neighbour-weight kernel."""
    return torch.tensor(NEIGHBOUR_WEIGHTS, dtype=dtype, device=device)[None, None]


def _shifted(xp: torch.Tensor, k: int, size: tuple[int, int]) -> torch.Tensor:
    """View of a 1-padded ``(..., h+2, w+2)`` tensor shifted by ``OFFSETS[k]``."""
    dy, dx = OFFSETS[k]
    h, w = size
    return xp[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def apply_stencil(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y_i = sum_k coef[:, k, i] * x[i + OFFSETS[k]]`` (zero outside).

    Args:
        coef: ``(N, 9, h, w)`` per-pixel stencil of N operators.
        x: ``(N, C, h, w)``: C vectors per operator.

    Returns:
        ``(N, C, h, w)``.
    """
    size = (x.shape[-2], x.shape[-1])
    xp = F.pad(x, (1, 1, 1, 1))
    y = coef[:, CENTER:CENTER + 1] * x
    for k in range(9):
        if k != CENTER:
            y.addcmul_(coef[:, k:k + 1], _shifted(xp, k, size))
    return y


def fine_stencil(unknown: torch.Tensor) -> torch.Tensor:
    """Stencil of the reference's system for removed-pixel masks.

    Args:
        unknown: ``(N, 1, H, W)`` float, 1 where a pixel is imputed.

    Returns:
        ``(N, 9, H, W)``: ``u_i S_i`` at the center, ``-w_k u_i u_n`` at the
        neighbours (zero outside the image and on kept pixels).
    """
    size = (unknown.shape[-2], unknown.shape[-1])
    ones = torch.ones((1, 1) + size, dtype=unknown.dtype, device=unknown.device)
    weights = neighbour_kernel(unknown.dtype, unknown.device)
    # S: sum of the weights of the in-image neighbours (zero padding).
    s = F.conv2d(ones, weights, padding=1)
    up = F.pad(unknown, (1, 1, 1, 1))
    flat_w = weights.reshape(9).tolist()
    parts = []
    for k in range(9):
        if k == CENTER:
            parts.append(unknown * s)
        else:
            parts.append(unknown * _shifted(up, k, size) * (-flat_w[k]))
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------- multigrid

def _coarse_size(n: int) -> int:
    # Vertex-centred: coarse point I sits on fine point 2I; for even n the
    # last coarse point lies just outside, so that every fine point has two
    # interpolation neighbours (constants are reproduced at the border).
    return n // 2 + 1


def _interp_kernel(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    k1 = torch.tensor([0.5, 1.0, 0.5], dtype=dtype, device=device)
    return torch.outer(k1, k1)[None, None]


def prolong(xc: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear interpolation ``(N, C, hc, wc) -> (N, C, h, w)``."""
    n, c, hc, wc = xc.shape
    k = _interp_kernel(xc.dtype, xc.device)
    y = F.conv_transpose2d(xc.reshape(n * c, 1, hc, wc), k, stride=2, padding=1)
    return y[:, :, :size[0], :size[1]].reshape(n, c, size[0], size[1])


def restrict(x: torch.Tensor, coarse: tuple[int, int]) -> torch.Tensor:
    """Adjoint of `prolong`: ``(N, C, h, w) -> (N, C, hc, wc)``."""
    n, c, h, w = x.shape
    k = _interp_kernel(x.dtype, x.device)
    x = F.pad(x.reshape(n * c, 1, h, w), (0, 2 * coarse[1] - 1 - w, 0, 2 * coarse[0] - 1 - h))
    return F.conv2d(x, k, stride=2, padding=1).reshape(n, c, coarse[0], coarse[1])


def _colors(size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``(h, w)`` long: color ``3 (I mod 3) + (J mod 3)`` of every point."""
    i = torch.arange(size[0], device=device) % 3
    j = torch.arange(size[1], device=device) % 3
    return (3 * i[:, None] + j[None, :])


def galerkin(coef: torch.Tensor, size: tuple[int, int], coarse: tuple[int, int]) -> torch.Tensor:
    """Coarse stencil ``P^T A P`` of a 9-point operator, by probing.

    With bilinear ``P`` the coarse operator is again 9-point. Applying it to
    the 9 indicator vectors of a 3x3 coloring of the coarse grid yields, at
    each point, its coefficient towards the one neighbour of each color.

    Args:
        coef: ``(N, 9, h, w)`` fine stencil.
        size: ``(h, w)``; coarse: ``(hc, wc)``.

    Returns:
        ``(N, 9, hc, wc)`` coarse stencil.
    """
    n = coef.shape[0]
    colors = _colors(coarse, coef.device)
    probes = (colors[None] == torch.arange(9, device=coef.device)[:, None, None])
    fine_probes = prolong(probes[None].to(coef.dtype), size).expand(n, -1, -1, -1)
    y = restrict(apply_stencil(coef, fine_probes), coarse)  # (N, 9, hc, wc)
    cp = F.pad(colors, (1, 1, 1, 1))
    idx = torch.stack([_shifted(cp, k, coarse) for k in range(9)])  # (9, hc, wc)
    out = y.gather(1, idx[None].expand(n, -1, -1, -1))
    # Neighbours outside the grid: the colour gathered there belongs to no
    # neighbour, and its probe value is 0 already; zero it explicitly anyway.
    inside = torch.zeros((1, 1) + coarse, dtype=coef.dtype, device=coef.device)
    inside = F.pad(inside + 1, (1, 1, 1, 1))
    valid = torch.cat([_shifted(inside, k, coarse) for k in range(9)], dim=1)
    return out * valid


@dataclass
class _Level:
    coef: torch.Tensor       # (N, 9, h, w) stencil; inactive rows are 0
    inv_diag: torch.Tensor   # (N, 1, h, w) 1/diagonal, 0 where inactive
    size: tuple[int, int]


@dataclass
class _Coarsest:
    pinv: torch.Tensor       # (N, n, n) pseudo-inverse of the dense matrix
    size: tuple[int, int]


def _dense(coef: torch.Tensor) -> torch.Tensor:
    """``(N, n, n)`` dense matrix of an ``(N, 9, h, w)`` stencil; inactive
    points (zero diagonal) get a unit diagonal so the matrix is SPD."""
    n, _, h, w = coef.shape
    dev = coef.device
    a = torch.zeros(n, h * w, h * w, dtype=coef.dtype, device=dev)
    ii, jj = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    for k, (dy, dx) in enumerate(OFFSETS):
        ok = (ii + dy >= 0) & (ii + dy < h) & (jj + dx >= 0) & (jj + dx < w)
        rows = (ii * w + jj)[ok]
        cols = ((ii + dy) * w + (jj + dx))[ok]
        a[:, rows, cols] = coef[:, k][:, ok]
    diag = a.diagonal(dim1=1, dim2=2)
    diag.add_((diag == 0).to(coef.dtype))
    return a


def _pinv(a: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse of ``(N, n, n)`` symmetric PSD matrices.

    Galerkin operators can be singular: two coarse points whose
    interpolation touches the same single removed pixel have dependent
    columns. The systems are still consistent and any solution gives the
    same (masked) correction, so the pseudo-inverse is the right solve.
    """
    lam, vec = torch.linalg.eigh(a)
    cut = lam.amax(-1, keepdim=True) * (a.shape[-1] * torch.finfo(a.dtype).eps * 10)
    inv = torch.where(lam > cut, 1.0 / torch.where(lam > cut, lam, 1.0), 0.0)
    return (vec * inv[:, None, :]) @ vec.transpose(1, 2)


class Multigrid:
    """Geometric multigrid V-cycle for N masked 9-point operators.

    Symmetric (same number of damped-Jacobi sweeps before and after the
    coarse correction, restriction = prolongation transposed, exact coarsest
    solve), so it is a valid preconditioner for conjugate gradients.
    """

    def __init__(self, coef: torch.Tensor, sweeps: int = 2, omega: float = 0.9) -> None:
        self.sweeps = sweeps
        self.omega = omega
        self.levels: list[_Level] = []
        size = (coef.shape[-2], coef.shape[-1])
        while size[0] * size[1] > _COARSEST_POINTS and min(size) > 3:
            diag = coef[:, CENTER:CENTER + 1]
            inv = torch.where(diag > 0, 1.0 / torch.where(diag > 0, diag, 1.0), 0.0)
            self.levels.append(_Level(coef, inv, size))
            coarse = (_coarse_size(size[0]), _coarse_size(size[1]))
            coef = galerkin(coef, size, coarse)
            size = coarse
        self.coarsest = _Coarsest(_pinv(_dense(coef)), size)

    def _solve_coarsest(self, b: torch.Tensor) -> torch.Tensor:
        n, c, h, w = b.shape
        x = torch.bmm(b.reshape(n, c, h * w), self.coarsest.pinv)  # pinv is symmetric
        return x.reshape(n, c, h, w)

    def vcycle(self, b: torch.Tensor, level: int = 0) -> torch.Tensor:
        """Approximate ``A^-1 b`` for ``b`` of shape ``(N, C, h, w)``."""
        if level == len(self.levels):
            return self._solve_coarsest(b)
        lv = self.levels[level]
        om_inv = lv.inv_diag * self.omega
        x = om_inv * b
        for _ in range(self.sweeps - 1):
            x.addcmul_(om_inv, b - apply_stencil(lv.coef, x))
        r = b - apply_stencil(lv.coef, x)
        coarse = self.levels[level + 1].size if level + 1 < len(self.levels) else self.coarsest.size
        ec = self.vcycle(restrict(r, coarse), level + 1)
        x.addcmul_((lv.inv_diag > 0).to(x.dtype), prolong(ec, lv.size))
        for _ in range(self.sweeps):
            x.addcmul_(om_inv, b - apply_stencil(lv.coef, x))
        return x


# ----------------------------------------------------------------- solvers

def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=(-2, -1), keepdim=True)


def solve_pcg(coef: torch.Tensor, b: torch.Tensor, x0: torch.Tensor | None = None,
              tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
              precond: Multigrid | None = None) -> tuple[torch.Tensor, int]:
    """Multigrid-preconditioned conjugate gradients for ``A x = b``.

    Args:
        coef: ``(N, 9, h, w)`` SPD stencil (zero rows where inactive).
        b: ``(N, C, h, w)`` right-hand sides (zero where inactive).
        x0: initial guess or ``None`` for zero.
        tol: stop when every system's error estimate ``max |M^-1 r|`` is
            below ``tol * max |b|``-scaled units (absolute, see `impute`).
        max_iter: iteration cap (a warning is issued if it is hit).

    Returns:
        (solution ``(N, C, h, w)``, iterations used).
    """
    mg = precond if precond is not None else Multigrid(coef)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply_stencil(coef, x) if x0 is not None else b.clone()
    z = mg.vcycle(r)
    p = z.clone()
    rz = _dot(r, z)
    it = 0
    for it in range(1, max_iter + 1):
        if float(z.abs().amax()) <= tol:
            return x, it - 1
        ap = apply_stencil(coef, p)
        pap = _dot(p, ap)
        alpha = torch.where(pap > 0, rz / torch.where(pap > 0, pap, 1.0), 0.0)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1.0)
        z = mg.vcycle(r)
        rz_new = _dot(r, z)
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, 1.0), 0.0)
        p = z.addcmul_(beta, p) if False else z + beta * p
        rz = rz_new
    if float(z.abs().amax()) > tol:
        warnings.warn(f"imputation solver stopped after {max_iter} iterations with error "
                      f"estimate {float(z.abs().amax()):.2e} > {tol:.1e}", RuntimeWarning,
                      stacklevel=2)
    return x, it


def impute(images: torch.Tensor, keep: torch.Tensor, noise: float = 0.0,
           generator: torch.Generator | None = None, tol: float = DEFAULT_TOL,
           max_iter: int = DEFAULT_MAX_ITER, solve_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Noisy linear imputation of many images and masks at once.

    Args:
        images: ``(N, C, H, W)`` float images (one per mask).
        keep: ``(N, H, W)`` bool or float; True / 1 keeps the pixel, False / 0
            imputes it (the reference's binary mask convention).
        noise: standard deviation of Gaussian noise added to every imputed
            pixel (the reference's ``noise``); 0 adds none and draws nothing.
        generator: source of the noise (a `torch.Generator` on the images'
            device); the global RNG is never used.
        tol: absolute accuracy target of the linear solve, in pixel units.
        max_iter: iteration cap of the solver.
        solve_dtype: dtype of the solve (default float64).

    Returns:
        ``(N, C, H, W)``: kept pixels unchanged, imputed ones filled.
    """
    if images.dim() != 4 or keep.dim() != 3 or keep.shape != (images.shape[0],) + images.shape[2:]:
        raise CAManimError(f"impute needs images (N, C, H, W) and keep (N, H, W) of the same "
                           f"N, H, W; got {tuple(images.shape)} and {tuple(keep.shape)}")
    sdt = torch.float64 if solve_dtype is None else solve_dtype
    unknown = (keep < 0.5) if keep.is_floating_point() else ~keep.bool()
    u = unknown[:, None].to(sdt)
    img = images.to(sdt)
    coef = fine_stencil(u)
    b = u * F.conv2d((img * (1 - u)).flatten(0, 1)[:, None], neighbour_kernel(sdt, img.device),
                     padding=1).reshape(img.shape)
    scale = max(1.0, float(img.abs().amax())) if img.numel() else 1.0
    x, _ = solve_pcg(coef, b, tol=tol * scale, max_iter=max_iter)
    out = torch.where(u.bool(), x, img).to(images.dtype)
    if noise:
        eps = torch.randn(images.shape, generator=generator, dtype=images.dtype,
                          device=images.device)
        out = out + unknown[:, None].to(images.dtype) * (noise * eps)
    return out
