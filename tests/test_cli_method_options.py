"""``camanim explain`` hands the method what it needs: Integrated Grad-CAM's
black baseline gets --mean/--std; SISE gets its block layers by default."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import camanim
from camanim import cli
from camanim.core.images import load_image, to_model_input
from test_cli import TINY, tiny_cnn


@pytest.fixture()
def image(tmp_path) -> Path:
    y, x = np.mgrid[0:24, 0:24]
    a = np.stack([x * 9, y * 10, 255 - x * 9], -1).astype(np.uint8)
    path = tmp_path / "scan.png"
    Image.fromarray(a).save(path)
    return path


def test_explain_integrated_gradcam_uses_mean_and_std_for_its_black_baseline(tmp_path, image,
                                                                              capsys):
    mean, std = (0.2, 0.3, 0.4), (0.5, 0.25, 0.125)
    rc = cli.main(["explain", str(image), "--model", TINY, "--size", "24", "--norm", "local",
                   "--method", "integrated-gradcam", "--mean", ",".join(map(str, mean)),
                   "--std", ",".join(map(str, std)), "--out", str(tmp_path / "o"),
                   "--format", "png", "--quiet", "--save-maps"])
    assert rc == 0, capsys.readouterr().err
    saved = camanim.LayerMaps.load(tmp_path / "o" / "scan_maps.npz")
    x = to_model_input(load_image(image), (24, 24), list(mean), list(std), 3)
    model = tiny_cnn()
    want = camanim.CAManim(model, "integrated-gradcam", mean=mean, std=std, progress=False)(x)
    imagenet = camanim.CAManim(model, "integrated-gradcam", progress=False)(x)
    assert saved.names == want.names
    for p, q in zip(saved.raw, want.raw, strict=True):
        torch.testing.assert_close(p, q.to(p.dtype), rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(q, r) for q, r in zip(want.raw, imagenet.raw, strict=False))


def test_explain_sise_default_layers_are_its_blocks_without_a_warning(tmp_path, image, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        rc = cli.main(["explain", str(image), "--model", TINY, "--size", "24", "--norm", "local",
                       "--method", "sise", "--out", str(tmp_path / "o"), "--format", "png",
                       "--quiet", "--save-maps"])
    assert rc == 0, capsys.readouterr().err
    saved = camanim.LayerMaps.load(tmp_path / "o" / "scan_maps.npz")
    assert saved.names == ["1", "5", "fused"]          # last ReLU at 24x24 and at 12x12
