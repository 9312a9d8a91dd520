"""CAManimCallback wired to the convergence metrics (issue 14): map change per
layer, chance ROAD, ranking tau, their CSV columns, TensorBoard tags and
scalars, continuity across resume, the sanity option; the heatmap / curve
options they use; `camanim study` on the new columns."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from scipy.stats import kendalltau

from camanim import CAManimError, LayerMaps, MediaOptions, RoadOptions
from camanim.lightning.callback import CAManimCallback
from camanim.lightning.convergence import epoch_scalars, epoch_text
from camanim.lightning.validation import check_sanity
from camanim.metrics.convergence import chance_road, map_change
from camanim.runs.history import CSV_COLUMNS, CSV_COLUMNS_V1, EpochRecord
from camanim.runs.study import read_ybroad_csv, study
from camanim.viz.plots import curve_image, heatmap_image
from lit_models import N_LAYERS, Net, data, loader, quick, read_csv, trainer

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # the nets' initial weights


def _f(s: str) -> float:
    return float(s) if s not in ("", None) else float("nan")


def _column(rows, probe, epoch, col):
    return np.array([_f(r[col]) for r in rows if r["probe"] == probe and int(r["epoch"]) == epoch])


# --------------------------------------------------------------- one run, read back

def test_csv_columns_tags_and_scalars_match_recomputation(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y, _ = data()
    cb = quick(x[:2], probe_names=["cat", "dog"], media=MediaOptions(save_maps=True))
    logger = TensorBoardLogger(str(tmp_path / "runs"), name="exp")
    model = Net()
    trainer(tmp_path, [cb], max_epochs=3, logger=logger).fit(model, loader(x, y))
    d = Path(logger.log_dir)
    rows = read_csv(d / "ybroad.csv")
    assert list(rows[0]) == list(CSV_COLUMNS) and len(rows) == 3 * 2 * N_LAYERS

    # map change: empty at the first epoch, then 1 - Spearman of the saved maps
    maps = [LayerMaps.load(d / "maps" / f"epoch{e:03d}.npz") for e in range(3)]
    for b, p in enumerate(("cat", "dog")):
        assert np.isnan(_column(rows, p, 0, "map_change")).all()
        for e in (1, 2):
            got = _column(rows, p, e, "map_change")
            want = map_change(maps[e - 1], maps[e])[:, b]
            # NaN (a constant map, e.g. all zero after ReLU) in both or neither
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
            ok = got[np.isfinite(got)]
            assert ok.size >= N_LAYERS - 1 and ((ok >= 0) & (ok <= 2)).all()

    # chance: the last epoch's model is the trained model; same percentiles/noise/seed/targets
    targets = torch.tensor([int(rows[0]["target"]), int(rows[N_LAYERS]["target"])])
    ref = chance_road(model, x[:2], targets, percentiles=cb.road.percentiles,
                      noise=cb.road.noise, seed=cb.seed, progress=False)
    for b, p in enumerate(("cat", "dog")):
        for k, col in enumerate(("road_chance_random", "road_chance_blob")):
            got = _column(rows, p, 2, col)
            assert np.unique(got).size == 1  # one value per epoch, repeated per layer
            assert got[0] == pytest.approx(float(ref.scores[k, b]), rel=1e-4, abs=1e-9)

    ea = EventAccumulator(str(d), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    ea.Reload()
    steps = [3, 6, 9]
    for p in ("cat", "dog"):
        assert [e.step for e in ea.Images(f"convergence/{p}/heatmap")] == steps
        settled = ea.Scalars(f"convergence/{p}/share_settled")
        assert [e.step for e in settled] == steps[1:]  # nothing to compare at epoch 0
        for e, ev in zip((1, 2), settled, strict=False):
            ch = _column(rows, p, e, "map_change")
            assert ev.value == pytest.approx(float((ch[np.isfinite(ch)] < 0.1).mean()))
        above = ea.Scalars(f"ybroad/{p}/above_chance")
        assert [e.step for e in above] == steps
        for e, ev in zip(range(3), above, strict=False):
            road, chance = _column(rows, p, e, "road"), _column(rows, p, e, "road_chance_random")
            assert ev.value == pytest.approx(float((road > chance[0]).mean()), abs=1e-6)
        epochs, _, mat = cb.road_history(p)
        taus = [e.value for e in ea.Scalars(f"ybroad/{p}/rank_tau")]
        want = [kendalltau(mat[i - 1], mat[i]).statistic for i in (1, 2)]
        np.testing.assert_allclose(taus, want, rtol=1e-5, atol=1e-7)
    mean = [e.value for e in ea.Scalars("ybroad/rank_tau_mean")]
    per = [[e.value for e in ea.Scalars(f"ybroad/{p}/rank_tau")] for p in ("cat", "dog")]
    np.testing.assert_allclose(mean, np.mean(per, axis=0), rtol=1e-5)
    text = ea.Tensors("camanim/cat/summary/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "above chance" in text and "map change since epoch 1" in text and "Kendall tau" in text
    assert (d / "heatmaps" / "cat_convergence.png").exists()


def test_switched_off_leaves_columns_empty_and_tags_out(tmp_path):
    x, y, _ = data(n=8)
    cb = quick(x[:1], save_dir=tmp_path / "c", convergence=False, road=RoadOptions(chance=False))
    trainer(tmp_path, [cb], max_epochs=2).fit(Net(), loader(x, y))
    rows = read_csv(tmp_path / "c" / "ybroad.csv")
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert all(r[c] == "" for r in rows for c in ("map_change", "road_chance_random",
                                                   "road_chance_blob"))
    assert all(r["road"] != "" for r in rows)
    assert "convergence" not in cb.last_timing and "chance" not in cb.last_timing
    assert not (tmp_path / "c" / "heatmaps" / "probe0_convergence.png").exists()
    # chance needs ROAD: road=False turns it off, the map change stays
    cb2 = quick(x[:1], save_dir=tmp_path / "d", road=False)
    trainer(tmp_path, [cb2], max_epochs=2).fit(Net(), loader(x, y))
    rows = read_csv(tmp_path / "d" / "ybroad.csv")
    assert all(r["road_chance_random"] == "" for r in rows)
    assert any(r["map_change"] != "" for r in rows if r["epoch"] == "1")


# --------------------------------------------------------------- nothing above chance

class _Blind(Net):
    """Ignores the image: every weight zero, a fixed bias for class 0; never trained."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
            self.f[-1].bias.copy_(torch.tensor([2.0, 0.0, -1.0]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_model_that_finds_the_class_at_no_layer_shows_nothing_above_chance(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y, _ = data(n=8)
    cb = quick(x[:2])
    logger = TensorBoardLogger(str(tmp_path / "runs"), name="blind")
    trainer(tmp_path, [cb], max_epochs=1, logger=logger).fit(_Blind(), loader(x, y))
    ea = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    ea.Reload()
    assert [e.value for e in ea.Scalars("ybroad/probe0/above_chance")] == [0.0]
    text = ea.Tensors("camanim/probe0/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "nothing above chance" in text and "no layer" in text


def test_epoch_text_and_scalars_from_a_record():
    rec = EpochRecord(global_step=9, names=["a", "b", "c"], method="gradcam",
                      targets={"p": 1}, road={"p": [0.1, 0.3, None]},
                      chance={"random": {"p": 0.2}, "blob": {"p": 0.25}},
                      change={"p": [0.05, 0.5, None]}, change_from=3,
                      rank_tau={"p": 0.5}, rank_tau_from=3)
    m = epoch_scalars(rec, ["p"], threshold=0.1)
    assert m["ybroad/p/above_chance"] == 0.5  # 0.3 beats 0.2; 0.1 does not; None unscored
    assert m["convergence/p/share_settled"] == 0.5 and m["ybroad/rank_tau_mean"] == 0.5
    assert m["ybroad/p/chance_blob"] == 0.25
    t = epoch_text(rec, "p", 0.1)
    assert "1 of 2 layers above chance" in t and "1 of 3 layers settled" in t
    rec.road = {"p": [0.1, 0.2, None]}  # equal to the chance line is not above it
    assert "nothing above chance" in epoch_text(rec, "p")
    assert epoch_scalars(rec, ["p"])["ybroad/p/above_chance"] == 0.0


# --------------------------------------------------------------- resume

def test_resume_keeps_the_map_change_continuous(tmp_path):
    x, y, _ = data(n=16)
    probes = x[:2]
    ck, save = tmp_path / "ckpt", tmp_path / "cam"
    mc = ModelCheckpoint(dirpath=ck, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    cb1 = quick(probes, save_dir=save, media=MediaOptions(save_maps=True))
    trainer(tmp_path, [cb1, mc], max_epochs=3, enable_checkpointing=True).fit(Net(), loader(x, y))

    # a checkpoint written after the epoch's work, resumed into a new folder: the state
    # in the checkpoint holds epoch 1's maps
    state = torch.load(ck / "epoch=1.ckpt", weights_only=True)["callbacks"][cb1.state_key]
    assert state["convergence"]["epoch"] == 1 and json.dumps(state)
    new = tmp_path / "new"
    cb2 = quick(probes, save_dir=new, media=MediaOptions(save_maps=True))
    trainer(tmp_path, [cb2], max_epochs=3).fit(Net(), loader(x, y),
                                               ckpt_path=str(ck / "epoch=1.ckpt"))
    rec = cb2._history[2]
    assert rec.change_from == 1
    want = map_change(LayerMaps.load(save / "maps" / "epoch001.npz"),
                      LayerMaps.load(new / "maps" / "epoch002.npz"))
    for b, p in enumerate(cb2.probe_names):
        np.testing.assert_allclose(np.array(rec.change[p], dtype=float), want[:, b],
                                   rtol=1e-6, atol=1e-9)


def test_resume_from_a_checkpoint_written_before_the_work(tmp_path):
    """A ModelCheckpoint saving at validation end holds epoch e - 1's maps and
    Lightning repeats epoch e: its change is against e - 1 again. A checkpoint
    without the maps (an older camanim) leaves that one change empty."""
    x, y, _ = data(n=16)
    probes = x[:2]
    ck, save = tmp_path / "ckpt", tmp_path / "cam"
    val = loader(x[:8], y[:8], shuffle=False)
    kw = dict(limit_val_batches=1, num_sanity_val_steps=0)
    mc = ModelCheckpoint(dirpath=ck, filename="{epoch}", save_top_k=-1, every_n_epochs=1,
                         save_on_train_epoch_end=False)
    cb1 = quick(probes, save_dir=save, media=MediaOptions(save_maps=True))
    trainer(tmp_path, [cb1, mc], max_epochs=3, enable_checkpointing=True, **kw).fit(
        Net(), loader(x, y), val)
    ckpt = torch.load(ck / "epoch=2.ckpt", weights_only=True)
    state = ckpt["callbacks"][cb1.state_key]
    assert state["convergence"]["epoch"] == 1 and [r["epoch"] for r in state["history"]] == [0, 1]

    cb2 = quick(probes, save_dir=save, media=MediaOptions(save_maps=True))
    with pytest.warns(UserWarning, match="already holds epoch 2"):
        trainer(tmp_path, [cb2], max_epochs=4, **kw).fit(Net(), loader(x, y), val,
                                                         ckpt_path=str(ck / "epoch=2.ckpt"))
    assert cb2.epochs_done == [0, 1, 2, 3]
    rec = cb2._history[2]  # epoch 2 repeated
    assert rec.change_from == 1 and rec.rank_tau_from == 1
    again = LayerMaps.load(save / "maps" / "epoch002.npz")
    want = map_change(LayerMaps.load(save / "maps" / "epoch001.npz"), again)
    for b, p in enumerate(cb2.probe_names):
        np.testing.assert_allclose(np.array(rec.change[p], dtype=float), want[:, b],
                                   rtol=1e-6, atol=1e-9)
    assert cb2._history[3].change_from == 2

    del state["convergence"]  # as written by an older camanim
    torch.save(ckpt, tmp_path / "old.ckpt")
    cb3 = quick(probes, save_dir=tmp_path / "other")
    trainer(tmp_path, [cb3], max_epochs=4, **kw).fit(Net(), loader(x, y), val,
                                                     ckpt_path=str(tmp_path / "old.ckpt"))
    assert cb3._history[2].change_from is None
    assert all(v is None for v in cb3._history[2].change["probe0"])
    assert cb3._history[3].change_from == 2
    rows = read_csv(tmp_path / "other" / "ybroad.csv")
    assert all(r["map_change"] == "" for r in rows if r["epoch"] in ("0", "2"))
    assert any(r["map_change"] != "" for r in rows if r["epoch"] == "1")  # restored history


def test_older_csv_is_appended_with_its_own_columns(tmp_path):
    x, y, _ = data(n=8)
    d = tmp_path / "c"
    d.mkdir()
    with open(d / "ybroad.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS_V1)
        for i in range(N_LAYERS):
            w.writerow([0, 1, "old", 0, "gradcam", i, f"f.{i}", 0.1, 0.1, 0.1, ""])
    cb = quick(x[:1], save_dir=d)
    with pytest.warns(UserWarning, match="older camanim"):
        trainer(tmp_path, [cb], max_epochs=1).fit(Net(), loader(x, y))
    with open(d / "ybroad.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == list(CSV_COLUMNS_V1) and {len(r) for r in lines} == {len(CSV_COLUMNS_V1)}
    assert len(lines) == 1 + 2 * N_LAYERS
    assert {s.probe for s in read_ybroad_csv(d / "ybroad.csv")} == {"old", "probe0"}


# --------------------------------------------------------------- sanity option

def test_sanity_at_fit_start_and_end(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y, _ = data(n=8)
    cb = quick(x[:2], road=False, sanity="start,end")
    logger = TensorBoardLogger(str(tmp_path / "runs"), name="s")
    model = Net()
    trainer(tmp_path, [cb], max_epochs=1, logger=logger).fit(model, loader(x, y))
    d = Path(logger.log_dir)
    for when in ("start", "end"):
        rep = json.loads((d / f"sanity_{when}.json").read_text())
        assert len(rep["layers"]) == N_LAYERS and rep["blocks"]
        assert (d / f"sanity_{when}.png").stat().st_size > 0
    ea = EventAccumulator(str(d), size_guidance={"tensors": 0})
    ea.Reload()
    assert {"camanim/sanity/start/text_summary", "camanim/sanity/end/text_summary"} \
        <= set(ea.Tags()["tensors"])
    assert check_sanity(None) == () and check_sanity(["end", "start"]) == ("start", "end")
    for bad in ("middle", "start,later", 3):
        with pytest.raises(CAManimError, match="sanity must be"):
            CAManimCallback(x[:1], sanity=bad)
    with pytest.raises(CAManimError, match="settle_threshold"):
        CAManimCallback(x[:1], settle_threshold=0)


# --------------------------------------------------------------- pictures

def test_heatmap_mask_scale_and_curve_chance_line():
    road = np.array([[0.1, -0.2, 0.3], [0.2, 0.0, -0.1]])
    names = ["a", "b", "c"]
    plain = heatmap_image(road, [0, 1], names)
    assert np.array_equal(plain, heatmap_image(road, [0, 1], names, mask=np.zeros((2, 3), bool)))
    mask = np.zeros((2, 3), bool)
    mask[1, 2] = True
    hatched = heatmap_image(road, [0, 1], names, mask=mask)
    diff = np.argwhere((hatched != plain).any(-1))
    assert diff.size and (hatched[tuple(diff.T)] == (70, 70, 70)).all()  # only hatch pixels
    # a fixed scale changes the colours, not the layout; the default colours carry
    # their own legend line (HEATMAP_NOTE, about green cells), other colours none:
    # compare with the default picture drawn without its legend
    fixed = heatmap_image(road, [0, 1], names, cmap="YlOrRd", vmin=0.0, vmax=1.0, mark_best=False)
    bare = heatmap_image(road, [0, 1], names, note=None)
    assert plain.shape[0] > bare.shape[0] and plain.shape[1] == bare.shape[1]
    assert fixed.shape == bare.shape and not np.array_equal(fixed, bare)
    curve = curve_image(road[0], names)
    with_line = curve_image(road[0], names, chance=0.05)
    red = (with_line == (214, 39, 40)).all(-1)
    assert red.sum() > 20 and not (curve == (214, 39, 40)).all(-1).any()
    high = curve_image(road[0], names, chance=5.0)  # the axis stretches to show the line
    assert (high == (214, 39, 40)).all(-1).sum() > 20


# --------------------------------------------------------------- study

NAMES = ["conv1", "layer1", "layer2"]


def _write_run(path: Path, road, change, chance) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for e, (row, ch, (cr, cbl)) in enumerate(zip(road, change, chance, strict=False)):
            for i, n in enumerate(NAMES):
                w.writerow([e, e + 1, "p0", 1, "gradcam", i, n, row[i], np.mean(row), max(row),
                            "", "" if ch[i] is None else ch[i], cr, cbl])
    return path


def test_study_summarizes_settle_epochs_chance_and_tau(tmp_path):
    road = [[0.1, 0.2, 0.3], [0.3, 0.1, 0.2], [0.3, 0.2, 0.4], [0.1, 0.3, 0.5]]
    change = [[None] * 3, [0.5, 0.05, 0.4], [0.05, 0.3, 0.02], [0.04, 0.08, 0.01]]
    chance = [(0.35, 0.0), (0.15, 0.1), (0.25, 0.1), (0.2, 0.1)]
    _write_run(tmp_path / "run" / "ybroad.csv", road, change, chance)
    out = tmp_path / "out"
    rows = study([tmp_path / "run"], out=out, verbose=False)
    r = rows[0]
    # settle epochs: conv1 from 2, layer1 from 3 (0.3 at epoch 2), layer2 from 2
    with open(out / "settle.csv", newline="") as f:
        settle = {s["layer_name"]: s["settle_epoch"] for s in csv.DictReader(f)}
    assert settle == {"conv1": "2", "layer1": "3", "layer2": "2"}
    assert r["layers_settled"] == 3 and r["all_settled_epoch"] == 3
    with open(out / "epochs.csv", newline="") as f:
        per = list(csv.DictReader(f))
    above = [float(p["above_chance"]) for p in per]
    np.testing.assert_allclose(above, [0.0, 2 / 3, 2 / 3, 2 / 3], atol=1e-4)
    assert r["above_chance"] == pytest.approx(2 / 3)
    want_tau = [kendalltau(road[e - 1], road[e]).statistic for e in (1, 2, 3)]
    assert per[0]["rank_tau"] == ""
    np.testing.assert_allclose([float(p["rank_tau"]) for p in per[1:]], want_tau, atol=1e-4)
    assert r["rank_tau_last"] == pytest.approx(want_tau[-1])
    assert r["rank_tau_mean"] == pytest.approx(np.mean(want_tau))
    assert float(per[1]["share_settled"]) == pytest.approx(1 / 3, abs=1e-4)
    pngs = {p.name for p in out.glob("*.png")}
    assert {"convergence_run_p0.png", "chance_tau.png", "heatmap_run_p0.png"} <= pngs


def test_study_reads_a_csv_without_the_new_columns(tmp_path):
    p = tmp_path / "old" / "ybroad.csv"
    p.parent.mkdir()
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS_V1)
        for e in range(2):
            for i, n in enumerate(NAMES):
                w.writerow([e, e, "p0", 1, "gradcam", i, n, 0.1 * (i + e), 0.1, 0.2, ""])
    rows = study([tmp_path / "old"], out=tmp_path / "o", verbose=False)
    assert rows[0]["layers_settled"] is None and np.isnan(rows[0]["above_chance"])
    assert rows[0]["rank_tau_last"] == pytest.approx(1.0)  # tau needs only the ROAD column
    with open(tmp_path / "o" / "settle.csv") as f:
        assert len(list(csv.reader(f))) == 1  # header only
