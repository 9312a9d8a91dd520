"""CAManimCallback inside a training budget (issue 11): media off the
training thread, its errors surfacing (the queue itself: test_media.py); training
bit-identical with TensorBoard on; the end-of-fit run on the training
device before teardown; DDP ranks sharing the ROAD work."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

import camanim.lightning.media as media
from camanim.lightning.callback import CAManimCallback
from camanim.lightning.distributed import layer_share, merge_shares
from lit_models import N_LAYERS, Net, data, loader, read_csv, trainer

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ------------------------------------------------------------------ in training

class _EpochLog(Callback):
    def __init__(self):
        self.ends = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.ends.append(time.perf_counter())


def test_slow_encoder_makes_training_wait_with_one_epoch_in_flight(tmp_path, monkeypatch):
    """A media job slower than an epoch: the queue holds at most one epoch,
    so the training thread waits (queue_wait) instead of piling up frames."""
    real = media.write_epoch_media
    live, peak = [0], [0]
    lock = threading.Lock()

    def slow(m, pool=None):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        try:
            time.sleep(0.8)
            real(m, pool)
        finally:
            with lock:
                live[0] -= 1

    monkeypatch.setattr("camanim.lightning.callback.write_epoch_media", slow)
    x, y, _ = data(n=8)
    cb = CAManimCallback(x[:1], save_dir=tmp_path / "c", road=False, log_videos=False,
                         normalization="local", media_queue=1)
    waits = []

    class Spy(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            waits.append(cb.last_timing.get("queue_wait", 0.0))

    tr = trainer(tmp_path, [cb, Spy()], max_epochs=4)
    tr.fit(Net(), loader(x, y))
    assert peak[0] == 1                                    # memory bounded: one epoch
    assert waits[0] < 0.3 and max(waits[1:]) > 0.3         # later epochs waited for it
    videos = sorted(p.name for p in (tmp_path / "c" / "videos").iterdir())
    assert videos == [f"probe0_epoch{e:03d}_local.mp4" for e in range(4)]  # drained at fit end


def test_media_runs_while_training_goes_on(tmp_path, monkeypatch):
    """With a free queue slot the epoch's pictures are drawn after the
    callback returned: the media job of epoch 0 is still running when
    epoch 1 starts."""
    started, finished = {}, {}
    real = media.write_epoch_media

    def tracked(m, pool=None):
        started[m.epoch] = time.perf_counter()
        time.sleep(0.3)
        real(m, pool)
        finished[m.epoch] = time.perf_counter()

    monkeypatch.setattr("camanim.lightning.callback.write_epoch_media", tracked)
    x, y, _ = data(n=8)
    cb = CAManimCallback(x[:1], save_dir=tmp_path / "c", road=False, log_videos=False,
                         normalization="local")
    starts = []

    class EpochStart(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            starts.append(time.perf_counter())

    trainer(tmp_path, [cb, EpochStart()], max_epochs=2).fit(Net(), loader(x, y))
    assert starts[1] < finished[0]        # epoch 1 trained while epoch 0's video was drawn
    assert set(finished) == {0, 1}


@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_media_errors_surface(tmp_path, monkeypatch, on_error):
    def broken(m, pool=None):
        raise OSError(28, f"No space left on device: epoch {m.epoch}")

    monkeypatch.setattr("camanim.lightning.callback.write_epoch_media", broken)
    x, y, _ = data(n=8)
    cb = CAManimCallback(x[:1], save_dir=tmp_path / "c", road=False, log_videos=False,
                         normalization="local", on_error=on_error)
    tr = trainer(tmp_path, [cb], max_epochs=2)
    if on_error == "raise":
        with pytest.raises(OSError, match="No space left"):
            tr.fit(Net(), loader(x, y))
        return
    with pytest.warns(UserWarning) as rec:
        tr.fit(Net(), loader(x, y))
    msgs = [str(w.message) for w in rec if "CAManimCallback" in str(w.message)]
    assert any("epoch 0" in m and "No space left" in m for m in msgs)
    assert any("epoch 1" in m for m in msgs)           # the last one comes at fit end
    assert tr.current_epoch == 2                       # training went on


def test_queue_drained_on_exception(tmp_path, monkeypatch):
    """Training dies in epoch 2: the pictures of epochs 0 and 1 are still
    written (the queue is drained in on_exception), and the training error
    is the one raised."""
    real = media.write_epoch_media

    def slow(m, pool=None):
        time.sleep(0.4)
        real(m, pool)

    monkeypatch.setattr("camanim.lightning.callback.write_epoch_media", slow)

    class Dies(Net):
        def training_step(self, batch, i):
            if self.current_epoch == 2:
                raise RuntimeError("diverged")
            return super().training_step(batch, i)

    x, y, _ = data(n=8)
    cb = CAManimCallback(x[:1], save_dir=tmp_path / "c", road=False, log_videos=False,
                         normalization="local")
    with pytest.raises(RuntimeError, match="diverged"):
        trainer(tmp_path, [cb], max_epochs=4).fit(Dies(), loader(x, y))
    videos = sorted(p.name for p in (tmp_path / "c" / "videos").iterdir())
    assert videos == ["probe0_epoch000_local.mp4", "probe0_epoch001_local.mp4"]
    assert cb._queue is None  # closed at teardown: no thread outlives fit


def test_bit_identical_training_with_tensorboard_logger(tmp_path):
    """The GIF, heatmap and TensorBoard paths run (in the background) and
    training still ends with the same weights, optimizer state and RNG."""
    x, _, m = data()

    def run(root, extra):
        import lightning as L

        from lit_models import Frozen as _Frozen

        L.seed_everything(0, workers=True)
        xs, ys, _ = data()
        model = _Frozen()
        tr = trainer(root, extra, max_epochs=3, limit_val_batches=1,
                     logger=TensorBoardLogger(str(root), name="tb"))
        tr.fit(model, loader(xs, ys), loader(xs[:8], ys[:8], shuffle=False))
        return model, tr

    ref, ref_tr = run(tmp_path / "ref", [])
    ref_rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    cb = CAManimCallback(x[:2], masks=m[:2])
    model, tr = run(tmp_path / "cb", [cb])
    log_dir = Path(tr.logger.log_dir)
    assert cb.epochs_done == [0, 1, 2] and (log_dir / "heatmaps").is_dir()
    assert len(list((log_dir / "videos").glob("*.mp4"))) == 3 * 2 * 2
    for (k, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items(), strict=False):
        assert torch.equal(a, b), k
    o1, o2 = ref_tr.optimizers[0].state_dict()["state"], tr.optimizers[0].state_dict()["state"]
    for k in o1:
        assert torch.equal(o1[k]["momentum_buffer"], o2[k]["momentum_buffer"])
    assert torch.equal(torch.get_rng_state(), ref_rng[0])
    assert np.array_equal(np.random.get_state()[1], ref_rng[1]) and random.getstate() == ref_rng[2]


def test_end_of_fit_run_in_on_train_end_on_training_device(tmp_path):
    """every_n_epochs=2 and 3 epochs: epoch 2 is run at the end of training,
    inside on_train_end (before the strategy's teardown moves the module),
    with the model on the strategy's root device."""
    seen = []

    class Spy(CAManimCallback):
        def _run_synced(self, trainer, pl_module, epoch):
            dev = {p.device for p in pl_module.parameters()}
            seen.append((epoch, trainer.state.stage, dev, trainer.strategy.root_device))
            super()._run_synced(trainer, pl_module, epoch)

    class Order(Callback):
        def __init__(self):
            self.hooks = []

        def on_train_end(self, trainer, pl_module):
            self.hooks.append(("on_train_end", len(seen)))

        def on_fit_end(self, trainer, pl_module):
            self.hooks.append(("on_fit_end", len(seen)))

    x, y, _ = data(n=8)
    cb = Spy(x[:1], every_n_epochs=2, save_dir=tmp_path / "c", road=False, log_videos=False,
             save_videos=False)
    order = Order()
    trainer(tmp_path, [order, cb], max_epochs=3).fit(Net(), loader(x, y))
    assert [s[0] for s in seen] == [1, 2]
    epoch, stage, devices, root = seen[-1]
    assert devices == {root}
    # Order's on_train_end ran before the callback's (list order), on_fit_end after it
    assert order.hooks == [("on_train_end", 1), ("on_fit_end", 2)]


# ------------------------------------------------------------------ DDP

def test_layer_shares_cover_every_layer_once():
    for n, world in ((53, 2), (53, 3), (4, 8), (1, 2)):
        shares = [layer_share(n, r, world) for r in range(world)]
        flat = sorted(i for s in shares for i in s)
        assert flat == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    parts = [([0, 2], np.array([[0.0], [2.0]])), ([1], np.array([[1.0]]))]
    assert merge_shares(parts).ravel().tolist() == [0.0, 1.0, 2.0]


DDP_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
from torch import nn
import lightning as L
import camanim.metrics.road as road
from lit_models import data, loader
from lit_models import TinyLitNet
from camanim.lightning.callback import CAManimCallback

def Plain():
    # no BatchNorm, lr 0: every rank and the one-process run explain the same weights
    return TinyLitNet(n_conv=4, lr=0.0)

scored = []
real = road.ybroad
def counting(model, images, maps, **kw):
    scored.append(len(maps))
    if {fail!r} and int(os.environ.get("LOCAL_RANK", 0)) == 1:
        raise RuntimeError("rank one broke")
    return real(model, images, maps, **kw)
road.ybroad = counting

if __name__ == "__main__":
    torch.set_num_threads(1)
    L.seed_everything(0)
    x, y, m = data(n=16)
    # chance=False: the counted ybroad calls are the layers' alone
    cb = CAManimCallback(x[:2], masks=m[:2], normalization="local", save_dir={out!r},
                         on_error="raise", log_videos=False, chance=False)
    tr = L.Trainer(max_epochs=2, accelerator="cpu", devices={devices}, strategy={strategy!r},
                   callbacks=[cb], logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir={out!r})
    try:
        tr.fit(Plain(), loader(x, y))
        status = "ok"
    except Exception as e:
        status = f"{{type(e).__name__}}: {{e}}"
    with open(os.path.join({out!r}, "rank%d.json" % tr.global_rank), "w") as f:
        json.dump(dict(rank=tr.global_rank, status=status, scored=scored), f)
"""


def _ddp(tmp_path, name, devices, fail=False):
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / f"{name}.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out),
                                        devices=devices, fail=fail,
                                        strategy="ddp" if devices > 1 else "auto"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=300, env=env, cwd=str(tmp_path))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"run hung (> 300 s): {e.stderr}")
    ranks = {}
    for p in out.glob("rank*.json"):
        r = json.loads(p.read_text())
        ranks[r["rank"]] = r
    return proc, out, ranks


@pytest.mark.slow
def test_ddp_shares_road_work_and_matches_one_process(tmp_path):
    proc1, out1, r1 = _ddp(tmp_path, "one", 1)
    assert r1[0]["status"] == "ok", proc1.stderr[-3000:]
    proc2, out2, r2 = _ddp(tmp_path, "two", 2)
    assert set(r2) == {0, 1} and all(r["status"] == "ok" for r in r2.values()), proc2.stderr[-3000:]
    # each rank scored about half of the layers, every epoch
    assert r1[0]["scored"] == [N_LAYERS, N_LAYERS]
    assert r2[0]["scored"] == [N_LAYERS // 2] * 2 and r2[1]["scored"] == [N_LAYERS // 2] * 2
    one, two = read_csv(out1 / "ybroad.csv"), read_csv(out2 / "ybroad.csv")
    assert len(two) == 2 * 2 * N_LAYERS
    # the same file row for row, but for the step count (each rank sees half the batches)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "global_step"} for r in rows]  # noqa: E731 - a one-line row filter
    assert drop(two) == drop(one)
    assert {r["global_step"] for r in two} == {"1", "2"} and {r["global_step"] for r in one} == {
        "2",
        "4",
    }


@pytest.mark.slow
def test_ddp_error_on_rank_one_stops_both_ranks(tmp_path):
    proc, out, ranks = _ddp(tmp_path, "fail", 2, fail=True)
    assert set(ranks) == {0, 1}, proc.stderr[-3000:]
    assert "rank one broke" in ranks[1]["status"]
    assert "rank 1" in ranks[0]["status"] and "rank one broke" in ranks[0]["status"]
    assert not (out / "ybroad.csv").exists()              # nothing half-written
