"""Batched noisy linear imputation against pytorch-grad-cam's NoisyLinearImputer.

Reference: ``pytorch_grad_cam.metrics.road.NoisyLinearImputer(noise=0.0)``
(a direct SuperLU solve in float64, result cast to float32). Our solver is
iterative (multigrid-preconditioned CG, float64 solution on the CPU, float32
on accelerators, forced here with ``dtype=torch.float32``); the contract is
agreement within 1e-5 on every pixel, with every solve converged.
"""

import warnings

import numpy as np
import pytest
import scipy.sparse
import torch
import torch.nn.functional as F
from pytorch_grad_cam.metrics.road import NoisyLinearImputer, neighbors_weights

import camanim.metrics.imputation as imputation
from camanim import CAManimError
from camanim.metrics.imputation import add_noise, direct_solve, impute, solve_dtype, work_dtype
from camanim.metrics.multigrid import FineOperator, Grid, Multigrid, galerkin, prolong_add, restrict
from camanim.metrics.road import road_masks


def cam_like(h, w, low, seed, dtype=torch.float32):
    """A map like an upsampled, ReLU'd, min-max normalized CAM: flat zero
    regions (ties) and bilinear ramps."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.relu(torch.rand(1, 1, *low, generator=g, dtype=torch.float64) - 0.35)
    raw = (raw - raw.min()) / (1e-7 + raw.max() - raw.min())
    return F.interpolate(raw, size=(h, w), mode="bilinear", align_corners=False)[0, 0].to(dtype)


def reference_masks(cam: torch.Tensor, percentiles=(20, 40, 60, 80)) -> torch.Tensor:
    """The reference's rule (RemoveMostRelevantFirst / RemoveLeastRelevantFirst)."""
    out = []
    for m in (cam, 1 - cam):
        for p in percentiles:
            threshold = np.percentile(m.cpu().numpy(), p)
            out.append(torch.from_numpy(np.float32(m < threshold)))
    return torch.stack(out)


@pytest.mark.parametrize(
    "h,w,low", [(16, 16, (4, 4)), (24, 40, (3, 5)), (32, 32, (7, 7)), (9, 14, (2, 3))]
)
def test_noise_free_imputation_matches_reference(h, w, low):
    g = torch.Generator().manual_seed(h * 100 + w)
    img = torch.randn(3, h, w, generator=g)
    masks = reference_masks(cam_like(h, w, low, seed=h + w))
    # every percentile and both orders give distinct masks of all kinds
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 4
    ours = impute(img.expand(len(masks), -1, -1, -1), masks)
    for mask, got in zip(masks, ours, strict=False):
        ref = NoisyLinearImputer(noise=0.0)(img, mask)
        assert got.dtype == ref.dtype
        assert torch.equal(got[:, mask > 0.5], img[:, mask > 0.5])    # kept pixels untouched
        assert (got - ref).abs().max().item() < 1e-5


def test_imputation_of_float64_images_and_batch_of_different_images():
    """Different images and masks in one batch, solved in chunks of 2,
    equal the reference one by one (float64 images: compared with the
    reference run on them, which returns float32-rounded values)."""
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(5, 2, 20, 28, generator=g, dtype=torch.float64) * 3 + 1
    cams = [cam_like(20, 28, (5, 7), seed=s) for s in range(5)]
    masks = torch.stack([reference_masks(c, (30, 70))[i % 4] for i, c in enumerate(cams)])
    ours = impute(imgs, masks, chunk=2)
    assert ours.dtype == torch.float64
    for img, mask, got in zip(imgs, masks, ours, strict=False):
        ref = NoisyLinearImputer(noise=0.0)(img.float(), mask)
        assert (got.float() - ref).abs().max().item() < 1e-5 * 5      # pixels up to ~10


