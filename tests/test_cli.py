"""The ``camanim`` command end to end, and image file loading."""

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
from camanim.core.images import load_image, parse_size, to_model_input
from camanim.errors import CAManimError
from camanim.viz.video import iter_video

TINY = f"{__file__}:tiny_cnn"


def tiny_cnn(num_classes: int = 5) -> nn.Module:
    """3 convolutions, then a linear head (used through --model FILE:tiny_cnn)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


@pytest.fixture()
def image(tmp_path) -> Path:
    """A 48x64 RGB PNG with a bright square."""
    y, x = np.mgrid[0:48, 0:64]
    a = np.stack([x * 4, y * 5, 255 - x * 4], -1).astype(np.uint8)
    a[12:30, 20:44] = (250, 240, 30)
    path = tmp_path / "scan.png"
    Image.fromarray(a).save(path)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------ explain

def test_explain_writes_every_promised_file(tmp_path, image, capsys):
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "explain", image, "--model", TINY, "--size", "32",
                          "--norm", "local,global,both", "--out", out, "--fps", "4", "--save-maps",
                          "--classes", "a,b,c,d,e")
    assert rc == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["scan_local.mp4", "scan_global.mp4", "scan_both.mp4",
                            "scan_contact_sheet.png", "layer_params.png", "scan_summary.json",
                            "scan_maps.npz"])
    local = list(iter_video(out / "scan_local.mp4"))
    both = list(iter_video(out / "scan_both.mp4"))
    assert len(local) == len(both) == 3                      # 3 Conv2d layers
    assert local[0].shape[0] % 2 == 0 and local[0].shape[1] % 2 == 0
    assert both[0].shape[1] > 2 * local[0].shape[1] - 10     # side by side
    # frames keep the original aspect (48x64), not the 32x32 model input
    assert local[0].shape[1] == 320 and np.abs(local[0].astype(int) - local[1]).mean() > 1
    s = json.loads((out / "scan_summary.json").read_text())
    assert s["layers"] == 3 and s["method"] == "gradcam" and s["input_size"] == [32, 32]
    assert s["image_size"] == [48, 64] and s["total_params"] == sum(
        p.numel() for p in tiny_cnn().parameters())
    assert s["target"] == s["predicted"] and s["target_name"] in list("abcde")
    assert [r["name"] for r in s["layer_table"]] == ["0", "2", "4"]
    # results (summary, list of files) on stdout, diagnostics on stderr
    assert "wrote" in stdout and "scan_local.mp4" in stdout and "wrote" not in err
    assert Image.open(out / "scan_contact_sheet.png").size[0] > 300


def test_explain_road_gif_target_quiet(tmp_path, image, capsys):
    out = tmp_path / "o"
    rc, stdout, err = run(capsys, "explain", image, "--model", TINY, "--size", "32",
                          "--norm", "global", "--format", "gif", "--road", "--target", "3",
                          "--max-layers", "2", "--hold-last", "2", "--out", out, "--quiet")
    assert rc == 0, err
    assert err == "" and stdout == ""                        # --quiet: nothing at all
    assert {p.name for p in out.iterdir()} == {
        "scan_global.gif", "scan_contact_sheet.png", "layer_params.png", "scan_summary.json",
        "scan_ybroad.csv", "scan_ybroad.png", "scan_ybroad.json"}
    assert len(list(iter_video(out / "scan_global.gif"))) == 2
    rows = (out / "scan_ybroad.csv").read_text().strip().splitlines()
    assert rows[0].startswith("image,target,layer_index,layer_name,road") and len(rows) == 3
    s = json.loads((out / "scan_summary.json").read_text())
    assert s["target"] == 3 and s["ybroad"]["target"] == 3
    road = json.loads((out / "scan_ybroad.json").read_text())
    assert len(road["scores"]) == 2


def test_explain_torchvision_model_class_names(tmp_path, image, capsys):
    from torchvision.models import ResNet18_Weights

    cats = ResNet18_Weights.DEFAULT.meta["categories"]
    rc, _, err = run(capsys, "explain", image, "--model", "resnet18", "--size", "64",
                     "--max-layers", "2", "--norm", "local", "--target", "Tench",
                     "--out", tmp_path, "--format", "png")
    assert rc == 0, err
    assert "random weights" in err                          # the offline default, said aloud
    s = json.loads((tmp_path / "scan_summary.json").read_text())
    assert s["target"] == 0 and s["target_name"] == cats[0] == "tench"
    frames = sorted((tmp_path / "scan_local").iterdir())
    assert [f.name for f in frames] == ["frame_0000.png", "frame_0001.png"]


def test_explain_checkpoint_lightning_and_head(tmp_path, image, capsys):
    # A Lightning-style checkpoint of a LightningModule with `self.model = tiny_cnn()`.
    trained = tiny_cnn()
    with torch.no_grad():
        trained[0].weight.mul_(3.0)
    ckpt = tmp_path / "best.ckpt"
    torch.save(
        {"epoch": 3, "state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}, ckpt
    )
    rc, _, err = run(
        capsys,
        "explain",
        image,
        "--model",
        TINY,
        "--checkpoint",
        ckpt,
        "--size",
        "24",
        "--norm",
        "local",
        "--out",
        tmp_path / "a",
        "--quiet",
        "--save-maps",
    )
    assert rc == 0, err
    s = json.loads((tmp_path / "a" / "scan_summary.json").read_text())
    assert s["weights"] == str(ckpt)
    # a checkpoint of another architecture: a clear one-line error
    torch.save(tiny_cnn(num_classes=7).state_dict(), tmp_path / "other.pt")
    rc, _, err = run(
        capsys,
        "explain",
        image,
        "--model",
        TINY,
        "--checkpoint",
        tmp_path / "other.pt",
        "--size",
        "24",
        "--out",
        tmp_path / "b",
        "--quiet",
    )
    assert rc == 2 and "does not fit" in err and "shape mismatch" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    # torchvision model fine-tuned to 3 classes: the head is rebuilt to fit
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r3.pt")
    rc, _, err = run(
        capsys,
        "explain",
        image,
        "--model",
        "resnet18",
        "--checkpoint",
        tmp_path / "r3.pt",
        "--size",
        "32",
        "--max-layers",
        "1",
        "--norm",
        "local",
        "--out",
        tmp_path / "c",
        "--quiet",
    )
    assert rc == 0, err
    s = json.loads((tmp_path / "c" / "scan_summary.json").read_text())
    assert 0 <= s["target"] < 3 and s["target_name"] is None  # ImageNet names no longer apply


def test_weights_default_offline_message(tmp_path, image, capsys, monkeypatch):
    import urllib.error

    import torchvision.models._api as api

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    rc, _, err = run(capsys, "explain", image, "--model", "resnet18", "--weights", "DEFAULT",
                     "--out", tmp_path, "--quiet")
    assert rc == 2
    assert "could not fetch" in err and "offline" in err and "--checkpoint FILE" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["explain", "missing.png", "--model", "resnet18"], "no image file at missing.png"),
    (["explain", "{notimage}", "--model", "resnet18"], "cannot read"),
    (["explain", "{image}", "--model", "resnet1888"], "did you mean resnet18"),
    (["explain", "{image}", "--model", "nomodule_xyz:make"], "cannot import 'nomodule_xyz'"),
    (["explain", "{image}", "--model", TINY, "--norm", "locl"], "--norm 'locl'"),
    (["explain", "{image}", "--model", TINY, "--size", "abc"], "bad image size"),
    (["explain", "{image}", "--model", TINY, "--method", "nope"], "nope"),
    (["explain", "{image}", "--model", TINY, "--layers", "conv9"], "no layer named 'conv9'"),
    (["explain", "{image}", "--model", TINY, "--target", "99"], "out of range"),
    (["explain", "{image}", "--model", TINY, "--target", "cat"], "class names are unknown"),
    (["explain", "{image}", "--model", TINY, "--colormap", "jett"], "unknown colormap"),
    (["explain", "{image}", "--model", TINY, "--fps", "0"], "--fps must be > 0"),
    (["explain", "{image}"], "the following arguments are required: --model"),
    (["explain", "{image}", "--model", TINY, "--device", "tpu"], "invalid choice"),
    (["layers", "--model", TINY, "--size", "none"], "needs an example size"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, image, capsys, argv, message):
    notimage = tmp_path / "notes.png"
    notimage.write_text("not an image")
    argv = [a.format(image=image, notimage=notimage) for a in argv]
    rc, out, err = run(
        capsys,
        *argv,
        *(["--quiet"] if argv[0] == "explain" and len(argv) > 3 else []),
        *(["--out", str(tmp_path / "o")] if argv[0] == "explain" and len(argv) > 3 else []),
    )
    assert rc == 2
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# ------------------------------------------------------------------ layers

def test_layers_table(capsys):
    rc, out, _ = run(capsys, "layers", "--model", "resnet18", "--layers", "blocks", "--size", "64")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["#", "name", "type", "output", "shape", "params", "layout"]
    names = [ln.split()[1] for ln in lines[2:7]]
    assert names == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert "5 layers selected of" in out and "--layers blocks" in out
    rc, out, _ = run(capsys, "layers", "--model", TINY, "--size", "32")
    assert rc == 0 and "skipped" in out and "1x1 spatial output" in out and "vector output" in out
    assert "16x16x16" in out                                # C x h x w of the strided conv


def test_console_script_subprocess(tmp_path, image):
    exe = Path(sys.executable).with_name("camanim")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "camanim.cli"]
    res = subprocess.run(
        cmd
        + [
            "explain",
            str(image),
            "--model",
            TINY,
            "--size",
            "24",
            "--norm",
            "local",
            "--max-layers",
            "2",
            "--out",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert len(list(iter_video(tmp_path / "s" / "scan_local.mp4"))) == 2
    assert (tmp_path / "s" / "scan_contact_sheet.png").exists()


# ------------------------------------------------------------------ images

def test_load_image_modes(tmp_path):
    a16 = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)   # up to 59,900
    Image.fromarray(a16).save(tmp_path / "g16.png")
    rgb = load_image(tmp_path / "g16.png")
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb[..., 0], a16 / 65535.0, atol=1e-6)      # scaled, not clipped
    Image.fromarray(np.full((5, 6), 128, np.uint8)).save(tmp_path / "g8.png")
    np.testing.assert_allclose(load_image(tmp_path / "g8.png"), 128 / 255.0, atol=1e-6)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png")
    assert np.allclose(x[0, 0], (1, 0, 0)) and np.allclose(x[3, 0], (1, 1, 1))  # laid on white
    pal = Image.fromarray(np.zeros((3, 3, 3), np.uint8)).convert("P")
    pal.save(tmp_path / "p.gif")
    assert load_image(tmp_path / "p.gif").shape == (3, 3, 3)


def test_load_image_exif_orientation(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = 255                                          # left half white
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6                                         # "rotate 90 CW to display"
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    x = load_image(tmp_path / "phone.jpg")
    assert x.shape == (20, 10, 3)                            # upright: portrait
    assert x[:10].mean() > 0.8 and x[10:].mean() < 0.2       # the white half is now on top


def test_load_image_errors(tmp_path):
    with pytest.raises(CAManimError, match="no image file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(CAManimError, match="folder"):
        load_image(tmp_path)
    (tmp_path / "t.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    with pytest.raises(CAManimError, match="cannot read"):
        load_image(tmp_path / "t.png")


def test_sizes_and_model_input():
    assert parse_size("224") == (224, 224) and parse_size("320x256") == (320, 256)
    assert parse_size("none") is None and parse_size(None) is None
    with pytest.raises(CAManimError, match="bad image size '0'"):
        parse_size("0")
    rgb = np.full((30, 40, 3), 0.5, np.float32)
    x = to_model_input(rgb, (16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert x.shape == (1, 3, 16, 16) and torch.allclose(x, torch.zeros_like(x), atol=1e-6)
    assert to_model_input(rgb, None).shape == (1, 3, 30, 40)
    assert to_model_input(rgb, (8, 8), channels=1).shape == (1, 1, 8, 8)


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, _ = cli.models.build_model("resnet18", quiet=True, seed=3)
    b, _ = cli.models.build_model("resnet18", quiet=True, seed=3)
    c, _ = cli.models.build_model("resnet18", quiet=True, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_size_none_keeps_original_resolution(tmp_path, image, capsys):
    rc, _, err = run(capsys, "explain", image, "--model", TINY, "--size", "none", "--norm", "local",
                     "--max-layers", "1", "--format", "gif", "--out", tmp_path, "--quiet")
    assert rc == 0, err
    s = json.loads((tmp_path / "scan_summary.json").read_text())
    assert s["input_size"] == [48, 64] == s["image_size"]
    assert s["layer_table"][0]["output_shape"][2:] == [48, 64]
