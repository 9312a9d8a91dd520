"""CAManimCallback's pictures for W&B and MLflow (issue 21), against the real
libraries: wandb in offline mode (the run's ``.wandb`` records and media
files read back), mlflow with a local sqlite store (read back through
``MlflowClient``). The report (the viewer's ``write_report``) is replaced by
a tiny HTML writer so that these tests do not depend on the viewer."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from camanim.lightning.callback import CAManimCallback
from camanim.lightning.loggers import EpochArtifacts, MLflowSink, logger_sinks, send_epoch
from camanim.viz.video import iter_video
from lit_models import TinyLitNet

pytestmark = pytest.mark.usefixtures("torch_one_thread", "wandb_offline")

N_LAYERS = 3           # Conv2d layers of TinyLitNet
PROBES = ["probe0", "probe1"]
NORMS = ["global", "local"]


# ------------------------------------------------------------------ helpers

@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    """W&B offline and silent, its config and caches under ``tmp_path``."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


def data(n: int = 8, size: int = 16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4), x


def fit(tmp_path, loggers, max_epochs=3, ckpt_path=None, callbacks=(), save="cam"):
    loader, x = data()
    cb = CAManimCallback(x[:2], save_dir=tmp_path / save, video_size=32, media_workers=1)
    L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=loggers,
              enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
              enable_checkpointing=bool(callbacks), default_root_dir=str(tmp_path),
              callbacks=[cb, *callbacks]).fit(TinyLitNet(), loader, ckpt_path=ckpt_path)
    return cb


@pytest.fixture
def fake_report(monkeypatch):
    """``camanim.viewer.report.write_report`` replaced by a tiny HTML writer
    (the real viewer lands in the same release; without it there is no report)."""
    calls = []

    def write_report(run_dir, out, **_):
        calls.append(Path(run_dir))
        Path(out).write_text(f"<html><body>report of {Path(run_dir).name}</body></html>")
        return Path(out)

    try:
        import camanim.viewer.report as mod
        monkeypatch.setattr(mod, "write_report", write_report)
    except ImportError:
        pkg = types.ModuleType("camanim.viewer")
        mod = types.ModuleType("camanim.viewer.report")
        mod.write_report = write_report
        pkg.report = mod
        monkeypatch.setitem(sys.modules, "camanim.viewer", pkg)
        monkeypatch.setitem(sys.modules, "camanim.viewer.report", mod)
    return calls


# ------------------------------------------------------------ W&B read-back

def wandb_logger(tmp_path, **kw):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(save_dir=str(tmp_path), offline=True, project="camanim-test", **kw)


def finish_wandb():
    """End the run and stop W&B's service: its transaction log is complete
    only then (``finish`` alone can leave the last 32 KiB block unwritten)."""
    import wandb

    wandb.finish()
    wandb.teardown()


def _log_records(path: Path) -> list[bytes]:
    """The records of a W&B ``.wandb`` file (LevelDB log format: 32 KiB
    blocks of chunks with a 7-byte header: crc, length, type full/first/
    middle/last), after its 7-byte file header."""
    data, pos, block, out, buf = path.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind in (3, 4):
            buf += chunk
            if kind == 4:
                out.append(buf)
    return out


