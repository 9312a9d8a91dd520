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
for float64 images on the CPU and float32 otherwise (accelerators: consumer
GPUs run float64 at 1/32 to 1/64 of the float32 speed and MPS has no
float64 at all; float32 images: their filled pixels are float32 anyway).
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

import numpy as np
import torch

from ..core.maps import exact_dtype
from ..errors import CAManimError
from .multigrid import (
    MAX_ITER,
    NEIGHBOUR_WEIGHTS_12,
    OFFSETS,
    TOL,
    WORK_BYTES_CPU,
    WORK_BYTES_OTHER,
    FineOperator,
    Grid,
    quantum,
    solve_pcg,
    split,
)

__all__ = ["impute", "add_noise", "direct_solve", "masks_per_solve", "solve_dtype", "work_dtype",
           "cuda_free_bytes"]


# Systems with at most this many unknown pixels that conjugate gradients
# leaves unconverged get a direct sparse solve on the CPU (a 224x224 mask
# has at most 50176; SuperLU needs well under a second and ~100 MB there).
DIRECT_MAX_UNKNOWNS = 1_000_000
# Larger ones get this many times max_iter more iterations instead.
MORE_ITER_FACTOR = 10


def solve_dtype(device: torch.device | str, images: torch.dtype | None = None) -> torch.dtype:
    """dtype of the solution and its true residual for ``images`` of that
    dtype on ``device``.

    float64 on the CPU for float64 images (and when ``images`` is not
    given), float32 otherwise: on accelerators because MPS has no float64
    and consumer GPUs run it 32-64x slower; for float32 (or half) images on
    the CPU because the filled pixels are rounded to float32 anyway and the
    float32 solve (exact residual by `split`) differs from the float64 one
    by ~1e-7 while taking 5-15% less time. `impute`'s ``dtype=`` overrides
    it.
    """
    if images is not None and images != torch.float64:
        return torch.float32
    return exact_dtype(device)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype in which imputed images and noise are accumulated for inputs of
    ``dtype``: float32 for half precision (bf16's step of 2^-6 at |x| >= 2
    would round the default ROAD noise of 0.01 away), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def cuda_free_bytes(device: torch.device) -> int:
    """Bytes a CUDA device can still hand out: free, plus what torch has
    cached but not allocated (ours to reuse)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


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
        budget = cuda_free_bytes(device) // 4
    elif device.type == "cpu":
        budget = WORK_BYTES_CPU
    else:
        budget = WORK_BYTES_OTHER
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
            `solve_dtype`: float64 for float64 images on the CPU only).

    Returns:
        ``(N, C, H, W)`` in the images' dtype: kept pixels unchanged,
        imputed ones filled (plus noise).

    Raises:
        CAManimError: bad shapes, or a system that no solver path brought
            to its tolerance.
    """
    if (
        images.dim() != 4
        or keep.dim() != 3
        or tuple(keep.shape) != (images.shape[0],) + tuple(images.shape[2:])
    ):
        raise CAManimError(f"impute needs images (N, C, H, W) and keep (N, H, W) with the same "
                           f"N, H, W; got {tuple(images.shape)} and {tuple(keep.shape)}")
    if noise and generator is None:
        raise CAManimError("impute with noise > 0 needs a torch.Generator (generator=...); "
                           "the global RNG is never used")
    sdt = solve_dtype(images.device, images.dtype) if dtype is None else dtype
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
        return solve_pcg(op, op.rhs(grid.pad(img)), tol_n, max_iter=max_iter)
    q = quantum(scale).to(img.dtype).reshape(-1, 1, 1)
    img_hi, img_lo = split(img, q[..., None])
    b_hi, b_lo = op.rhs(grid.pad(img_hi)), op.rhs(grid.pad(img_lo))
    b = b_hi + b_lo
    return solve_pcg(op, b, tol_n, max_iter=max_iter,
                     residual=lambda x, out: op.residual_split(b_hi, b_lo, q, x, out))


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
        sol = direct_solve(
            img[i].detach().cpu().double().numpy(), u[i, 0].detach().cpu().numpy() > 0.5
        )
        out[i] = torch.from_numpy(sol).to(device=img.device, dtype=img.dtype)
    if large:
        idx = torch.tensor(large, device=img.device)
        x, ok = _pcg_system(img[idx], u[idx], grid, scale[idx], tol_n[idx],
                            MORE_ITER_FACTOR * max_iter)
        if not bool(ok.all()):
            raise CAManimError(
                f"imputation: the linear solve of {int((~ok).sum())} mask(s) of "
                f"{grid.h}x{grid.w} pixels did not reach its tolerance after "
                f"{(MORE_ITER_FACTOR + 1) * max_iter} iterations; pass a larger tol= "
                "(or max_iter=) to impute, or smaller images"
            )
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
