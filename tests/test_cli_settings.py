"""Issue 24: checkpoints carry what `explain` needs (input size, mean/std,
class names), output conventions (results on stdout, diagnostics on
stderr), unusable devices, class-count checks, and `--help` without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from camanim import cli
from camanim.core.checkpoint import checkpoint_meta, meta_from_hparams
from camanim.errors import CAManimError

ROOT = Path(__file__).resolve().parents[1]
TINY = f"{__file__}:tiny_cnn"
HPARAMS = {"image_size": 24, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
           "class_names": ["benign", "malignant", "normal"], "lr": 0.01}


def tiny_cnn(num_classes: int = 3) -> nn.Module:
    """3 convolutions, then a linear head (used through --model FILE:tiny_cnn)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


class _Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@pytest.fixture()
def image(tmp_path) -> Path:
    y, x = np.mgrid[0:40, 0:48]
    a = np.stack([x * 5, y * 6, 255 - x * 5], -1).astype(np.uint8)
    a[10:25, 15:35] = (250, 240, 30)
    path = tmp_path / "scan.png"
    Image.fromarray(a).save(path)
    return path


@pytest.fixture()
def ckpt(tmp_path) -> Path:
    """A Lightning-style checkpoint: weights under state_dict ('model.' prefix),
    the input settings under hyper_parameters."""
    path = tmp_path / "best.ckpt"
    torch.save({"epoch": 2, "state_dict": _Wrapped().state_dict(),
                "hyper_parameters": dict(HPARAMS)}, path)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------ metadata

def test_lightning_checkpoint_metadata_round_trip(tmp_path):
    """save_hyperparameters() -> Trainer.save_checkpoint -> checkpoint_meta."""
    import lightning as L

    class Lit(L.LightningModule):
        # noqa: ARG002 - save_hyperparameters() reads the arguments from the frame
        def __init__(self, image_size=(24, 32), mean=(0.1, 0.2, 0.3),  # noqa: ARG002
                     std=(0.9, 0.8, 0.7), class_names=("a", "b", "c")):  # noqa: ARG002
            super().__init__()
            self.save_hyperparameters()
            self.model = tiny_cnn()

        def forward(self, x):
            return self.model(x)

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", max_epochs=0)
    trainer.strategy.connect(Lit(image_size=[24, 32], mean=[0.1, 0.2, 0.3],
                                 std=[0.9, 0.8, 0.7], class_names=["a", "b", "c"]))
    path = tmp_path / "lit.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    meta = checkpoint_meta(path)
    assert meta.image_size == (24, 32) and meta.mean == (0.1, 0.2, 0.3)
    assert meta.std == (0.9, 0.8, 0.7) and meta.class_names == ("a", "b", "c")
    assert meta.to_dict() == {"image_size": [24, 32], "mean": [0.1, 0.2, 0.3],
                              "std": [0.9, 0.8, 0.7], "class_names": ["a", "b", "c"]}
    # a plain state dict has no metadata: nothing is made up
    torch.save(tiny_cnn().state_dict(), tmp_path / "plain.pt")
    assert checkpoint_meta(tmp_path / "plain.pt").empty


@pytest.mark.parametrize("field, value, message", [
    ("image_size", "big", "image_size"), ("image_size", [0, 5], "image_size"),
    ("mean", ["x"], "list of numbers"), ("std", [0.0, 1.0, 1.0], "positive"),
    ("class_names", [1, 2], "list of strings"),
])
def test_bad_metadata_is_named(field, value, message):
    with pytest.raises(CAManimError, match=message):
        meta_from_hparams({field: value}, "x.ckpt")


def test_explain_reads_size_norm_and_classes_from_checkpoint(tmp_path, image, ckpt, capsys):
    rc, out, err = run(capsys, "explain", image, "--model", TINY, "--checkpoint", ckpt,
                       "--target", "malignant", "--norm", "local", "--out", tmp_path / "o")
    assert rc == 0, err
    s = json.loads((tmp_path / "o" / "scan_summary.json").read_text())
    assert s["input_size"] == [24, 24]                         # the training size, not 224
    assert s["target"] == 1 and s["target_name"] == "malignant"
    settings = [ln for ln in err.splitlines() if ln.startswith("settings:")]
    assert len(settings) == 1
    assert "24x24 (from best.ckpt)" in settings[0]
    assert "0.5,0.4,0.3 / 0.2,0.25,0.3 (from best.ckpt)" in settings[0]
    assert "benign,malignant,normal (from best.ckpt)" in settings[0]
    assert "warning" not in err
    # the input really is normalized with the stored mean/std: the same run with the
    # values given as flags predicts the same, ImageNet's would not be asked for
    rc, _, err2 = run(capsys, "explain", image, "--model", TINY, "--checkpoint", ckpt,
                      "--mean", "0.5,0.4,0.3", "--std", "0.2,0.25,0.3", "--size", "24",
                      "--norm", "local", "--out", tmp_path / "p", "--quiet")
    s2 = json.loads((tmp_path / "p" / "scan_summary.json").read_text())
    assert rc == 0 and s2["predicted_prob"] == pytest.approx(s["predicted_prob"], abs=1e-6)