def wandb_runs(tmp_path: Path) -> list[dict]:
    """Every offline run under ``tmp_path``: its history rows (key -> value,
    media as their JSON dicts), step metrics and files folder, oldest first."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for d in sorted((tmp_path / "wandb").glob("offline-run-*")):
        rows, steps = [], {}
        records = [pb.Record.FromString(raw) for raw in _log_records(next(d.glob("run-*.wandb")))]
        assert records[-1].WhichOneof("record_type") == "exit", "the run's log is incomplete"
        for rec in records:
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                row: dict = {}
                for it in rec.history.item:
                    key = it.key or "/".join(it.nested_key)
                    val = json.loads(it.value_json)
                    head, _, leaf = key.rpartition("/")
                    if leaf in ("_type", "path", "sha256", "size", "format", "width",
                                "height") and head:
                        row.setdefault(head, {})[leaf] = val
                    else:
                        row[key] = val
                rows.append(row)
            elif kind == "metric" and rec.metric.name:
                steps[rec.metric.name] = rec.metric.step_metric
        runs.append({"rows": rows, "steps": steps, "files": d / "files"})
    return runs


def media_rows(run: dict) -> list[dict]:
    return [r for r in run["rows"] if "camanim/epoch" in r]


def test_wandb_offline_read_back(tmp_path, fake_report):
    cb = fit(tmp_path, [wandb_logger(tmp_path)])
    finish_wandb()
    [run] = wandb_runs(tmp_path)
    rows = media_rows(run)
    epoch_rows = [r for r in rows if "camanim/report" not in r]
    assert [r["camanim/epoch"] for r in epoch_rows] == [0, 1, 2], [sorted(r) for r in rows]
    videos = {f"camanim/{p}/{n}" for p in PROBES for n in NORMS}
    pictures = {f"ybroad/{p}/{k}" for p in PROBES for k in ("heatmap", "curve")}
    conv = {f"convergence/{p}/heatmap" for p in PROBES}
    for r in epoch_rows:
        e = r["camanim/epoch"]
        got = {k for k, v in r.items() if isinstance(v, dict)}
        assert got == videos | pictures | conv
        for key in videos:
            assert r[key]["_type"] == "video-file"
            f = run["files"] / r[key]["path"]
            probe, norm = key.split("/")[1:]
            mine = cb._dir / "videos" / f"{probe}_epoch{e:03d}_{norm}.mp4"
            # the very MP4 the callback wrote, one frame per layer
            assert hashlib.sha256(f.read_bytes()).hexdigest() == r[key]["sha256"] \
                == hashlib.sha256(mine.read_bytes()).hexdigest()
            assert sum(1 for _ in iter_video(f)) == N_LAYERS
        for key in pictures | conv:
            assert r[key]["_type"] == "image-file"
            assert (run["files"] / r[key]["path"]).stat().st_size == r[key]["size"] > 0
    # every media key has the callback epoch as its step (the media slider walks it)
    for key in videos | pictures | conv | {"camanim/report"}:
        assert run["steps"][key] == "camanim/epoch"
    # the report once, at the end of fit, at the last epoch
    [rep] = [r for r in rows if "camanim/report" in r]
    assert rep["camanim/epoch"] == 2 and rep["camanim/report"]["_type"] == "html-file"
    assert "report of cam" in (run["files"] / rep["camanim/report"]["path"]).read_text()
    assert fake_report == [tmp_path / "cam"]


# ---------------------------------------------------------- MLflow read-back

def mlflow_logger(tmp_path, **kw):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(experiment_name="camanim-test",
                        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                        artifact_location=(tmp_path / "mlartifacts").as_uri(), **kw)


def mlflow_media(logger) -> tuple[dict[str, list[int]], dict[int, list[str]]]:
    """``(image key -> steps, epoch -> files of camanim/epochNNN)`` of the
    logger's run, read back through ``MlflowClient``."""
    from mlflow import MlflowClient

    client = MlflowClient(logger._tracking_uri)
    steps: dict[str, list[int]] = {}
    for f in client.list_artifacts(logger.run_id, "images"):
        name = f.path.split("/", 1)[1]
        if name.endswith(".png"):       # the full image (a .webp thumbnail goes with it)
            key, _, step = name.split("+")[:3]
            steps.setdefault(key.replace("~", "/"), []).append(int(step))
    folders = {}
    for d in client.list_artifacts(logger.run_id, "camanim"):
        folders[int(d.path[-3:])] = sorted(Path(f.path).name
                                           for f in client.list_artifacts(logger.run_id, d.path))
    return {k: sorted(v) for k, v in steps.items()}, folders


def test_mlflow_local_store_read_back(tmp_path, fake_report):
    logger = mlflow_logger(tmp_path)
    fit(tmp_path, [logger])
    steps, folders = mlflow_media(logger)
    want = {f"ybroad/{p}/{k}": [0, 1, 2] for p in PROBES for k in ("heatmap", "curve")}
    want.update({f"convergence/{p}/heatmap": [0, 1, 2] for p in PROBES})
    assert steps == want
    mp4s = [f"{p}_epoch{{:03d}}_{n}.mp4" for p in PROBES for n in NORMS]
    assert folders == {e: sorted([m.format(e) for m in mp4s] + (["report.html"] if e == 2 else []))
                       for e in (0, 1, 2)}
    assert fake_report == [tmp_path / "cam"]


# ----------------------------------------------------- both at once, resume

