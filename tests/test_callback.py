"""CAManimCallback (issue 6): training untouched, TensorBoard read back,
resume, DDP, memory, validation, EBPG."""

from __future__ import annotations

import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from camanim import CAManimError, LayerMaps, RoadOptions
from camanim.core.layers import LayerInfo
from camanim.lightning.callback import CAManimCallback, energy_pointing_game
from camanim.runs.study import CSV_COLUMNS
from helpers import no_hooks
from lit_models import N_LAYERS, Frozen, Net, data, loader, quick, read_csv, trainer

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# --------------------------------------------------------------- untouched training

class _Record(Callback):
    """Records modes / requires_grad / RNG at on_train_epoch_end."""

    def __init__(self):
        self.seen = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(([m.training for m in pl_module.modules()],
                          [p.requires_grad for p in pl_module.parameters()],
                          [None if p.grad is None else p.grad.clone()
                           for p in pl_module.parameters()],
                          torch.get_rng_state().clone(), np.random.get_state()[1].copy(),
                          random.getstate()))


class _RngEater(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        torch.rand(1)


def _fit(tmp_path, extra, validate=True):
    L.seed_everything(0, workers=True)
    x, y, _ = data()
    model = Frozen()
    before, after = _Record(), _Record()
    tr = trainer(tmp_path, [before, *extra, after], max_epochs=3,
                 limit_val_batches=1 if validate else 0)
    tr.fit(model, loader(x, y), loader(x[:8], y[:8], shuffle=False) if validate else None)
    return model, tr, before, after


def test_training_is_bit_identical_with_and_without_callback(tmp_path):
    x, y, m = data()
    ref, ref_tr, _, _ = _fit(tmp_path / "ref", [])
    ref_rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    cb = CAManimCallback(x[:2], masks=m[:2], save_dir=tmp_path / "cam", save_maps=True,
                         normalization=("local", "global"), log_videos=True)
    model, tr, before, after = _fit(tmp_path / "cb", [cb])
    assert cb.epochs_done == [0, 1, 2]  # the callback did its work every epoch
    assert len(read_csv(tmp_path / "cam" / "ybroad.csv")) == 3 * 2 * N_LAYERS
    for (k, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items(), strict=False):
        assert torch.equal(a, b), k  # parameters and BN buffers, bit for bit
    assert int(model.f[7].num_batches_tracked) == int(ref.f[7].num_batches_tracked) > 0
    assert int(model.f[1].num_batches_tracked) == int(ref.f[1].num_batches_tracked)
    o1, o2 = ref_tr.optimizers[0].state_dict()["state"], tr.optimizers[0].state_dict()["state"]
    assert o1.keys() == o2.keys() and o1
    for k in o1:
        assert torch.equal(o1[k]["momentum_buffer"], o2[k]["momentum_buffer"])
    # what the next callback saw equals what the previous one saw, every epoch
    for (m1, r1, g1, t1, n1, p1), (m2, r2, g2, t2, n2, p2) in zip(
        before.seen, after.seen, strict=False
    ):
        assert m1 == m2 and False in m1 and True in m1  # mixed train/eval modes kept
        assert r1 == r2 and False in r1
        assert all(
            (a is None and b is None) or torch.equal(a, b) for a, b in zip(g1, g2, strict=False)
        )
        assert torch.equal(t1, t2) and np.array_equal(n1, n2) and p1 == p2
    assert torch.equal(torch.get_rng_state(), ref_rng[0])
    assert np.array_equal(np.random.get_state()[1], ref_rng[1]) and random.getstate() == ref_rng[2]
    assert no_hooks(model)
    assert not model.f[0].weight.requires_grad and model.f[0].weight.grad is None


def test_identity_check_detects_rng_use(tmp_path):
    """The comparison above is sensitive: one torch.rand per epoch changes
    the weights (dropout masks and shuffling differ)."""
    ref, *_ = _fit(tmp_path / "ref", [], validate=False)
    eaten, *_ = _fit(tmp_path / "eat", [_RngEater()], validate=False)
    assert not all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(),
                                                     eaten.state_dict().values(), strict=False))


# --------------------------------------------------------------- TensorBoard

