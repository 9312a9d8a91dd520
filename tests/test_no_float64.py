"""Accelerator dtype policy (issue 12, item 7): MPS has no float64 and
consumer GPUs run it 32-64x slower, so no float64 tensor may be made on an
accelerator. `camanim.core.maps.exact_dtype` is the one policy (float64 on
the CPU only); here the accelerator branch is forced on the CPU, and every
op is watched for float64 outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import camanim.methods.otsu as otsu
import camanim.metrics.imputation as imputation
import camanim.metrics.pointing as pointing
from camanim.core.maps import exact_dtype


class NoFloat64(TorchDispatchMode):
    """Records every op that returns a float64 tensor."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self.paused = False          # set while a CPU-only float64 step runs by design

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and not self.paused:
                self.seen.append(str(func))
        return out


def test_policy():
    assert exact_dtype("cpu") == torch.float64
    for dev in ("cuda", "mps", "xpu"):
        assert exact_dtype(torch.device(dev) if dev != "xpu" else dev) == torch.float32


@pytest.fixture
def accelerator_policy(monkeypatch):
    """The accelerator branch of every module that uses the policy."""
    f32 = lambda device: torch.float32  # noqa: E731 - a one-line stand-in for a patched function
    for mod in (pointing, otsu, imputation):
        monkeypatch.setattr(mod, "exact_dtype", f32)


def test_pointing_game_and_otsu_make_no_float64(accelerator_policy):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 2, 32, 32, generator=g)
    masks = torch.rand(2, 32, 32, generator=g) > 0.5
    with NoFloat64() as watch:
        e32 = pointing.energy_pointing_game(maps, masks)
        thr, split = otsu.otsu_threshold(torch.rand(4, 500, generator=g))
    assert watch.seen == []
    e64 = (maps * masks).flatten(2).sum(-1).double() / maps.flatten(2).sum(-1).double()
    np.testing.assert_allclose(e32, e64.numpy(), atol=1e-6)
    assert split.dtype == torch.int64 and ((split >= 1) & (split <= 255)).all()


def test_otsu_float32_counts_equal_float64(monkeypatch):
    x = torch.rand(5, 4000, generator=torch.Generator().manual_seed(1))
    h64 = otsu.histogram(x)
    s64 = otsu.otsu_split(h64)
    monkeypatch.setattr(otsu, "exact_dtype", lambda device: torch.float32)
    h32 = otsu.histogram(x)
    assert h32.dtype == torch.float32
    assert torch.equal(h32.double(), h64) and torch.equal(otsu.otsu_split(h32), s64)


def test_imputation_float32_solve_makes_no_float64_outside_the_coarse_inverse(
        accelerator_policy, monkeypatch):
    """impute's accelerator path: float32 solution; the only float64 work is the
    coarsest level's pseudo-inverse, which runs on the CPU by design (the watch
    pauses inside it and records every other op)."""
    import camanim.metrics.multigrid as multigrid

    img = torch.rand(2, 3, 24, 20, generator=torch.Generator().manual_seed(2))
    keep = (torch.rand(2, 24, 20, generator=torch.Generator().manual_seed(3)) > 0.4).float()
    ref = imputation.impute(img, keep, dtype=torch.float64)
    real_pinv, inverses = multigrid.pinv, []

    def pinv(a):
        inverses.append(a.dtype)
        watch.paused = True
        try:
            return real_pinv(a)
        finally:
            watch.paused = False

    monkeypatch.setattr(multigrid, "pinv", pinv)
    with NoFloat64() as watch:
        out = imputation.impute(img, keep)
    assert watch.seen == [] and inverses and set(inverses) == {torch.float32}
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.double(), atol=1e-5, rtol=0)


def test_map_change_ranks_make_no_float64_on_the_accelerator_branch(monkeypatch):
    import camanim.metrics.convergence as convergence

    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(3, 400, generator=g), torch.rand(3, 400, generator=g)
    a[:, :50] = 0.0                                     # ties
    ref = convergence.spearman(a, b)
    monkeypatch.setattr(convergence, "exact_dtype", lambda device: torch.float32)
    with NoFloat64() as watch:
        got = convergence.spearman(a, b)
    assert watch.seen == [] and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
