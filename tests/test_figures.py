"""Contact sheet, parameter plot and Table-1 summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from torch import nn

from camanim.errors import CAManimError
from camanim.viz.figures import (
    contact_sheet,
    format_summary,
    percentile_layers,
    plot_params,
    run_summary,
    write_summary,
)
from test_render import make_images, make_maps


def test_percentile_layers():
    assert percentile_layers(53) == [0, 5, 10, 16, 21, 26, 31, 36, 42, 47, 52]
    assert len(percentile_layers(11)) == 11 and percentile_layers(11) == list(range(11))
    assert percentile_layers(4) == [0, 1, 2, 3]          # fewer layers: each once
    assert percentile_layers(1) == [0]
    assert percentile_layers(101, (0, 50, 100)) == [0, 50, 100]
    with pytest.raises(CAManimError, match=r"percentiles must be within 0\.\.100, got \[120\]"):
        percentile_layers(10, (0, 120))
    with pytest.raises(CAManimError, match="no layers to pick from"):
        percentile_layers(0)


def _tiles(path, tile_h: int) -> int:
    """Count the tiles in the first tile row: runs of non-white columns."""
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    row = a.shape[0] // 2 if tile_h == 0 else tile_h
    colored = (np.abs(a[row] - 255).sum(-1) > 30)
    return int((np.diff(colored.astype(int)) == 1).sum() + colored[0])


def test_contact_sheet_eleven_tiles(tmp_path):
    maps = make_maps(L=23, H=32, W=48)
    out = contact_sheet(tmp_path / "sheet.png", make_images(1, 32, 48), maps, tile=120)
    im = Image.open(out)
    assert im.format == "PNG"
    w, h = im.size
    assert w > 11 * 120 and h < 2.5 * 120                   # one row of tiles
    row = int(np.argmax(np.asarray(im.convert("L"))[:, w // 2] < 200)) + 40
    assert _tiles(out, row) == 11


def test_contact_sheet_both_rows_and_road(tmp_path):
    maps = make_maps(L=6, B=2)
    imgs = make_images(2)
    one = contact_sheet(tmp_path / "one.png", imgs, maps, index=1)
    two = contact_sheet(tmp_path / "two.png", imgs, maps, index=1, normalization="both",
                        road=np.linspace(0, 1, 12).reshape(6, 2), title="t")
    h1, h2 = Image.open(one).size[1], Image.open(two).size[1]
    assert h2 > 1.6 * h1 - 60                                 # a second row
    with pytest.raises(CAManimError, match="out of range"):
        contact_sheet(tmp_path / "x.png", imgs, maps, index=2)
    with pytest.raises(CAManimError, match="normalization"):
        contact_sheet(tmp_path / "x.png", imgs, maps, index=0, normalization=["loc"])


def test_plot_params(tmp_path):
    out = plot_params(tmp_path / "p.png", make_maps(L=7))
    assert Image.open(out).size[0] > 300


def test_run_summary_table1(tmp_path):
    maps = make_maps(L=4)
    model = nn.Conv2d(3, 4, 3)                                # 3*4*9 + 4 = 112 parameters
    s = run_summary(maps, model)
    assert s["layers"] == 4 and s["method"] == "gradcam"
    assert s["total_params"] == 112
    assert s["layer_params_total"] == 0 + 100 + 200 + 300
    assert s["mean_params_per_layer"] == pytest.approx(150.0)
    assert s["runtime_s"] == pytest.approx(0.04)
    assert s["mean_runtime_per_layer_s"] == pytest.approx(0.01)
    assert s["first_layer"] == "block0.conv" and s["last_layer"] == "block3.relu#2"
    s2 = run_summary(maps, seconds=2.0)
    assert s2["total_params"] is None and s2["mean_runtime_per_layer_s"] == pytest.approx(0.5)
    text = format_summary(s)
    assert "total_params" in text and "112" in text
    path = write_summary(tmp_path / "s.json", dict(s, extra=np.float32(1.5)))
    back = json.loads(path.read_text())
    assert back["layers"] == 4 and back["extra"] == 1.5