def test_size_differing_from_training_size_warns_once_naming_both(tmp_path, image, ckpt, capsys):
    rc, _, err = run(capsys, "explain", image, "--model", TINY, "--checkpoint", ckpt,
                     "--size", "32", "--norm", "local", "--out", tmp_path / "o")
    assert rc == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1
    assert "--size 32x32" in warnings[0] and "training size 24x24" in warnings[0]
    assert "(--size)" in err                                    # the settings line says why
    s = json.loads((tmp_path / "o" / "scan_summary.json").read_text())
    assert s["input_size"] == [32, 32]
    # sanity reads the same metadata and warns the same way, even with --quiet
    rc, _, err = run(capsys, "sanity", image, "--model", TINY, "--checkpoint", ckpt,
                     "--size", "32", "--out", tmp_path / "s", "--no-plot", "--quiet")
    assert rc == 0, err
    assert err.count("warning:") == 1 and "training size 24x24" in err


def test_predicted_class_differs_from_target_is_said(tmp_path, image, ckpt, capsys):
    rc, _, err = run(capsys, "explain", image, "--model", TINY, "--checkpoint", ckpt,
                     "--norm", "local", "--out", tmp_path / "o", "--quiet")
    pred = json.loads((tmp_path / "o" / "scan_summary.json").read_text())["predicted"]
    other = HPARAMS["class_names"][(pred + 1) % 3]
    rc, _, err = run(capsys, "explain", image, "--model", TINY, "--checkpoint", ckpt,
                     "--target", other, "--norm", "local", "--out", tmp_path / "p")
    assert rc == 0
    assert f"the model predicts {HPARAMS['class_names'][pred]}" in err
    assert f"the maps explain {other}" in err


# ------------------------------------------------------------ conventions

def test_results_on_stdout_diagnostics_on_stderr(tmp_path, image, ckpt, capsys):
    rc, out, err = run(capsys, "explain", image, "--model", TINY, "--checkpoint", ckpt,
                       "--norm", "local", "--road", "--out", tmp_path / "o")
    assert rc == 0, err
    assert "wrote" in out and "predicted" in out and "ybROAD:" in out
    assert "settings:" in err and "wrote" not in err and "predicted" not in err
    rc, out, err = run(capsys, "sanity", image, "--model", TINY, "--checkpoint", ckpt,
                       "--out", tmp_path / "s", "--no-plot")
    assert rc == 0, err
    assert "spearman@all" in out and "wrote sanity.txt" in out
    assert "settings:" in err and "spearman@all" not in err
    rc, out, err = run(capsys, "layers", "--model", TINY, "--size", "32")
    assert rc == 0 and "layers selected" in out and err == ""


def _no_mps(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("command", ["explain", "sanity"])
def test_device_mps_without_mps_is_one_line_exit_2(tmp_path, image, capsys, monkeypatch, command):
    _no_mps(monkeypatch)
    rc, out, err = run(capsys, command, image, "--model", TINY, "--device", "mps",
                       "--out", tmp_path / "o", "--quiet")
    assert rc == 2 and out == ""
    assert "--device mps:" in err and "use --device cpu" in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("command", ["explain", "sanity"])
def test_device_cuda_without_cuda_is_one_line_exit_2(tmp_path, image, capsys, monkeypatch,
                                                     command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, _, err = run(capsys, command, image, "--model", TINY, "--device", "cuda",
                     "--out", tmp_path / "o", "--quiet")
    assert rc == 2 and "--device cuda: CUDA is not available" in err and err.count("\n") == 1


def test_classes_must_match_the_model_outputs(tmp_path, image, ckpt, capsys):
    rc, _, err = run(capsys, "explain", image, "--model", TINY, "--checkpoint", ckpt,
                     "--classes", "a,b", "--out", tmp_path / "o", "--quiet")
    assert rc == 2 and "--classes holds 2 names (a, b) but the model has 3 outputs" in err
    rc, _, err = run(capsys, "sanity", image, "--model", TINY, "--classes", "a,b,c,d",
                     "--out", tmp_path / "s", "--quiet")
    assert rc == 2 and "--classes holds 4 names" in err


def test_max_layers_zero_means_all(tmp_path, image, capsys):
    rc, _, err = run(capsys, "explain", image, "--model", TINY, "--size", "24", "--max-layers",
                     "0", "--norm", "local", "--out", tmp_path / "o", "--quiet")
    assert rc == 0, err
    assert json.loads((tmp_path / "o" / "scan_summary.json").read_text())["layers"] == 3
    rc, _, err = run(capsys, "explain", image, "--model", TINY, "--max-layers", "-1",
                     "--out", tmp_path / "p", "--quiet")
    assert rc == 2 and "--max-layers must be >= 0 (0: all layers)" in err


def test_unknown_layer_points_to_camanim_layers(tmp_path, image, capsys):
    rc, _, err = run(capsys, "explain", image, "--model", TINY, "--layers", "conv9",
                     "--out", tmp_path / "o", "--quiet")
    assert rc == 2 and "`camanim layers --model NAME --layers all`" in err


@pytest.mark.parametrize("argv", [
    ["-m", "camanim", "--help"],
    ["-m", "camanim", "sanity", "--help"],
    [str(ROOT / "examples" / "finetune_bus" / "train.py"), "--help"],
])
def test_help_imports_neither_torch_nor_lightning(argv):
    module = argv[0] == "-m"
    target, args = (argv[1], argv[2:]) if module else (argv[0], argv[1:])
    code = ("import runpy, sys\n"
            f"sys.argv = {[target, *args]!r}\n"
            "try:\n"
            f"    runpy.run_{'module' if module else 'path'}({target!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'lightning', 'matplotlib') "
            "if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin"})
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout and ("sanity" not in args or "--fail-on" in res.stdout)
    assert "HEAVY []" in res.stdout