def test_tensorboard_events_read_back(tmp_path):
    import imageio.v3 as iio
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y, _ = data()
    cb = CAManimCallback(x[:2], probe_names=["cat", "dog"], fps=4)
    logger = TensorBoardLogger(str(tmp_path / "runs"), name="exp")
    tr = trainer(tmp_path, [cb], max_epochs=3, logger=logger)
    tr.fit(Net(), loader(x, y))
    log_dir = Path(logger.log_dir)
    assert cb._dir == log_dir  # default save_dir: the TensorBoard logger's log_dir

    ea = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0,
                                                        "scalars": 0})
    ea.Reload()
    steps = [3, 6, 9]  # global step at the end of each epoch (3 batches per epoch)
    for probe in ("cat", "dog"):
        for norm in ("local_global",):  # one GIF: local | global side by side
            events = ea.Images(f"camanim/{probe}/{norm}")
            assert [e.step for e in events] == steps
            for e in events:
                frames = iio.imread(e.encoded_image_string, index=None, extension=".gif")
                assert frames.shape[0] == N_LAYERS  # one frame per layer
                assert (e.height, e.width) == frames.shape[1:3]
        heat = ea.Images(f"ybroad/{probe}/heatmap")
        assert [e.step for e in heat] == steps
        widths = [iio.imread(e.encoded_image_string, extension=".png").shape[1] for e in heat]
        assert widths[0] < widths[1] < widths[2]  # one more epoch column each time
        assert [e.step for e in ea.Images(f"ybroad/{probe}/curve")] == steps
        for s in ("mean", "max", "best_layer", "final_layer"):
            assert [e.step for e in ea.Scalars(f"ybroad/{probe}/{s}")] == steps
        best = [int(e.value) for e in ea.Scalars(f"ybroad/{probe}/best_layer")]
        epochs, names, mat = cb.road_history(probe)
        assert epochs == [0, 1, 2] and mat.shape == (3, N_LAYERS)
        assert best == [int(np.argmax(r)) for r in mat]
        mx = [e.value for e in ea.Scalars(f"ybroad/{probe}/max")]
        np.testing.assert_allclose(mx, mat.max(1), rtol=1e-5)
        text = ea.Tensors(f"camanim/{probe}/summary/text_summary")
        assert len(text) == 3
        assert f"`{names[best[-1]]}`" in text[-1].tensor_proto.string_val[0].decode()
    assert len(ea.Scalars("camanim/seconds")) == 3
    rows = read_csv(log_dir / "ybroad.csv")
    assert len(rows) == 3 * 2 * N_LAYERS and list(rows[0]) == list(CSV_COLUMNS)
    videos = sorted(p.name for p in (log_dir / "videos").iterdir())
    assert len(videos) == 3 * 2 * 2 and "dog_epoch002_global.mp4" in videos
    n = sum(1 for _ in iio.imiter(log_dir / "videos" / "cat_epoch001_local.mp4"))
    assert n == N_LAYERS


def test_runs_after_validation_skips_sanity_and_other_stages(tmp_path):
    x, y, _ = data()

    class Spy(CAManimCallback):
        def _run_synced(self, trainer, pl_module, epoch):
            pl_module.order.append(("cam", epoch))
            assert not trainer.sanity_checking
            super()._run_synced(trainer, pl_module, epoch)

    cb = Spy(x[:1], road=False, log_videos=False, save_videos=False, save_dir=tmp_path / "c")
    model = Net()
    tr = trainer(tmp_path, [cb], max_epochs=2, num_sanity_val_steps=1, limit_val_batches=1)
    tr.fit(model, loader(x, y), loader(x[:8], y[:8], shuffle=False))
    assert model.order == [("val", 0), ("cam", 0), ("val", 1), ("cam", 1)]
    tr.validate(model, loader(x[:8], y[:8], shuffle=False), verbose=False)
    assert cb.epochs_done == [0, 1]


@pytest.mark.parametrize("kw,max_epochs,expected", [
    (dict(every_n_epochs=2), 3, [1, 2]),               # 2 by schedule, 3rd at fit end
    (dict(every_n_epochs=2), 4, [1, 3]),               # last epoch already done: no repeat
    (dict(epochs=[0, 2]), 4, [0, 2, 3]),
    (dict(epochs=[0, 2], on_fit_end=False), 4, [0, 2]),
])
def test_schedule_and_fit_end(tmp_path, kw, max_epochs, expected):
    x, y, _ = data(n=8)
    cb = quick(x[:1], road=False, save_dir=tmp_path / "c", **kw)
    trainer(tmp_path, [cb], max_epochs=max_epochs).fit(Net(), loader(x, y))
    assert cb.epochs_done == expected
    rows = read_csv(tmp_path / "c" / "ybroad.csv")
    assert sorted({int(r["epoch"]) for r in rows}) == expected
    assert len(rows) == len(expected) * N_LAYERS


