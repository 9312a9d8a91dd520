"""Issue 13: nothing lost, nothing fake. Kills, full disks, torn CSVs,
broken models and bad command-line outputs."""

from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from camanim import CAManimError
from camanim.cli import main as cli_main
from camanim.core.files import atomic_path, remove_stale, write_text
from camanim.lightning.callback import CAManimCallback
from camanim.lightning.options import MediaOptions, VideoOptions
from camanim.runs.history import EpochRecord, History, repair_csv
from camanim.runs.study import read_ybroad_csv
from camanim.viz.plots import save_png
from camanim.viz.video import iter_video, write_frames

HERE = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def leftovers(root: Path) -> list[Path]:
    """Temporary files of ours under ``root``."""
    return [p for p in root.rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")
            or ".tmp." in p.name]


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------- a small full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only; skipped where it cannot be mounted)."""
    d = tmp_path / "disk"
    d.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}); "
                    "the injected-ENOSPC tests cover the CSV")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(disk: Path) -> Path:
    """Fill ``disk`` up; returns the filler file (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def frames(n=6, h=64, w=96, seed=0):
    g = np.random.default_rng(seed)
    return [g.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n)]


# --------------------------------------------------------------- writers

def test_failing_ffmpeg_leaves_nothing_and_its_message_is_kept(tmp_path, monkeypatch, capfd):
    """An encoder that writes some bytes and exits 1: no file under the final
    name, no temporary file, ffmpeg's message in the error, not on the console."""
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\nfor a; do out=$a; done\nhead -c 100 > /dev/null\n"
                    "printf 'garbage' > \"$out\"\necho 'Error: boom, disk on fire' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr("imageio_ffmpeg.get_ffmpeg_exe", lambda: str(fake))
    target = tmp_path / "v" / "clip.mp4"
    with pytest.raises(CAManimError, match=r"ffmpeg .*status 1.*boom, disk on fire"):
        write_frames(target, frames())
    assert not target.exists() and leftovers(tmp_path / "v") == []
    assert "boom" not in capfd.readouterr().err


def test_full_disk_leaves_no_truncated_file(small_disk):
    fill(small_disk)
    out = small_disk / "o"
    with pytest.raises(CAManimError, match=r"could not write .*clip\.mp4: ffmpeg"):
        write_frames(out / "clip.mp4", frames(n=8, h=256, w=256))
    with pytest.raises(OSError, match="No space left on device"):
        save_png(out / "heat.png", frames(1, 512, 512)[0])
    with pytest.raises(OSError, match="No space left on device"):
        write_text(out / "summary.json", "x" * 400_000)
    with pytest.raises(CAManimError, match=r"could not write .*clip\.gif"):
        write_frames(out / "clip.gif", frames(n=4, h=256, w=256))
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == [], left       # nothing under a final name, no temporary file


def test_stale_temporaries_removed_at_start(tmp_path):
    d = tmp_path / "videos"
    d.mkdir()
    dead = d / ".probe0_epoch001_local.mp4.999999999.partial.mp4"
    alive = d / f".probe1_epoch001_local.mp4.{os.getppid()}.partial.mp4"
    legacy = d / "probe0.png.tmp"
    frames_dir = d / ".x.999999999.partial"
    for p in (dead, alive, legacy):
        p.write_bytes(b"half")
    frames_dir.mkdir()
    (d / "keep.mp4").write_bytes(b"ok")
    removed = remove_stale([d])
    assert sorted(removed) == sorted([dead, legacy, frames_dir])
    assert alive.exists() and (d / "keep.mp4").exists()


def test_atomic_path_cleans_up_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------- CSV

def _record(step, names, road, targets):
    return EpochRecord(global_step=step, names=names, method="gradcam", targets=targets,
                       road=road, ebpg=None)


def _history(epochs, probes=("a", "b"), layers=("l0", "l1", "l2")):
    h = History(list(probes))
    for e in epochs:
        h[e] = _record(e * 10, list(layers),
                       {p: [0.001 * (e + 1) + 0.0001 * i + 0.01 * k for i in range(len(layers))]
                        for k, p in enumerate(probes)}, {p: 1 for p in probes})
    return h


def _keys(path):
    return [(r["epoch"], r["probe"], r["layer_index"]) for r in csv_rows(path)]