def test_all_pixels_removed_gives_zeros_like_reference():
    """A constant map at a percentile removes every pixel (ties): the
    reference's solver then returns 0 everywhere, and so do we."""
    img = torch.randn(3, 12, 10)
    masks = reference_masks(torch.zeros(12, 10))
    assert (masks == 0).all()
    ref = NoisyLinearImputer(noise=0.0)(img, masks[0])
    ours = impute(img[None], masks[:1])[0]
    assert torch.equal(ours, torch.zeros_like(img))
    assert ref.abs().max().item() == 0.0


def test_no_pixel_removed_returns_the_image():
    img = torch.randn(1, 3, 8, 9)
    assert torch.equal(impute(img, torch.ones(1, 8, 9, dtype=torch.bool)), img)


def test_road_masks_follow_the_reference_rule_exactly():
    """Our torch thresholds equal np.percentile bit for bit, ties included,
    in float32 and float64 and for non-integer percentiles."""
    for dtype in (torch.float32, torch.float64):
        for seed, (h, w) in enumerate([(16, 16), (24, 40), (7, 5)]):
            cams = torch.stack(
                [cam_like(h, w, (3, 4), seed=seed * 10 + i, dtype=dtype) for i in range(3)]
            )
            ps = (20, 40, 60, 80, 12.5, 0, 100)
            ours = road_masks(cams, ps)                    # (2P, B, H, W)
            for i, cam in enumerate(cams):
                ref = reference_masks(cam, ps)
                assert torch.equal(ours[:, i], ref > 0.5)


def test_operator_equals_reference_sparse_system():
    """The matrix-free operator and right-hand side are the reference's
    ``setup_sparse_system`` times -12 (integer coefficients), on a mask
    touching the border."""
    h, w = 11, 13
    mask = reference_masks(cam_like(h, w, (3, 3), seed=4))[1].numpy()
    img = torch.randn(2, h, w, dtype=torch.float64)
    a_ref, b_ref = NoisyLinearImputer.setup_sparse_system(mask, img.numpy(), neighbors_weights)
    a_ref = scipy.sparse.csr_matrix(a_ref).toarray()
    unknown = torch.from_numpy(mask == 0)
    idx = torch.nonzero(unknown.flatten()).flatten()
    grid = Grid(h, w)
    op = FineOperator(unknown[None, None].double(), grid)
    # columns of A: apply to unit vectors of the unknowns
    eye = torch.zeros(len(idx), h * w, dtype=torch.float64)
    eye[torch.arange(len(idx)), idx] = 1
    cols = grid.unpad(op.apply(grid.pad(eye.reshape(1, len(idx), h, w)))).reshape(len(idx), h * w)[
        :, idx
    ]
    assert np.abs(cols.T.numpy() + 12 * a_ref).max() < 1e-12
    b = grid.unpad(op.rhs(grid.pad(img[None]))).reshape(2, h * w)[:, idx]
    assert np.abs(b.T.numpy() + 12 * b_ref).max() < 1e-12