# --------------------------------------------------------------- other loggers, dataset probes

def test_dataset_probes_labels_masks_and_csv_logger(tmp_path):
    x, y, m = data()

    class DS(torch.utils.data.Dataset):
        classes = ["a", "b", "c"]

        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return x[i], int(y[i]), m[i]

    logger = CSVLogger(str(tmp_path / "csvlogs"), name="r")
    cb = quick((DS(), [3, 5]), save_dir=tmp_path / "c")
    assert cb.probe_names == ["sample3", "sample5"]
    trainer(tmp_path, [cb], max_epochs=2, logger=logger).fit(Net(), loader(x, y))
    rows = read_csv(tmp_path / "c" / "ybroad.csv")
    assert {r["probe"]: int(r["target"]) for r in rows} == {"sample3": int(y[3]),
                                                           "sample5": int(y[5])}
    eb = np.array([float(r["ebpg"]) for r in rows])
    assert np.isfinite(eb).all() and ((eb >= 0) & (eb <= 1)).all()
    # the CSV ebpg equals a recomputation from the stored history
    _, _, mat = cb.ebpg_history("sample3")
    got = [float(r["ebpg"]) for r in rows if r["probe"] == "sample3"]
    np.testing.assert_allclose(got, mat.reshape(-1), rtol=1e-5)
    metrics = read_csv(Path(logger.log_dir) / "metrics.csv")
    cols = set(metrics[0])
    for c in ("ybroad/sample3/mean", "ybroad/sample5/best_layer", "ebpg/sample3/max",
              "ebpg/sample5/best_road_layer"):
        assert c in cols
    assert sum(1 for r in metrics if r["ybroad/sample3/mean"]) == 2
    assert not list((tmp_path / "c").glob("events.*"))  # no TensorBoard logger: files only


def test_no_logger_files_only(tmp_path):
    x, y, _ = data(n=8)
    cb = CAManimCallback(x[:1], normalization="local")
    trainer(tmp_path, [cb], max_epochs=1).fit(Net(), loader(x, y))
    d = tmp_path / "camanim"  # default_root_dir/camanim without a TensorBoard logger
    assert (d / "ybroad.csv").exists() and (d / "heatmaps" / "probe0.png").exists()
    assert [p.name for p in (d / "videos").iterdir()] == ["probe0_epoch000_local.mp4"]


# --------------------------------------------------------------- resume

def test_resume_from_checkpoint_continues_history_and_csv(tmp_path):
    x, y, _ = data(n=16)
    ck = tmp_path / "ckpt"
    save = tmp_path / "cam"
    probes = x[:2]
    # first run: 3 epochs, a checkpoint after each
    cb1 = quick(probes, save_dir=save)
    mc = ModelCheckpoint(dirpath=ck, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path, [cb1, mc], max_epochs=3, enable_checkpointing=True).fit(
        Net(), loader(x, y))
    assert cb1.epochs_done == [0, 1, 2]
    first = read_csv(save / "ybroad.csv")

    # "crash" after epoch 2; resume from the epoch-1 checkpoint up to 4 epochs
    cb2 = quick(probes, save_dir=save)
    with pytest.warns(UserWarning, match="already holds epoch 2"):
        trainer(tmp_path, [cb2], max_epochs=4).fit(Net(), loader(x, y),
                                                   ckpt_path=str(ck / "epoch=1.ckpt"))
    assert cb2.epochs_done == [0, 1, 2, 3]  # restored 0-1, re-ran 2, new 3: no gap
    epochs, names, mat = cb2.road_history("probe0")
    assert epochs == [0, 1, 2, 3] and mat.shape == (4, N_LAYERS)
    np.testing.assert_array_equal(mat[:2], cb1.road_history("probe0")[2][:2])
    rows = read_csv(save / "ybroad.csv")
    keys = [(r["epoch"], r["probe"], r["layer_index"]) for r in rows]
    assert len(keys) == len(set(keys))  # nothing written twice
    assert sorted({int(r["epoch"]) for r in rows}) == [0, 1, 2, 3]
    assert rows[:len(first)] == first  # earlier rows untouched (append only)
    assert len(rows) == 4 * 2 * N_LAYERS

    # resuming into a new folder writes the restored epochs there too
    cb3 = quick(probes, save_dir=tmp_path / "new")
    trainer(tmp_path, [cb3], max_epochs=3).fit(Net(), loader(x, y),
                                               ckpt_path=str(ck / "epoch=1.ckpt"))
    rows3 = read_csv(tmp_path / "new" / "ybroad.csv")
    assert [int(r["epoch"]) for r in rows3] == sorted(int(r["epoch"]) for r in rows3)
    assert sorted({int(r["epoch"]) for r in rows3}) == [0, 1, 2]
    assert rows3[:2 * 2 * N_LAYERS] == first[:2 * 2 * N_LAYERS]  # backfilled, same values