@pytest.mark.usefixtures("fake_report")
def test_resume_continues_steps_without_duplicates(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    ck = tmp_path / "ckpt"
    ml = mlflow_logger(tmp_path)
    mc = ModelCheckpoint(dirpath=ck, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    fit(tmp_path, [wandb_logger(tmp_path, id="resumed"), ml], max_epochs=2, callbacks=[mc])
    finish_wandb()
    # the same runs, resumed from the last checkpoint for one more epoch
    ml2 = mlflow_logger(tmp_path, run_id=ml.run_id)
    fit(tmp_path, [wandb_logger(tmp_path, id="resumed", resume="allow"), ml2], max_epochs=3,
        ckpt_path=str(ck / "epoch=1.ckpt"))
    finish_wandb()
    runs = wandb_runs(tmp_path)
    epochs = [[r["camanim/epoch"] for r in media_rows(run) if "camanim/report" not in r]
              for run in runs]
    assert epochs == [[0, 1], [2]]
    steps, folders = mlflow_media(ml2)
    assert steps["ybroad/probe0/heatmap"] == steps["ybroad/probe1/curve"] == [0, 1, 2]
    assert sorted(folders) == [0, 1, 2]
    # each fit's end sends a report: at epoch 1, then at epoch 2
    assert "report.html" in folders[1] and "report.html" in folders[2]


def test_mlflow_resumed_fit_drops_what_a_crashed_run_logged(tmp_path):
    pytest.importorskip("mlflow")
    logger = mlflow_logger(tmp_path)
    video = tmp_path / "probe0_epoch000_local.mp4"
    video.write_bytes(b"\0" * 8)
    img = torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()

    def art(e):
        return EpochArtifacts(e, {"probe0/local": video}, {"ybroad/probe0/heatmap": img})

    crashed = MLflowSink(logger)
    assert all(send_epoch([crashed], art(e)) == [] for e in range(3))
    logger.experiment.log_image(logger.run_id, img, key="mine", step=2)  # the user's own
    # the resumed fit (new sinks) redoes epoch 1 and later: its first epoch
    # removes what the crashed fit logged from there on
    assert send_epoch([MLflowSink(logger)], art(1)) == []
    steps, folders = mlflow_media(logger)
    assert steps == {"ybroad/probe0/heatmap": [0, 1], "mine": [2]} and sorted(folders) == [0, 1]


# ---------------------------------------------------- failures, other loggers

@pytest.mark.usefixtures("fake_report")
def test_a_failing_logger_warns_and_the_others_go_on(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import camanim.lightning.loggers as lg

    def down(*_):
        raise RuntimeError("W&B service down")

    monkeypatch.setattr(lg.WandbSink, "epoch", down)
    ml = mlflow_logger(tmp_path)
    with pytest.warns(UserWarning, match=r"W&B logger \(epoch \d\): RuntimeError: W&B "
                                         "service down") as rec:
        cb = fit(tmp_path, [wandb_logger(tmp_path), ml])
    finish_wandb()
    failed = [str(w.message) for w in rec if "W&B service down" in str(w.message)]
    assert len(failed) == 3          # one warning per epoch
    steps, folders = mlflow_media(ml)
    assert steps["ybroad/probe0/curve"] == [0, 1, 2] and sorted(folders) == [0, 1, 2]
    assert len(list((cb._dir / "videos").glob("*.mp4"))) == 3 * 4   # the files too
    # the report still reached W&B at the end (only the epochs failed)
    [run] = wandb_runs(tmp_path)
    assert [r["camanim/epoch"] for r in media_rows(run)] == [2]


def test_other_loggers_get_one_notice(tmp_path):
    with pytest.warns(UserWarning, match="CSVLogger gets the scalars only, not the CAManim "
                                         "videos") as rec:
        fit(tmp_path, [CSVLogger(str(tmp_path / "csv"))], max_epochs=1)
    assert sum("scalars only" in str(w.message) for w in rec) == 1
    sinks, plain = logger_sinks([CSVLogger(str(tmp_path / "csv"))])
    assert sinks == [] and plain == ["CSVLogger"]


@pytest.mark.slow  # a fresh interpreter importing torch and lightning: about 20 s
def test_core_imports_neither_wandb_nor_mlflow(tmp_path):
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import camanim, lightning as L, torch
from lightning.pytorch.loggers import TensorBoardLogger
from camanim.lightning.callback import CAManimCallback
from test_callback_loggers import fit
from pathlib import Path
fit(Path({str(tmp_path)!r}), [TensorBoardLogger({str(tmp_path / 'tb')!r})], max_epochs=1)
print(sorted(m for m in ("wandb", "mlflow") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
