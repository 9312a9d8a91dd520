"""DDP's shared ROAD work, checked in one process (issue 23).

Two ranks are simulated: each scores its share of the layers with
`score_share`, and rank zero's `_run_synced` is fed what
`gather_objects` would return. Together they must give the scores of a
one-process run, noise included (each layer's noise is keyed on its index
in the full list, not in the rank's share). The real two-process run is
`test_callback_budget.test_ddp_shares_road_work_and_matches_one_process`
(slow).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import camanim
import camanim.lightning.callback as callback_mod
from camanim.errors import CAManimError
from camanim.lightning.callback import CAManimCallback
from camanim.lightning.distributed import merge_shares, score_share
from test_road import sharp_model

ROAD = dict(percentiles=(20, 50, 80), noise=0.05, seed=3, progress=False, batch_size=None,
            score="softmax")


@pytest.fixture(scope="module")
def setup():
    model = sharp_model(seed=1)
    x = torch.randn(2, 3, 16, 20, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    maps = camanim.CAManim(model, "gradcam", layers="all", max_layers=5, progress=False)(x)
    assert len(maps) == 5
    one = score_share(model, x, maps, maps.targets, ROAD, rank=0, world=1)
    shares = [score_share(model, x, maps, maps.targets, ROAD, rank=r, world=2) for r in (0, 1)]
    return SimpleNamespace(model=model, x=x, maps=maps, one=one, shares=shares)


def test_two_ranks_shares_equal_one_process_noise_included(setup):
    one, shares = setup.one, setup.shares
    assert one[0] == [0, 1, 2, 3, 4]
    assert [s[0] for s in shares] == [[0, 2, 4], [1, 3]]
    merged = merge_shares(shares)
    assert merged.shape == (5, 2) and np.isfinite(merged).all()
    np.testing.assert_allclose(merged, one[1], atol=1e-12, rtol=0)
    # the noise matters here: a noiseless run gives other scores
    still = score_share(setup.model, setup.x, setup.maps, setup.maps.targets,
                        dict(ROAD, noise=0.0), rank=0, world=1)
    assert np.abs(still[1] - one[1]).max() > 1e-4


def synced(monkeypatch, maps, own, gathered, rank=0):
    """Run `_run_synced` as rank ``rank`` of 2; return what `_write` got."""
    cb = CAManimCallback(torch.zeros(2, 3, 16, 20), log_videos=False, on_error="raise")
    written = {}
    done = callback_mod._Computed(maps=maps, share=own, ebpg=None, ranks=None, chance=None)
    monkeypatch.setattr(cb, "_compute", lambda *_: done)
    monkeypatch.setattr(cb, "_write", lambda *args: written.update(road=args[3]))
    monkeypatch.setattr(callback_mod, "gather_objects", lambda *_: gathered)
    trainer = SimpleNamespace(global_rank=rank, world_size=2, is_global_zero=rank == 0)
    cb._run_synced(trainer, None, 0)
    return written


def test_rank_zero_writes_every_ranks_share(setup, monkeypatch):
    maps, one, shares = setup.maps, setup.one, setup.shares
    written = synced(monkeypatch, maps, shares[0], [(None, shares[0]), (None, shares[1])])
    np.testing.assert_allclose(written["road"], one[1], atol=1e-12, rtol=0)
    # rank one computes its share but writes nothing
    assert synced(monkeypatch, maps, shares[1], [(None, shares[0]), (None, shares[1])],
                  rank=1) == {}


def test_an_error_on_rank_one_is_raised_on_rank_zero(setup, monkeypatch):
    maps, shares = setup.maps, setup.shares
    with pytest.raises(CAManimError, match="rank 1 failed: RuntimeError: broke"):
        synced(monkeypatch, maps, shares[0], [(None, shares[0]), ("RuntimeError: broke", None)])