def test_state_dict_round_trip_is_plain_data(tmp_path):
    x, y, m = data(n=8)
    cb = quick(x[:2], masks=m[:2], save_dir=tmp_path / "c")
    trainer(tmp_path, [cb], max_epochs=2).fit(Net(), loader(x, y))
    torch.save(cb.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)  # no pickled objects
    fresh = quick(x[:2], masks=m[:2])
    fresh.load_state_dict(state)
    assert fresh.epochs_done == [0, 1]
    for p in ("probe0", "probe1"):
        for get in ("road_history", "ebpg_history"):
            a, b = getattr(cb, get)(p), getattr(fresh, get)(p)
            assert a[0] == b[0] and a[1] == b[1]
            np.testing.assert_array_equal(a[2], b[2])
    assert json.dumps(state)  # JSON-able too


# --------------------------------------------------------------- validation

@pytest.mark.parametrize("args,kw,match", [
    ((torch.zeros(3, 16, 16),), {}, r"unsqueeze\(0\)"),
    ((torch.zeros(0, 3, 16, 16),), {}, "B >= 1"),
    (([torch.zeros(3, 16, 16), torch.zeros(3, 8, 8)],), {}, "different shapes"),
    ((torch.zeros(2, 3, 8, 8, dtype=torch.uint8),), {}, "float"),
    ((torch.zeros(2, 3, 8, 8),), dict(targets=[1]), "1 targets for 2 probes"),
    ((torch.zeros(2, 3, 8, 8),), dict(targets=[0, -1]), "out of range"),
    ((torch.zeros(2, 3, 8, 8),), dict(targets="labels"), "dataset"),
    ((torch.zeros(2, 3, 8, 8),), dict(targets="cats"), "targets must be"),
    ((torch.zeros(2, 3, 8, 8),), dict(every_n_epochs=0), "every_n_epochs must be >= 1"),
    ((torch.zeros(2, 3, 8, 8),), dict(epochs=[1, -2]), "non-negative"),
    ((torch.zeros(2, 3, 8, 8),), dict(epochs=[1, 1]), "twice"),
    ((torch.zeros(2, 3, 8, 8),), dict(epochs=3), "list of epoch numbers"),
    ((torch.zeros(2, 3, 8, 8),), dict(epochs=[2], every_n_epochs=2), "not both"),
    ((torch.zeros(2, 3, 8, 8),), dict(normalization=("local", "loud")), "unknown normalization"),
    ((torch.zeros(2, 3, 8, 8),), dict(method="gradcan"), "gradcam"),
    ((torch.zeros(2, 3, 8, 8),), dict(road_percentiles=(20, 100)), "strictly between"),
    ((torch.zeros(2, 3, 8, 8),), dict(fps=0), "fps"),
    ((torch.zeros(2, 3, 8, 8),), dict(masks=torch.zeros(2, 4, 4)), "resize the mask"),
    ((torch.zeros(2, 3, 8, 8),), dict(masks=torch.zeros(3, 8, 8)), "3 masks for 2"),
    ((torch.zeros(2, 3, 8, 8),), dict(masks=torch.full((2, 8, 8), 2.0)), r"\[0, 1\]"),
    ((torch.zeros(2, 3, 8, 8),), dict(probe_names=["a", "a"]), "unique"),
    ((torch.zeros(2, 3, 8, 8),), dict(mean=[0.5, 0.5]), "3 channels"),
    ((torch.zeros(2, 3, 8, 8),), dict(on_error="ignore"), "on_error"),
    ((torch.zeros(2, 3, 8, 8),), dict(max_layers=0), "max_layers"),
    (("images",), {}, "probes must be"),
])
def test_construction_errors(args, kw, match):
    with pytest.raises(CAManimError, match=match):
        CAManimCallback(*args, **kw)


