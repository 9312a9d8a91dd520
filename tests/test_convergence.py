"""Map convergence, settle epochs, Kendall tau and chance baselines.

References: ``scipy.stats.spearmanr`` / ``rankdata`` for the rank
correlation and ``scipy.stats.kendalltau`` (tau-b) for Kendall's tau,
both to 1e-12 (float64 sums of at most a few thousand terms).
"""

import math

import numpy as np
import pytest
import scipy.stats as ss
import torch

from camanim import CAManim, CAManimError
from camanim.metrics.convergence import (
    CHANCE_NAMES,
    average_ranks,
    chance_maps,
    chance_road,
    kendall_tau,
    map_change,
    rank_change,
    rank_maps,
    settle_epochs,
    share_below,
    spearman,
)
from camanim.metrics.road import ybroad
from helpers import TinyCNN


def _maps(seed, shape=(3, 2, 24, 28)):
    g = torch.Generator().manual_seed(seed)
    # ReLU'd maps: many exact zeros, so ties matter
    return (torch.randn(shape, generator=g, dtype=torch.float64) - 0.3).clamp_min(0)


def test_identical_maps_change_zero():
    m = _maps(0)
    out = map_change(m, m.clone())
    assert out.shape == (3, 2)
    np.testing.assert_allclose(out, 0.0, atol=1e-12)


def test_monotone_rescaling_is_no_change():
    m = _maps(1)
    np.testing.assert_allclose(map_change(m, 5 * m ** 3 + 2), 0.0, atol=1e-12)


def test_independent_random_maps_change_about_one():
    a, b = _maps(2, (4, 3, 48, 48)), _maps(3, (4, 3, 48, 48))
    out = map_change(a, b)
    assert np.all(out > 0.85) and np.all(out < 1.15)
    assert abs(out.mean() - 1.0) < 0.05


def test_reversed_map_change_two():
    m = torch.rand(1, 1, 10, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    np.testing.assert_allclose(map_change(m, -m), 2.0, atol=1e-12)


def test_spearman_and_ranks_equal_scipy_with_ties():
    g = torch.Generator().manual_seed(5)
    a = torch.randint(0, 6, (5, 300), generator=g).double()
    b = torch.randint(0, 4, (5, 300), generator=g).double()
    np.testing.assert_allclose(average_ranks(a).numpy(), ss.rankdata(a.numpy(), axis=1), atol=1e-12)
    ref = [ss.spearmanr(a[i].numpy(), b[i].numpy()).statistic for i in range(5)]
    np.testing.assert_allclose(spearman(a, b).numpy(), ref, atol=1e-12)


def test_ranks_kept_between_epochs_give_the_same_change():
    a, b = _maps(8), _maps(9)
    ra, rb = rank_maps(a), rank_maps(b)
    assert ra.shape == (3, 2, 24 * 28) and ra.dtype == torch.float32
    np.testing.assert_array_equal(ra[1, 0].numpy(), ss.rankdata(a[1, 0].numpy().ravel()))
    np.testing.assert_allclose(rank_change(ra, rb), map_change(a, b), atol=1e-12)
    with pytest.raises(CAManimError, match="same shape"):
        rank_change(ra, rb[:2])


def test_constant_map_gives_nan():
    m = _maps(6)
    flat = m.clone()
    flat[1, 0] = 0.0
    out = map_change(m, flat)
    assert np.isnan(out[1, 0])
    assert np.isfinite(np.delete(out.ravel(), 2)).all()


def test_map_change_takes_layer_maps(tiny, tiny_input):
    anim = CAManim(tiny, "gradcam", progress=False)
    a = anim(tiny_input, [1, 2])
    np.testing.assert_allclose(map_change(a, a.upsample("local")), 0.0, atol=1e-12)


def test_map_change_bad_input():
    with pytest.raises(CAManimError, match="same shape"):
        map_change(_maps(0), _maps(0, (3, 2, 24, 20)))
    bad = _maps(0)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CAManimError, match="NaN"):
        map_change(bad, bad)
    with pytest.raises(CAManimError, match="L, B, H, W"):
        map_change(torch.zeros(5), torch.zeros(5))