def test_galerkin_coarse_operator_and_symmetric_preconditioner():
    """The probed coarse stencil equals P^T A P built densely, restriction is
    prolongation's adjoint, and the V-cycle is a symmetric positive
    preconditioner (what conjugate gradients needs)."""
    h, w = 14, 19
    grid = Grid(h, w)
    unknown = torch.stack(
        [reference_masks(cam_like(h, w, (4, 5), seed=s))[s] < 0.5 for s in range(2)]
    )
    op = FineOperator(unknown[:, None].double(), grid)
    active = op.active
    coarse = grid.coarse
    nc = coarse.h * coarse.w
    # dense P (fine interior x coarse), masked like the multigrid does
    e = torch.eye(nc, dtype=torch.float64).reshape(1, nc, coarse.h, coarse.w).expand(2, -1, -1, -1)
    p_cols = prolong_add(torch.zeros(2, nc, grid.numel, dtype=torch.float64), e, active, grid)
    r = restrict(p_cols, grid).reshape(2, nc, nc)
    # adjoint: <P e_j, P e_i> computed two ways
    assert torch.allclose(r, r.transpose(1, 2), atol=1e-12)
    ap = op.apply(p_cols)
    ptap = torch.einsum("nip,njp->nij", p_cols, ap)
    cop = galerkin(op, active)
    probe = cop.apply(coarse.pad(e.contiguous()))              # columns of the coarse operator
    dense = coarse.unpad(probe).reshape(2, nc, nc)
    assert torch.allclose(dense, ptap, atol=1e-12)

    mg = Multigrid(op, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    r1 = torch.randn(2, 3, grid.numel, generator=g, dtype=torch.float64) * active
    r2 = torch.randn(2, 3, grid.numel, generator=g, dtype=torch.float64) * active
    m1 = mg(r1).clone()
    m2 = mg(r2).clone()
    lhs, rhs = (m1 * r2).sum(-1), (r1 * m2).sum(-1)
    assert torch.allclose(lhs, rhs, rtol=1e-9, atol=1e-12)
    assert ((m1 * r1).sum(-1) > 0).all()


def test_noise_reproducible_only_on_imputed_pixels_and_global_rng_untouched():
    img = torch.randn(4, 3, 16, 20)
    keep = torch.stack(
        [reference_masks(cam_like(16, 20, (4, 5), seed=s))[s] > 0.5 for s in range(4)]
    )
    state = torch.get_rng_state()
    a = impute(img, keep, noise=0.01, generator=torch.Generator().manual_seed(7))
    b = impute(img, keep, noise=0.01, generator=torch.Generator().manual_seed(7))
    c = impute(img, keep, noise=0.01, generator=torch.Generator().manual_seed(8))
    clean = impute(img, keep)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    kept = keep[:, None].expand_as(img)
    assert torch.equal(a[kept], img[kept])
    delta = (a - clean)[~kept]
    assert abs(delta.std().item() - 0.01) < 0.001 and abs(delta.mean().item()) < 0.001
    # noise 0 draws nothing from the generator
    gen = torch.Generator().manual_seed(3)
    before = gen.get_state()
    impute(img, keep, noise=0.0, generator=gen)
    assert torch.equal(gen.get_state(), before)


def test_add_noise_needs_a_generator_and_bad_shapes_are_errors():
    img = torch.randn(2, 3, 8, 8)
    keep = torch.ones(2, 8, 8, dtype=torch.bool)
    with pytest.raises(CAManimError, match="Generator"):
        impute(img, keep, noise=0.1)
    with pytest.raises(CAManimError, match="Generator"):
        add_noise(img, keep, 0.1, None)
    with pytest.raises(CAManimError, match="same"):
        impute(img, torch.ones(2, 8, 9, dtype=torch.bool))
    with pytest.raises(CAManimError, match="same"):
        impute(img[0], keep[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    img = torch.randn(8, 3, 32, 48)
    keep = reference_masks(cam_like(32, 48, (4, 6), seed=1)) > 0.5
    cpu = impute(img, keep)
    gpu = impute(img.cuda(), keep.cuda()).cpu()
    assert (cpu - gpu).abs().max().item() < 1e-5


# ------------------------------------------------ sweep, precision, fallback

def road_like_masks(h, w, seed, percentiles=(10, 30, 50, 70, 90)):
    """Keep-masks as ROAD makes them: a low-resolution map (ReLU'd, so with
    flat zero regions, and quantized to 1/8, so with ties at many levels)
    upsampled bilinearly, thresholded at percentiles, MoRF and LeRF."""
    rng = np.random.default_rng(seed)
    low = (int(rng.integers(2, max(3, h // 4) + 1)), int(rng.integers(2, max(3, w // 4) + 1)))
    cam = cam_like(h, w, low, seed=seed)
    if seed % 2:
        cam = torch.round(cam * 8) / 8
    return reference_masks(cam, percentiles)


def sweep_sizes():
    rng = np.random.default_rng(2024)
    sizes = [(8, 8), (96, 96), (8, 96)]
    sizes += [tuple(int(v) for v in rng.integers(8, 97, size=2)) for _ in range(7)]
    return sizes


@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["default", "float32"])
def test_seeded_size_sweep_matches_reference_without_warnings(dtype):
    """Image sizes from 8 to 96 px, ROAD masks with ties, every solve
    converged (warnings are errors) and within 1e-5 of the reference; the
    float32 path (what CUDA and MPS run) forced on the CPU as well."""
    worst = 0.0
    for k, (h, w) in enumerate(sweep_sizes()):
        g = torch.Generator().manual_seed(k)
        img = torch.randn(3, h, w, generator=g) * 1.5
        masks = road_like_masks(h, w, seed=k)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = impute(img.expand(len(masks), -1, -1, -1), masks, dtype=dtype)
        for mask, got in zip(masks, ours, strict=False):
            if (mask > 0.5).all():
                assert torch.equal(got, img)
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)   # the reference's numpy use
                ref = NoisyLinearImputer(noise=0.0)(img, mask)
            worst = max(worst, (got - ref).abs().max().item())
    assert worst < 1e-5
    assert worst > 0.0              # a real comparison (the solver is iterative)


def test_dtype_policy_is_device_agnostic():
    assert solve_dtype("cpu") == torch.float64
    for dev in ("cuda", "cuda:1", "mps", torch.device("mps")):
        assert solve_dtype(dev) == torch.float32
    assert (
        work_dtype(torch.bfloat16) == torch.float32 and work_dtype(torch.float16) == torch.float32
    )
    assert work_dtype(torch.float64) == torch.float64 and work_dtype(torch.float32) == torch.float32
    with pytest.raises(CAManimError, match="float32 or torch.float64"):
        impute(torch.zeros(1, 1, 8, 8), torch.ones(1, 8, 8, dtype=torch.bool), dtype=torch.float16)


def test_float32_path_creates_no_float64_tensor_outside_the_cpu_pseudo_inverse(monkeypatch):
    """The accelerator path run on the CPU: every tensor an op produces is
    float32 or narrower, except inside the coarsest-level pseudo-inverse,
    which always runs on the CPU (so MPS, without float64, works)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []
    inside = [False]

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and not inside[0]:
                    seen.append(str(func))
            return out

    import camanim.metrics.multigrid as multigrid
    real_pinv = multigrid.pinv

    def pinv(a):
        assert a.dtype == torch.float32
        inside[0] = True
        try:
            return real_pinv(a)
        finally:
            inside[0] = False

    monkeypatch.setattr(multigrid, "pinv", pinv)
    img = torch.randn(6, 3, 40, 33, generator=torch.Generator().manual_seed(0))
    keep = road_like_masks(40, 33, seed=3, percentiles=(20, 60, 90))[:6] > 0.5
    with Record():
        out = impute(img, keep, noise=0.01, generator=torch.Generator().manual_seed(1),
                     dtype=torch.float32)
    assert out.dtype == torch.float32
    assert seen == []


def count_calls(monkeypatch, name):
    calls = []
    real = getattr(imputation, name)

    def wrapped(*a, **k):
        calls.append(a)
        return real(*a, **k)
    monkeypatch.setattr(imputation, name, wrapped)
    return calls


@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["default", "float32"])
def test_unconverged_systems_fall_back_to_a_direct_solve(monkeypatch, dtype):
    """One iteration cannot converge: every system goes to the direct sparse
    solve, which equals the reference; no warning is issued."""
    h, w = 30, 41
    img = torch.randn(3, h, w, generator=torch.Generator().manual_seed(5))
    masks = road_like_masks(h, w, seed=6, percentiles=(20, 50, 80))
    calls = count_calls(monkeypatch, "direct_solve")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = impute(img.expand(len(masks), -1, -1, -1), masks, max_iter=1, dtype=dtype)
    assert len(calls) == sum(int((m < 0.5).any() and (m > 0.5).any()) for m in masks) > 0
    for mask, got in zip(masks, ours, strict=False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ref = NoisyLinearImputer(noise=0.0)(img, mask)
        assert (got - ref).abs().max().item() < 1e-5


def test_large_systems_get_more_iterations_and_a_solve_that_fails_is_an_error(monkeypatch):
    h, w = 24, 24
    img = torch.randn(4, 3, h, w, generator=torch.Generator().manual_seed(2))
    keep = road_like_masks(h, w, seed=2, percentiles=(30, 70))[:4] > 0.5
    good = impute(img, keep)
    monkeypatch.setattr(imputation, "DIRECT_MAX_UNKNOWNS", 0)     # "too large" for SuperLU
    direct = count_calls(monkeypatch, "direct_solve")
    more = impute(img, keep, max_iter=1)                          # then 10 more iterations
    assert direct == []
    assert (more - good).abs().max().item() < 1e-5
    monkeypatch.setattr(imputation, "MORE_ITER_FACTOR", 0)
    with pytest.raises(CAManimError, match="did not reach its tolerance"):
        impute(img, keep, max_iter=1)


def test_direct_solve_equals_reference_and_rejects_a_singular_system():
    h, w = 13, 17
    img = torch.randn(2, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    mask = road_like_masks(h, w, seed=9, percentiles=(40,))[0]
    ours = direct_solve(img.numpy(), mask.numpy() < 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ref = NoisyLinearImputer(noise=0.0)(img.float(), mask)
    assert np.abs(ours - ref.double().numpy()).max() < 1e-6
    assert np.array_equal(direct_solve(img.numpy(), np.ones((h, w), bool)), np.zeros((2, h, w)))
    assert np.array_equal(direct_solve(img.numpy(), np.zeros((h, w), bool)), img.numpy())


def test_half_precision_images_get_noise_in_float32():
    """bf16 images: filled and noised in float32 and rounded to bf16 once
    (not the filled image rounded, then the noise added and rounded again).
    The model sees bf16 either way: at |x| ~ 3 its step is 0.0156, so the
    0.01 noise survives as a quantized, unbiased dither."""
    h, w = 16, 16
    img32 = 3.0 + 0.25 * torch.randn(8, 1, h, w, generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(8, h, w, dtype=torch.bool)
    keep[:, ::4, ::4] = True
    gen = lambda: torch.Generator().manual_seed(4)    # noqa: E731 - a one-line generator factory
    noisy16 = impute(img32.bfloat16(), keep, noise=0.01, generator=gen())
    assert noisy16.dtype == torch.bfloat16
    filled32 = impute(img32.bfloat16().float(), keep)
    once = add_noise(filled32, keep, 0.01, gen()).bfloat16()
    twice = add_noise(filled32.bfloat16().float(), keep, 0.01, gen()).bfloat16()
    assert torch.equal(noisy16, once)
    assert not torch.equal(noisy16, twice)
    removed = ~keep[:, None]
    noise = (add_noise(filled32, keep, 0.01, gen()) - filled32)[removed]
    delta = (noisy16.float() - filled32)[removed]
    # unbiased: the bf16 images' deviation follows the float32 noise
    slope = float((delta * noise).sum() / (noise * noise).sum())
    assert 0.8 < slope < 1.2


@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["default", "float32"])
def test_result_does_not_depend_on_what_is_solved_together(dtype):
    """Convergence is decided per system, so a mask's result is the same
    whether it is solved alone or in a chunk with others (the chunk size
    follows the free memory on CUDA, which must not change the numbers)."""
    h, w = 28, 36
    img = torch.randn(3, h, w, generator=torch.Generator().manual_seed(11))
    masks = torch.cat([road_like_masks(h, w, seed=s, percentiles=(15, 55, 85)) for s in (1, 2)])
    imgs = img.expand(len(masks), -1, -1, -1)
    together = impute(imgs, masks, dtype=dtype)
    alone = torch.cat(
        [impute(imgs[i : i + 1], masks[i : i + 1], dtype=dtype) for i in range(len(masks))]
    )
    pairs = impute(imgs, masks, chunk=2, dtype=dtype)
    assert torch.equal(together, alone) and torch.equal(together, pairs)