def test_dataset_probe_errors():
    x, y, _ = data(n=4)
    ds = torch.utils.data.TensorDataset(x, y)
    with pytest.raises(CAManimError, match="out of range for a dataset of 4"):
        CAManimCallback((ds, [0, 9]))

    class WithClasses(torch.utils.data.TensorDataset):
        classes = ["a", "b"]

    with pytest.raises(CAManimError, match="has 2 classes"):
        CAManimCallback((WithClasses(x, y), [0]), targets=[2])
    cb = CAManimCallback((ds, [0, 1]))  # labels become the targets
    assert cb._targets == [int(y[0]), int(y[1])]
    assert CAManimCallback((ds, [0, 1]), targets="predicted")._targets is None


def test_fit_start_checks_targets_and_layers_against_the_model(tmp_path):
    x, y, _ = data(n=8)
    model = Net(classes=3)
    w = model.f[0].weight.detach().clone()
    with pytest.raises(CAManimError, match="model has 3 classes"):
        trainer(tmp_path, [quick(x[:1], targets=[5])]).fit(model, loader(x, y))
    assert torch.equal(model.f[0].weight, w)  # failed before any training step
    with pytest.raises(CAManimError, match="nope"):
        trainer(tmp_path, [quick(x[:1], layers=["nope"])]).fit(Net(), loader(x, y))


def test_on_error_warn_keeps_training(tmp_path, monkeypatch):
    x, y, _ = data(n=8)
    cb = quick(x[:1], save_dir=tmp_path / "c")  # on_error="warn" is the default

    def boom(*a, **k):
        raise RuntimeError("ROAD exploded")

    monkeypatch.setattr("camanim.metrics.road.ybroad", boom)
    with pytest.warns(UserWarning, match="ROAD exploded"):
        tr = trainer(tmp_path, [cb], max_epochs=2)
        tr.fit(Net(), loader(x, y))
    assert tr.current_epoch == 2 and cb.epochs_done == []
    cb2 = quick(x[:1], save_dir=tmp_path / "d", on_error="raise")
    with pytest.raises(RuntimeError, match="ROAD exploded"):
        trainer(tmp_path, [cb2], max_epochs=2).fit(Net(), loader(x, y))


# --------------------------------------------------------------- EBPG

def _maps(raw: torch.Tensor) -> LayerMaps:
    """LayerMaps of one layer whose raw map is already at the input size."""
    info = LayerInfo(name="c", module_name="c", call=1, order=0, type="Conv2d",
                     output_shape=(1, 1, *raw.shape[-2:]), params=0, params_total=0,
                     depth=0, layout="nchw")
    return LayerMaps(names=["c"], raw=[raw], input_size=tuple(raw.shape[-2:]), layers=[info])