def test_settle_epochs():
    nan = float("nan")
    changes = [[nan, nan, nan, nan],
               [0.50, 0.05, 0.01, 0.3],
               [0.05, 0.20, 0.02, 0.01],
               [0.01, 0.05, 0.03, 0.4]]
    assert settle_epochs(changes, [2, 4, 6, 8], threshold=0.1) == [6, 8, 4, None]
    assert settle_epochs(changes, threshold=0.1) == [2, 3, 1, None]
    # a NaN in the last epoch (a constant map) is not settled
    assert settle_epochs([[0.01], [nan]], threshold=0.1) == [None]
    assert settle_epochs([[0.01], [0.02]], threshold=0.1) == [0]
    with pytest.raises(CAManimError, match="epochs"):
        settle_epochs(changes, [1, 2])


def test_share_below():
    assert share_below([0.05, 0.2, float("nan"), 0.01], 0.1) == pytest.approx(2 / 3)
    assert math.isnan(share_below([float("nan")]))


@pytest.mark.parametrize("seed", range(6))
def test_kendall_tau_equals_scipy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 60))
    a = rng.integers(0, 8, n).astype(float) if seed % 2 else rng.normal(size=n)
    b = a + rng.normal(scale=2.0, size=n) if seed % 3 else rng.integers(0, 5, n).astype(float)
    assert kendall_tau(a, b) == pytest.approx(ss.kendalltau(a, b).statistic, abs=1e-12)


def test_kendall_tau_drops_nan_pairs():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=30), rng.normal(size=30)
    a[[3, 9]] = np.nan
    b[[9, 20]] = np.nan
    keep = ~(np.isnan(a) | np.isnan(b))
    assert kendall_tau(a, b) == pytest.approx(ss.kendalltau(a[keep], b[keep]).statistic, abs=1e-12)
    assert kendall_tau(a, a) == pytest.approx(1.0)
    assert math.isnan(kendall_tau([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(kendall_tau([1.0], [2.0]))
    with pytest.raises(CAManimError, match="same length"):
        kendall_tau([1, 2, 3], [1, 2])


def test_chance_maps_reproducible_and_private_rng():
    state = torch.get_rng_state()
    a = chance_maps((3, 20, 24), seed=11)
    b = chance_maps((3, 20, 24), seed=11)
    c = chance_maps((3, 20, 24), seed=12)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == (2, 3, 20, 24)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], c[0])
    assert torch.equal(a[1], c[1])                    # the blob does not depend on the seed
    assert not torch.equal(a[0, 0], a[0, 1])          # a different random map per image
    assert float(a.min()) == 0.0 and float(a.max()) == 1.0
    # the blob is centred and symmetric
    blob = a[1, 0]
    assert torch.allclose(blob, blob.flip(0)) and torch.allclose(blob, blob.flip(1))
    assert blob[9:11, 11:13].min() == blob.max()
    pixel = chance_maps((1, 20, 24), seed=11, cells=None)[0, 0]
    assert map_change(pixel[None, None], a[0, :1][None]).item() > 0.5
    with pytest.raises(CAManimError, match="shape"):
        chance_maps((20, 24), seed=0)


def test_chance_road_reproducible_and_wired_like_ybroad():
    torch.manual_seed(0)
    model = TinyCNN().double().eval()
    x = torch.randn(2, 3, 16, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(percentiles=(20, 50, 80), noise=0.01, seed=3)
    r1 = chance_road(model, x, [1, 4], **kw)
    r2 = chance_road(model, x, [1, 4], **kw)
    assert r1.names == list(CHANCE_NAMES)
    assert r1.scores.shape == (2, 2)
    assert r1.targets == [1, 4]
    np.testing.assert_array_equal(r1.scores, r2.scores)
    # the same numbers as ybroad on the chance maps themselves
    direct = ybroad(model, x, chance_maps((2, 16, 20), 3), targets=[1, 4], progress=False, **kw)
    np.testing.assert_allclose(r1.scores, direct.scores, atol=1e-12)
    other = chance_road(model, x, [1, 4], map_seed=99, **kw)
    assert not np.array_equal(other.scores[0], r1.scores[0])
    np.testing.assert_array_equal(other.scores[1], r1.scores[1])


def test_chance_road_without_targets_scores_the_predicted_class():
    """targets=None means the predicted class (it used to fail: the chance
    maps carried no targets and ybroad took them for class-less callables)."""
    torch.manual_seed(0)
    model = TinyCNN(classes=4).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(-1)
    none = chance_road(model, x, None, noise=0.0)
    given = chance_road(model, x, pred, noise=0.0)
    reused = chance_road(model, x, None, noise=0.0, logits=logits)
    assert none.targets == pred.tolist()
    assert np.array_equal(none.scores, given.scores)
    assert np.array_equal(reused.scores, given.scores)