def test_csv_enospc_injected_cut_back_and_retried(tmp_path, monkeypatch):
    """A full disk mid-append (half the bytes written, then ENOSPC): the
    fragment is cut off, the epoch counts as not written and goes out with
    the next epoch's rows once space returns."""
    h = _history([0])
    h.write_csv(tmp_path, 0, "gradcam")
    before = (tmp_path / "ybroad.csv").read_bytes()
    real_write = os.write
    full = {"on": True}

    def write(fd, data):
        if full["on"] and os.readlink(f"/proc/self/fd/{fd}").endswith("ybroad.csv"):
            real_write(fd, bytes(data[:len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    h[1] = _history([1])[1]
    with pytest.raises(CAManimError, match=r"epoch\(s\) \[1\].*No space left on device"):
        h.write_csv(tmp_path, 1, "gradcam")
    assert (tmp_path / "ybroad.csv").read_bytes() == before   # no fragment left
    full["on"] = False
    h[2] = _history([2])[2]
    h.write_csv(tmp_path, 2, "gradcam")
    keys = _keys(tmp_path / "ybroad.csv")
    assert len(keys) == len(set(keys)) == 3 * 2 * 3
    assert sorted({int(k[0]) for k in keys}) == [0, 1, 2]


def test_torn_csv_is_repaired_and_study_reads_no_glued_row(tmp_path, capsys):
    h = _history([0, 1])
    h.write_csv(tmp_path, 1, "gradcam")
    path = tmp_path / "ybroad.csv"
    good = csv_rows(path)
    data = path.read_bytes()
    path.write_bytes(data[:-9])                     # an append cut short: a torn last line
    # `camanim study` on the torn file: the torn row is skipped and counted
    rc = cli_main(["study", str(path), "--out", str(tmp_path / "s1"), "--no-plots"])
    err = capsys.readouterr().err
    assert rc == 0 and "malformed" in err and "torn" in err
    series = {s.probe: s for s in read_ybroad_csv(path)}
    np.testing.assert_allclose(series["a"].road, [[float(r["road"]) for r in good[i:i + 3]]
                                                  for i in (0, 6)])
    assert series["b"].epochs == [0]                # b's epoch 1 is incomplete: left out
    # a new run opening the file cuts the torn line off and fills in only what is missing
    h2 = _history([0, 1, 2])
    with pytest.warns(UserWarning, match="torn line"):
        h2.write_csv(tmp_path, 2, "gradcam")
    keys = _keys(path)
    assert len(keys) == len(set(keys)) == 3 * 2 * 3
    assert path.read_bytes().endswith(b"\n")
    assert repair_csv(path) == 0
    # an old-style glued row (fragment + next row) is skipped, never read as a number
    lines = path.read_text().splitlines(keepends=True)
    glued = lines[:3] + [lines[3].rstrip("\n")[:-12] + lines[4]] + lines[5:]
    bad = tmp_path / "glued" / "ybroad.csv"
    bad.parent.mkdir()
    bad.write_text("".join(glued))
    rc = cli_main(["study", str(bad), "--out", str(tmp_path / "s2"), "--no-plots"])
    err = capsys.readouterr().err
    assert rc == 0 and "skipped 1 malformed row" in err
    for s in read_ybroad_csv(bad):
        finite = s.road[np.isfinite(s.road)]
        assert finite.size and (finite < 0.1).all()     # real values are ~1e-3..1e-2


# --------------------------------------------------------------- kills and resume

def _child(root, epochs, *extra):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, str(HERE / "fault_child.py"), str(root),
                             str(epochs), *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _kill_when(proc, found, timeout=240):
    t = time.time() + timeout
    while time.time() < t:
        if found():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the kill point:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("kill point never reached")


def _csv_holds(path, epoch):
    if not path.exists():
        return False
    return any(r["epoch"] == str(epoch) for r in csv_rows(path))


@pytest.mark.slow
@pytest.mark.parametrize("point", ["video", "media"])
def test_sigkill_mid_epoch_then_resume(tmp_path, point):
    """SIGKILL while epoch 1's MP4 is being encoded (its CSV rows are
    written, its temporary video is there), or once its pictures and
    TensorBoard images are written (before its checkpoint); resume from the
    last checkpoint (epoch 0): each epoch once in the CSV, no temporary or
    broken file, no duplicate TensorBoard heatmap step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cam = tmp_path / "cam"
    proc = _child(tmp_path, 3, "--slow", point)
    if point == "video":   # epoch 1's first MP4 half written
        _kill_when(proc, lambda: any(".partial" in p.name and "epoch001" in p.name
                                     for p in (cam / "videos").glob(".*")))
    else:                  # epoch 1's media done and flushed
        _kill_when(proc, lambda: (tmp_path / "media_done_1").exists())
    assert _csv_holds(cam / "ybroad.csv", 1)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0.ckpt", "last.ckpt"]
    res = _child(tmp_path, 3, "--resume")
    out, _ = res.communicate(timeout=600)
    assert res.returncode == 0 and "DONE" in out, out[-3000:]

    keys = [(r["epoch"], r["probe"], r["layer_index"]) for r in csv_rows(cam / "ybroad.csv")]
    assert len(keys) == len(set(keys))
    assert sorted({int(k[0]) for k in keys}) == [0, 1, 2]
    assert len(keys) == 3 * 2 * 3        # 3 epochs x 2 probes x 3 conv layers
    assert (cam / "ybroad.csv").read_bytes().endswith(b"\n")
    assert leftovers(tmp_path) == []
    videos = sorted(p.name for p in (cam / "videos").iterdir())
    assert videos == [f"probe{b}_epoch{e:03d}_local.mp4" for b in (0, 1) for e in range(3)]
    for v in (cam / "videos").iterdir():
        assert len(list(iter_video(v))) == 3, v      # complete: every layer's frame
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0})
    acc.Reload()
    steps = [e.step for e in acc.Images("ybroad/probe0/heatmap")]
    assert len(steps) == len(set(steps)) == 3, steps


# --------------------------------------------------------------- callback on a full disk

class _Net(L.LightningModule):
    def __init__(self, classes=3, nan_above=None):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                               nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))
        self.nan_above = nan_above

    def forward(self, x):
        out = self.f(x)
        if self.nan_above is not None:   # inputs with a huge pixel give NaN logits
            big = x.flatten(1).amax(1) > self.nan_above
            out = torch.where(big[:, None], torch.full_like(out, float("nan")), out)
        return out

    def training_step(self, batch, _):
        out = self(batch[0])
        if out.shape[-1] == 1:
            return nn.functional.binary_cross_entropy_with_logits(out[:, 0], batch[1].float() % 2)
        return nn.functional.cross_entropy(out, batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _data(n=16, size=16):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)
    return x, y, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _trainer(tmp_path, callbacks, epochs=2, logger=False):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger,
                     enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, default_root_dir=str(tmp_path),
                     log_every_n_steps=1, callbacks=list(callbacks))


class _FreeSpace(Callback):
    """Deletes the filler (space returns) before epoch ``at`` trains."""

    def __init__(self, filler, at):
        self.filler, self.at = filler, at

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at:
            self.filler.unlink(missing_ok=True)


def test_callback_on_a_full_disk_goes_on_and_retries_the_csv(small_disk, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, _, data = _data()
    save = small_disk / "cam"
    # viewer=False: its backgrounds (2 x 108 KiB) would not fit this 256 KiB disk
    cb = CAManimCallback(x[:2], save_dir=save,
                         video=VideoOptions(normalization="local", tb_size=32, size=256),
                         media=MediaOptions(queue=0, viewer=False))
    filler = fill(small_disk)
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)   # on another disk: writable
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = _trainer(tmp_path, [cb, _FreeSpace(filler, 2)], epochs=3, logger=tb)
        tr.fit(_Net(), data)
    assert tr.current_epoch == 3                       # training went on
    msgs = [str(w.message) for w in caught if "CAManimCallback" in str(w.message)]
    csv_fail = [m for m in msgs if "ybroad.csv" in m and "No space left" in m]
    media_fail = [m for m in msgs if "output(s) failed" in m]
    assert len(csv_fail) == 2, msgs                    # epochs 0 and 1, once each
    assert any("epoch 0" in m for m in media_fail) and any("epoch 1" in m for m in media_fail)
    assert all("videos/probe0_epoch00" in m or "heatmaps" in m for m in media_fail)
    # once space returned (epoch 2) the failed epochs were written, each once
    keys = [(r["epoch"], r["probe"], r["layer_index"]) for r in csv_rows(save / "ybroad.csv")]
    assert len(keys) == len(set(keys)) and sorted({int(k[0]) for k in keys}) == [0, 1, 2]
    # no truncated file under a final name, no temporary file
    assert leftovers(small_disk) == []
    for v in (save / "videos").iterdir():
        assert len(list(iter_video(v))) == 2
    assert sorted(p.name for p in (save / "videos").iterdir()) == [
        "probe0_epoch002_local.mp4", "probe1_epoch002_local.mp4"]
    # TensorBoard (another disk) got every epoch: it does not fail with the files
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0})
    acc.Reload()
    assert len(acc.Images("camanim/probe0/local")) == 3
    assert len(acc.Images("ybroad/probe0/heatmap")) == 3


# --------------------------------------------------------------- broken models

def test_nan_probe_is_named_and_recorded_as_missing(tmp_path):
    x, _, data = _data()
    probes = x[:3].clone()
    probes[1, 0, 0, 0] = 50.0                          # this probe's logits are NaN
    cb = CAManimCallback(probes, save_dir=tmp_path / "c", normalization="local",
                         log_videos=False)
    with pytest.warns(UserWarning, match=r"epoch 0: the logits of probe\(s\) probe1 are NaN"):
        _trainer(tmp_path, [cb], epochs=1).fit(_Net(nan_above=20.0), data)
    rows = csv_rows(tmp_path / "c" / "ybroad.csv")
    bad = [r for r in rows if r["probe"] == "probe1"]
    good = [r for r in rows if r["probe"] != "probe1"]
    assert bad and all(r["road"] == "" and r["target"] == "" and r["road_mean"] == ""
                       for r in bad)                  # missing, not a number, no argmax of NaN
    assert good and all(r["road"] != "" and r["target"] != "" for r in good)
    assert sorted(p.name for p in (tmp_path / "c" / "videos").iterdir()) == [
        "probe0_epoch000_local.mp4", "probe2_epoch000_local.mp4"]
    s = {p.probe: p for p in read_ybroad_csv(tmp_path / "c" / "ybroad.csv")}
    assert np.isnan(s["probe1"].road).all() and s["probe1"].targets == [None]


class _Diverge(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))


def test_diverged_model_warns_without_half_precision_advice(tmp_path):
    x, _, data = _data()
    cb = CAManimCallback(x[:2], save_dir=tmp_path / "c", log_videos=False, save_videos=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = _trainer(tmp_path, [_Diverge(), cb], epochs=2)
        tr.fit(_Net(), data)
    msgs = [str(w.message) for w in caught if "CAManimCallback" in str(w.message)]
    diverged = [m for m in msgs if "diverged" in m]
    assert len(diverged) == 1 and "epoch 1" in diverged[0], msgs
    assert not any("half precision" in m for m in msgs)
    rows = csv_rows(tmp_path / "c" / "ybroad.csv")
    assert {r["epoch"] for r in rows} == {"0"}          # nothing invented for epoch 1


class _FirstStep(Callback):
    def __init__(self):
        self.warnings_before = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.warnings_before is None:
            self.warnings_before = [str(w.message) for w in self.caught]


def test_single_logit_head_is_handled_before_training(tmp_path):
    x, _, data = _data()
    model = _Net(classes=1)
    w0 = model.f[0].weight.detach().clone()
    with pytest.raises(CAManimError, match="single output.*score='logit'"):
        _trainer(tmp_path, [CAManimCallback(x[:2], score="softmax", log_videos=False,
                                            save_videos=False)]).fit(model, data)
    assert torch.equal(model.f[0].weight, w0)           # refused before any training step
    with pytest.raises(CAManimError, match="score must be one of"):
        CAManimCallback(x[:2], score="prob")
    cb = CAManimCallback(x[:2], save_dir=tmp_path / "c", log_videos=False, save_videos=False)
    first = _FirstStep()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first.caught = caught
        _trainer(tmp_path, [cb, first], epochs=1).fit(_Net(classes=1), data)
    notice = [m for m in first.warnings_before if "single-output model" in m]
    assert len(notice) == 1 and "\n" not in notice[0]   # one line, before the first step
    road = np.array([float(r["road"]) for r in csv_rows(tmp_path / "c" / "ybroad.csv")])
    assert np.isfinite(road).all() and (road != 0).any()    # logit scores, not softmax's 0


# --------------------------------------------------------------- the command

def _tiny_cnn(num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


TINY = f"{__file__}:_tiny_cnn"


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    p = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(p)
    return p


def _bad_checkpoints(tmp_path):
    import datetime

    text = tmp_path / "notes.ckpt"
    text.write_text("hello, not a checkpoint\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    objects = tmp_path / "objects.pt"
    torch.save({"when": datetime.datetime(2024, 1, 1), "state_dict": {}}, objects)
    return [text, empty, objects, tmp_path]


def test_cli_output_and_checkpoint_failures_exit_2_with_one_line(tmp_path, image, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [["explain", str(image), "--model", TINY, "--size", "24", "--out", str(afile)],
             ["explain", str(image), "--model", TINY, "--size", "24", "--out", str(afile / "sub")],
             ["sanity", str(image), "--model", TINY, "--size", "24", "--out", str(afile)],
             ["study", str(tmp_path), "--out", str(afile)]]
    cases += [["explain", str(image), "--model", TINY, "--size", "24", "--checkpoint", str(c),
               "--out", str(tmp_path / "o")] for c in _bad_checkpoints(tmp_path)]
    for argv in cases:
        rc = cli_main(argv + (["--quiet"] if argv[0] != "study" else []))
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert "weights_only" not in err and "Re-running" not in err, err
    assert afile.read_text() == "x"


def test_cli_read_only_out_exits_2(tmp_path, image, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip("root ignores folder permissions and no read-only tmpfs can be mounted")
    else:
        ro.chmod(0o500)
    try:
        rc = cli_main(["explain", str(image), "--model", TINY, "--size", "24", "--quiet",
                       "--out", str(ro / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "cannot be written" in err, err
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(ro)], capture_output=True)
        else:
            ro.chmod(0o700)
