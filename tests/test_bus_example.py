"""examples/finetune_bus/train.py end to end: CLI, weights loading, a tiny
training run as a script, split re-use, and (slow) that it learns."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune_bus" / "train.py"
sys.path.insert(0, str(ROOT / "examples"))
from finetune_bus import model as bm  # noqa: E402 - after the sys.path set-up above
from finetune_bus import train  # noqa: E402 - after the sys.path set-up above


@pytest.fixture
def one_thread():
    """Train with one intra-op thread, restored afterwards.  On a busy 2-core
    machine two OpenMP threads spin-wait for each other and the same run
    takes 5-7x longer (measured: 32 s vs 222 s for the learnability test)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = ["--arch", "resnet18", "--image-size", "64", "--limit", "24", "--epochs", "1",
        "--batch-size", "8", "--no-progress", "--cam-probes", "2", "--cam-max-layers", "4"]


def test_help_explains_every_flag():
    parser = train.build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    names = {o for a in flags for o in a.option_strings}
    for required in (
        "--data-dir",
        "--include-benign",
        "--split-file",
        "--image-size",
        "--epochs",
        "--limit",
        "--batch-size",
        "--num-workers",
        "--seed",
        "--accelerator",
        "--arch",
        "--threads",
        "--weights",
        "--out",
        "--lr",
        "--monitor",
    ):
        assert required in names
    for a in flags:
        assert a.help and len(a.help) > 15, f"{a.option_strings} has no real help"
    text = parser.format_help()
    # how to get the paper's settings
    assert "--image-size 224" in text and "--weights imagenet" in text


def test_args_validation_and_lr_default(capsys):
    assert train.parse_args([]).lr == pytest.approx(1e-3)
    assert train.parse_args(["--weights", "imagenet"]).lr == pytest.approx(1e-4)
    assert train.parse_args(["--weights", "imagenet", "--lr", "0.01"]).lr == pytest.approx(0.01)
    for bad, why in ((["--image-size", "16"], "--image-size must be at least 32"),
                     (["--limit", "3"], "--limit must be at least 6"),
                     (["--epochs", "0"], "--epochs must be at least 1"),
                     (["--arch", "vgg16"], "--arch must be one of resnet50, resnet18, "
                                           "resnet34, resnet101 or timm:NAME, got 'vgg16'")):
        with pytest.raises(SystemExit, match="^2$"):       # argparse's usage-error status
            train.parse_args(bad)
        assert why in capsys.readouterr().err


def test_best_checkpoint_default_and_ties_go_to_the_later_epoch(tmp_path):
    args = train.parse_args(["--no-cam"])
    assert args.monitor == "val_loss"                    # cannot saturate on a few images
    args = train.parse_args(["--no-cam", "--monitor", "val_auroc"])
    args.run_dir = tmp_path
    ckpt = train.build_callbacks(args, None)[0]
    ckpt.best_k_models = {"epoch0.ckpt": torch.tensor(1.0)}
    ckpt.kth_best_model_path = "epoch0.ckpt"

    class _Strategy:
        @staticmethod
        def reduce_boolean_decision(x):
            return x

    class _Trainer:
        strategy = _Strategy()

    assert ckpt.check_monitor_top_k(_Trainer(), torch.tensor(1.0))        # a tie: the later
    assert not ckpt.check_monitor_top_k(_Trainer(), torch.tensor(0.9))
    assert ckpt.check_monitor_top_k(_Trainer(), torch.tensor(1.0 + 1e-6)) is True


def test_help_archs_match_the_model():
    assert train.ARCHS == bm.ARCHS