def test_ebpg_equals_hand_computation():
    mask = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.bool)
    # a plain map: energy inside = (1 + 4) / (1 + 3 + 0 + 4)
    got = energy_pointing_game(torch.tensor([[[[1.0, 3.0], [0.0, 4.0]]]]), mask)
    assert got.shape == (1, 1) and got[0, 0] == pytest.approx(5 / 8)
    # from LayerMaps: the local-normalized map (x - 1) / 4 = [[.25, .5], [0, 1]]
    got = energy_pointing_game(_maps(torch.tensor([[[2.0, 3.0], [1.0, 5.0]]])), mask)
    assert got[0, 0] == pytest.approx(1.25 / 1.75, rel=1e-6)  # not 7/11 (raw values)
    # soft mask weights the energy; empty mask and zero map give NaN
    soft = torch.tensor([[[0.5, 0.0], [0.0, 1.0]]])
    assert energy_pointing_game(torch.tensor([[[[1.0, 3.0], [0.0, 4.0]]]]), soft)[0, 0] == \
        pytest.approx(4.5 / 8)
    two = energy_pointing_game(torch.tensor([[[[1.0, 3.0], [0.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]]]),
                               torch.stack([torch.zeros(2, 2), torch.ones(2, 2)]))
    assert np.isnan(two).all()
    with pytest.raises(CAManimError, match="resize the masks"):
        energy_pointing_game(torch.ones(1, 1, 2, 2), torch.ones(1, 3, 3))


def test_probe_without_mask_has_no_ebpg(tmp_path):
    x, y, m = data(n=8)
    cb = quick(x[:2], masks=[m[0], None], save_dir=tmp_path / "c")
    trainer(tmp_path, [cb], max_epochs=1).fit(Net(), loader(x, y))
    rows = read_csv(tmp_path / "c" / "ybroad.csv")
    # probe0 has EBPG (NaN only where a layer's map is all zero: no energy)
    assert any(r["ebpg"] for r in rows if r["probe"] == "probe0")
    assert not any(r["ebpg"] for r in rows if r["probe"] == "probe1")
    assert cb.ebpg_history("probe0")[0] == [0] and cb.ebpg_history("probe1")[0] == []


# --------------------------------------------------------------- memory

@pytest.mark.slow
def test_memory_flat_over_30_epochs(tmp_path):
    x, y, m = data(n=8)
    rss: dict[int, float] = {}

    class Rss(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            gc.collect()
            with open("/proc/self/statm") as f:
                rss[trainer.current_epoch] = int(f.read().split()[1]) * os.sysconf(
                    "SC_PAGE_SIZE") / 2**20

    cb = CAManimCallback(x[:1], masks=m[:1], normalization="local")
    logger = TensorBoardLogger(str(tmp_path / "runs"))
    trainer(tmp_path, [cb, Rss()], max_epochs=30, logger=logger,
            limit_train_batches=1).fit(Net(), loader(x, y))
    assert cb.epochs_done == list(range(30))
    growth = rss[29] - rss[9]
    print(f"RSS epoch 10: {rss[9]:.1f} MiB, epoch 30: {rss[29]:.1f} MiB, growth {growth:.1f} MiB")
    assert growth < 30, rss


# --------------------------------------------------------------- DDP

DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lit_models import Net, data, loader
from camanim.lightning.callback import CAManimCallback

if __name__ == "__main__":
    L.seed_everything(0)
    x, y, m = data(n=16)
    cb = CAManimCallback(x[:2], masks=m[:2], normalization="local")
    tr = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp",
                   callbacks=[cb], logger=TensorBoardLogger({root!r}), enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir={root!r})
    tr.fit(Net(), loader(x, y))
    with open(os.path.join({root!r}, "rank%d.json" % tr.global_rank), "w") as f:
        json.dump(dict(rank=tr.global_rank, world=tr.world_size, done=cb.epochs_done,
                       epoch=tr.current_epoch), f)
"""


@pytest.mark.slow
def test_ddp_two_processes_no_hang_no_duplicates(tmp_path):
    root = tmp_path / "ddp"
    root.mkdir()
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), root=str(root)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    t = time.time()
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=300, env=env, cwd=str(tmp_path))
    except subprocess.TimeoutExpired as e:  # a hang fails instead of blocking
        pytest.fail(f"DDP run hung (> 300 s): {e.stderr}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = {json.loads(p.read_text())["rank"]: json.loads(p.read_text())
             for p in root.glob("rank*.json")}
    assert set(ranks) == {0, 1} and ranks[0]["world"] == 2
    assert ranks[0]["done"] == [0, 1] and ranks[1]["done"] == []  # rank zero did the work
    assert ranks[1]["epoch"] == 2
    versions = list((root / "lightning_logs").iterdir())
    assert len(versions) == 1, versions
    d = versions[0]
    rows = read_csv(d / "ybroad.csv")
    keys = [(r["epoch"], r["probe"], r["layer_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * 2 * N_LAYERS
    assert len(list((d / "videos").iterdir())) == 2 * 2
    assert len(list(d.glob("events.out.tfevents.*"))) == 1
    assert len(list(root.rglob("ybroad.csv"))) == 1
    print(f"DDP run took {time.time() - t:.1f} s")


def test_target_callables_are_scored_as_given(tmp_path):
    """User score callables reach ybROAD unchanged (their `category` is not
    turned into a softmax class target); the scores equal ybroad's with the
    same callables."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    import camanim
    x, y, _ = data(n=8)
    targets = [ClassifierOutputTarget(2), ClassifierOutputTarget(1)]
    cb = quick(x[:2], targets=targets, road=RoadOptions(noise=0.0))
    model = Net()
    trainer(tmp_path, [cb], max_epochs=1).fit(model, loader(x, y))
    _, _, got = cb.road_history(0)
    maps = camanim.CAManim(model, "gradcam", "conv", progress=False)(x[:2], targets)
    want = camanim.ybroad(model, x[:2], maps, targets=targets, noise=0.0, progress=False)
    np.testing.assert_allclose(got[-1], want.scores[:, 0], rtol=1e-5, atol=1e-6)
    soft = camanim.ybroad(model, x[:2], maps, targets=[2, 1], noise=0.0, progress=False)
    assert not np.allclose(soft.scores[:, 0], want.scores[:, 0])
