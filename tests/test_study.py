"""`camanim study`: ybroad.csv files of several runs -> heatmaps, best-layer
trajectories and a comparison table."""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from camanim import CAManimError
from camanim.cli.study import add_study_parser, main
from camanim.runs.history import CSV_COLUMNS
from camanim.runs.study import read_ybroad_csv, settle_epoch, study

NAMES = ["conv1", "layer1", "layer2"]


def write_run(path: Path, scores: dict[str, list[list[float]]], method: str = "gradcam",
              ebpg: float | None = None, epochs: list[int] | None = None) -> Path:
    """A ybroad.csv in the callback's format: scores[probe][epoch][layer]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS[:11])  # the columns these rows have (an older file)
        for probe, per_epoch in scores.items():
            for k, row in enumerate(per_epoch):
                e = epochs[k] if epochs else k
                for i, (n, r) in enumerate(zip(NAMES, row, strict=False)):
                    w.writerow([e, 10 * (e + 1), probe, 1, method, i, n, r,
                                np.mean(row), max(row), "" if ebpg is None else ebpg])
    return path


# best layers per epoch: p0 -> 0, 2, 2, 1, 1 (settles at epoch 3); p1 -> 2 always
P0 = [[0.5, 0.1, 0.2], [0.1, 0.2, 0.6], [0.0, 0.3, 0.7], [0.1, 0.8, 0.2], [0.2, 0.9, 0.4]]
P1 = [[0.1, 0.2, 0.3]] * 5


def test_settle_epoch():
    assert settle_epoch([0, 1, 2, 3, 4], [3, 5, 5, 4, 4]) == 3
    assert settle_epoch([0, 1, 2], [2, 2, 2]) == 0
    assert settle_epoch([1, 3, 5], [0, 1, 1]) == 3  # epochs need not be contiguous
    assert settle_epoch([0, 1, 2], [1, 2, 1]) == 2
    assert settle_epoch([], []) is None


def test_study_two_runs_table_and_plots(tmp_path, capsys):
    a = write_run(tmp_path / "runA" / "ybroad.csv", {"p0": P0, "p1": P1}, ebpg=0.25)
    b = write_run(tmp_path / "runB" / "lightning_logs" / "version_0" / "ybroad.csv",
                  {"p0": P1[:3]}, method="layercam")
    out = tmp_path / "out"
    rc = main([str(tmp_path / "runA"), str(tmp_path / "runB"), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "settle_epoch" in printed and "runB/lightning_logs/version_0" in printed
    with open(out / "study.csv", newline="") as f:
        rows = {(r["run"], r["probe"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("runA", "p0"), ("runA", "p1"), ("runA", "mean"),
                         ("runB/lightning_logs/version_0", "p0")}
    r = rows[("runA", "p0")]
    assert int(r["settle_epoch"]) == 3 and r["best_layer"] == "layer1"
    assert int(r["best_index"]) == 1 and int(r["final_epoch"]) == 4 and int(r["epochs"]) == 5
    assert float(r["final_mean"]) == pytest.approx(0.5, abs=1e-4)
    assert float(r["final_max"]) == pytest.approx(0.9, abs=1e-4)
    assert float(r["final_layer_road"]) == pytest.approx(0.4, abs=1e-4)
    assert float(r["ebpg_best"]) == pytest.approx(0.25)
    assert int(rows[("runA", "p1")]["settle_epoch"]) == 0
    m = rows[("runA", "mean")]  # mean of p0 and p1 at the last epoch: .15, .55, .35
    assert m["best_layer"] == "layer1" and float(m["final_max"]) == pytest.approx(0.55, abs=1e-4)
    rb = rows[("runB/lightning_logs/version_0", "p0")]
    assert rb["method"] == "layercam" and rb["ebpg_best"] == ""
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "best_layer.png" in pngs
    assert "heatmap_runA_gradcam_p0.png" in pngs and "heatmap_runA_gradcam_mean.png" in pngs
    assert len(pngs) == 1 + 4
    for p in out.glob("*.png"):
        with Image.open(p) as im:
            assert im.size[0] > 200 and im.size[1] > 150
    # the heatmap is the image the callback logs: a 5-epoch one is wider than a 3-epoch one
    wa = Image.open(out / "heatmap_runA_gradcam_p0.png").size[0]
    wb = Image.open(out / "heatmap_runB__lightning_logs__version_0_layercam_p0.png").size[0]
    assert wa > wb
    assert a.exists() and b.exists()


def test_read_keeps_last_duplicate_and_drops_other_layer_lists(tmp_path):
    p = write_run(tmp_path / "r" / "ybroad.csv", {"p0": P0[:2]})
    with open(p, "a", newline="") as f:  # epoch 1 again, with other values
        w = csv.writer(f)
        for i, n in enumerate(NAMES):
            w.writerow([1, 20, "p0", 1, "gradcam", i, n, [0.9, 0.0, 0.0][i], 0.3, 0.9, ""])
    (s,) = read_ybroad_csv(p)
    assert s.epochs == [0, 1] and s.names == NAMES
    np.testing.assert_allclose(s.road[1], [0.9, 0.0, 0.0])
    assert list(s.best_layers()) == [0, 0] and s.ebpg is None


def test_study_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no ybroad.csv under" in capsys.readouterr().err
    bad = tmp_path / "bad" / "ybroad.csv"
    bad.parent.mkdir()
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(CAManimError, match="not a camanim ybroad.csv"):
        study([bad], out=tmp_path / "o")


def test_add_study_parser_plugs_into_a_cli(tmp_path):
    write_run(tmp_path / "run" / "ybroad.csv", {"p0": P0})
    parser = argparse.ArgumentParser(prog="camanim")
    add_study_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["study", str(tmp_path / "run"), "-o", str(tmp_path / "o"),
                              "--probe", "p0", "--no-plots"])
    assert args.func(args) == 0
    assert (tmp_path / "o" / "study.csv").exists() and not list((tmp_path / "o").glob("*.png"))


def test_study_reads_what_the_callback_wrote(tmp_path):
    """End to end: two short runs with the callback (two CAM methods), then
    the study of both."""
    import lightning as L

    from camanim.lightning.callback import CAManimCallback
    from lit_models import Net, data, loader, trainer

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y, m = data(n=8)
        for method in ("gradcam", "layercam"):
            L.seed_everything(0)
            cb = CAManimCallback(x[:2], masks=m[:2], method=method, log_videos=False,
                                 save_videos=False, save_dir=tmp_path / "runs" / method)
            trainer(tmp_path, [cb], max_epochs=2).fit(Net(), loader(x, y))
    finally:
        torch.set_num_threads(n)
    rows = study([tmp_path / "runs"], out=tmp_path / "out", verbose=False)
    got = {(r["run"], r["method"], r["probe"]) for r in rows}
    assert got == {(f"runs/{mth}", mth, p) for mth in ("gradcam", "layercam")
                   for p in ("probe0", "probe1", "mean")}
    for r in rows:
        assert r["epochs"] == 2 and r["layers"] == 4 and r["final_epoch"] == 1
        assert math.isfinite(r["final_max"]) and r["best_layer"]
        assert r["settle_epoch"] in (0, 1)
    assert len(list((tmp_path / "out").glob("heatmap_*.png"))) == 6


def test_camanim_command_has_the_study_subcommand(tmp_path):
    from camanim.cli import main as camanim_main
    write_run(tmp_path / "run" / "ybroad.csv", {"p0": P0})
    assert camanim_main(["study", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "study.csv").exists()
    assert camanim_main(["study", str(tmp_path / "nothing-here")]) == 2