def test_callbacks_checkpoint_and_camanim(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    import camanim
    args = train.parse_args(["--monitor", "val_loss", "--no-cam"])
    args.run_dir = tmp_path
    cbs = train.build_callbacks(args, None)
    assert len(cbs) == 1 and isinstance(cbs[0], ModelCheckpoint)
    assert cbs[0].monitor == "val_loss" and cbs[0].mode == "min"
    assert Path(cbs[0].dirpath) == tmp_path / "checkpoints" and cbs[0].filename.startswith("best-")

    args = train.parse_args(
        TINY + ["--cam-probes", "3", "--cam-max-layers", "5", "--cam-every", "2"]
    )
    args.run_dir = tmp_path
    dm = train.build_datamodule(args)
    cbs = train.build_callbacks(args, dm)
    cam = [c for c in cbs if isinstance(c, camanim.CAManimCallback)]
    assert len(cam) == 1
    assert cam[0].every_n_epochs == 2 and len(cam[0].probe_names) == 3
    assert cam[0].probe_names[0].startswith("malignant_")     # malignant probes first


class _FakeWeights:
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"

    def get_state_dict(self, **kw):
        raise urllib.error.URLError("no network")


def test_imagenet_weights_missing_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(bm, "imagenet_weights", lambda arch: _FakeWeights())
    with pytest.raises(bm.WeightsUnavailable, match="--weights none") as e:
        bm.build_backbone("resnet18", 2, "imagenet")
    msg = str(e.value)
    assert "--weights none" in msg and "TORCH_HOME" in msg
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in msg
    # the script stops with that message instead of a traceback
    with pytest.raises(SystemExit, match="--weights none") as se:
        train.main(TINY + ["--weights", "imagenet", "--out", str(tmp_path / "runs")])
    assert "--weights none" in str(se.value.code)


def test_imagenet_weights_read_from_torch_cache(tmp_path, monkeypatch):
    """The real loading path, offline: a state dict placed where torch.hub
    caches torchvision's ImageNet weights is loaded, the head replaced."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = bm.weights_cache_path("resnet18")
    assert path.parent == tmp_path / "hub" / "checkpoints"
    import torchvision
    torch.manual_seed(123)
    ref = torchvision.models.resnet18(num_classes=1000)
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    net = bm.build_backbone("resnet18", 3, "imagenet")
    assert torch.equal(net.conv1.weight, ref.conv1.weight)
    assert torch.equal(net.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)
    assert net.fc.out_features == 3
    # the same file passed as a path
    net2 = bm.build_backbone("resnet18", 2, str(path))
    assert torch.equal(net2.conv1.weight, ref.conv1.weight) and net2.fc.out_features == 2
    with pytest.raises(bm.WeightsUnavailable, match=r"nope\.pth: no such file"):
        bm.build_backbone("resnet18", 2, str(tmp_path / "nope.pth"))


def test_busi_layout_error_stops_the_script(tmp_path):
    (tmp_path / "wrong").mkdir()
    with pytest.raises(SystemExit, match="Dataset_BUSI_with_GT") as e:
        train.main(TINY + ["--data-dir", str(tmp_path / "wrong"), "--out", str(tmp_path / "runs")])
    assert "Dataset_BUSI_with_GT" in str(e.value.code)


def _check_run(run: Path, out: Path, stdout: str) -> dict:
    best = list((run / "checkpoints").glob("best-epoch*-loss*.ckpt"))
    assert len(best) == 1 and (run / "checkpoints" / "last.ckpt").is_file()
    ck = torch.load(best[0], map_location="cpu", weights_only=False)
    assert any(k.startswith("model.layer4.") for k in ck["state_dict"])
    assert list(run.glob("events.out.tfevents.*"))
    split = json.loads((run / "split.json").read_text())
    assert split["source"] == "synthetic" and split["seed"] == 0
    assert split["counts"] == {"train": 18, "val": 3, "test": 3}
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert {"test_acc", "test_auroc", "test_loss"} <= set(metrics["test"])
    assert metrics["checkpoint"] == str(best[0])
    assert f"tensorboard --logdir {out} --samples_per_plugin images=100" in stdout
    assert "test (best checkpoint" in stdout
    return split


def test_smoke_end_to_end(tmp_path, capsys, one_thread):
    """Tiny settings: checkpoint, TensorBoard scalars, split and metrics
    files; then a second run re-uses the split file."""
    out = tmp_path / "runs"
    res = train.main(TINY + ["--out", str(out)])
    run = out / "finetune_bus" / "version_0"
    assert res["run_dir"] == run and res["best_checkpoint"]
    printed = capsys.readouterr().out
    split = _check_run(run, out, printed)

    # the CAManim callback's outputs: videos per probe/epoch/norm, ybROAD CSV,
    # heatmaps, GIFs in TensorBoard, and `camanim explain` on the best checkpoint
    import csv

    import imageio.v3 as iio
    videos = sorted((run / "videos").glob("*.mp4"))
    assert len(videos) == 2 * 2            # 2 probes x (local, global), one epoch
    frames = list(iio.imiter(videos[0]))
    assert len(frames) == 4 and frames[0].std() > 0                  # --cam-max-layers 4
    rows = list(csv.DictReader((run / "ybroad.csv").open()))
    assert len(rows) == 2 * 4 and {r["epoch"] for r in rows} == {"0"}
    assert all(r["ebpg"] != "" for r in rows)                       # masks came with the probes
    assert len(list((run / "heatmaps").glob("*.png"))) == 2 * 2   # ybROAD + map change per probe
    explain = run / "explain"
    assert list(explain.glob("malignant_*_local.mp4")) and list(explain.glob("*_contact_sheet.png"))
    assert list(explain.glob("*_ybroad.csv"))
    # the checkpoint carries the input settings; explain used them and the malignant class
    from camanim import checkpoint_meta

    meta = checkpoint_meta(res["best_checkpoint"])
    assert meta.image_size == (64, 64) and meta.class_names == ("normal", "malignant")
    assert meta.mean == pytest.approx((0.485, 0.456, 0.406)) and meta.std is not None
    summary = json.loads(next(explain.glob("*_summary.json")).read_text())
    assert summary["input_size"] == [64, 64] and summary["target_name"] == "malignant"
    assert summary["layers"] == 4                                    # --cam-max-layers 4
    assert "tensorboard --logdir" in printed and "--samples_per_plugin images=100" in printed
    # `camanim report` at the end: the viewer of every layer at every epoch, one HTML file
    assert res["outputs"]["CAManim report"] == str(run / "report.html")
    assert "CAManimViewer.start" in (run / "report.html").read_text()
    assert "$ camanim report" in printed and "CAManim tab" in printed

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = set()
    for ev in run.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(ev))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | set(acc.Tags()["images"])
    assert {"train_loss_epoch", "train_acc", "val_acc", "val_auroc", "val_loss"} <= tags
    assert any(t.startswith("camanim/malignant_") and t.endswith("/local_global") for t in tags)
    assert any(t.startswith("ybroad/") and t.endswith("/mean") for t in tags)

    # --split-file (and another seed): exactly that split
    res2 = train.main(
        TINY + ["--seed", "7", "--split-file", str(run / "split.json"), "--out", str(out)]
    )
    assert res2["run_dir"] == out / "finetune_bus" / "version_1"
    split2 = json.loads((res2["run_dir"] / "split.json").read_text())
    assert all(split2[k] == split[k] for k in ("train", "val", "test"))


def test_same_seed_same_run(tmp_path, one_thread):
    a = train.main(TINY + ["--out", str(tmp_path / "a")])
    b = train.main(TINY + ["--out", str(tmp_path / "b")])
    c = train.main(TINY + ["--seed", "1", "--out", str(tmp_path / "c")])
    assert a["test"] == b["test"] and a["val"] == b["val"]
    assert a["test"]["test_loss"] != c["test"]["test_loss"]


def test_runs_as_a_script_from_the_repo_root():
    proc = subprocess.run([sys.executable, "examples/finetune_bus/train.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--image-size" in proc.stdout and "--weights" in proc.stdout


def test_script_trains_end_to_end(tmp_path):
    """``python examples/finetune_bus/train.py`` (script mode), tiny settings."""
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--threads", "1", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_run(out / "finetune_bus" / "version_0", out, proc.stdout)


@pytest.mark.slow
def test_learns_well_above_chance_and_localizes(tmp_path, one_thread):
    """A short run from random weights on the synthetic set: validation and
    test accuracy far above the majority-class rate (~0.61); and on the
    malignant probes, the map of the best-ybROAD layer puts more of its
    energy inside the lesion mask than a uniform map would (EBPG above the
    mask's area fraction)."""
    import csv
    args = ["--arch", "resnet18", "--image-size", "96", "--limit", "200", "--epochs", "5",
            "--no-progress", "--out", str(tmp_path / "runs"), "--cam-probes", "3",
            "--cam-max-layers", "8", "--no-explain"]
    res = train.main(args)
    assert res["val"]["val_acc"] >= 0.8, res["val"]          # 20 validation images
    assert res["test"]["test_auroc"] >= 0.9, res["test"]     # 20 test images, best checkpoint
    assert res["test"]["test_acc"] >= 0.75, res["test"]

    dm = train.build_datamodule(train.parse_args(args))
    probes = dm.probes(n=3, part="test")
    rows = list(csv.DictReader((res["run_dir"] / "ybroad.csv").open()))
    last = max(int(r["epoch"]) for r in rows)
    ebpg, areas = [], []
    for b, label in enumerate(probes["label"].tolist()):
        if dm.classes[label] != "malignant":
            continue
        name = [r for r in rows if r["layer_index"] == "0" and int(r["epoch"]) == last][b]["probe"]
        mine = [r for r in rows if r["probe"] == name and int(r["epoch"]) == last]
        best = max(mine, key=lambda r: float(r["road"]))
        ebpg.append(float(best["ebpg"]))
        areas.append(float(probes["mask"][b].float().mean()))
    assert len(ebpg) >= 2
    # on average over the malignant probes (one probe can miss on a 5-epoch run)
    assert sum(ebpg) / len(ebpg) > sum(areas) / len(areas), (ebpg, areas)
