"""Issue 24: numbers said in words, pictures that tell the truth (best-layer
marks, the map-change colour scale, captions, legends), `LayerTable` as a
table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from camanim import CAManimError, list_layers
from camanim.metrics.road_result import YbRoad
from camanim.viz.convergence import convergence_image
from camanim.viz.fonts import dropped_prefix, short_names
from camanim.viz.plots import heatmap_image


def _road(scores: np.ndarray) -> YbRoad:
    L, B = scores.shape
    return YbRoad(scores=scores, names=[f"model.layer{i}" for i in range(L)], targets=[1] * B,
                  percentiles=(20, 40, 60, 80), std=np.zeros((L, B)), trials=scores[None],
                  morf=np.zeros((1, L, B, 4)), lerf=np.zeros((1, L, B, 4)), clean=np.ones(B))


# ------------------------------------------------------------ words

def test_summary_says_no_layer_above_chance_in_words():
    road = _road(np.array([[0.10, 0.20, 0.02], [0.12, 0.10, 0.01], [0.08, 0.30, 0.03]]))
    s = road.summary(chance=[0.20, 0.15, 0.0])
    assert s[0].above_chance == 0 and "no layer above chance" in str(s[0])
    assert s[1].above_chance == 2 and "2 of 3 layers above chance" in s[1].verdict
    assert "best layer model.layer2" in s[1].verdict and "fails" not in s[1].verdict
    assert s[1].to_dict()["verdict"] == s[1].verdict
    assert s[2].verdict.startswith("fails") and "3 of 3 layers above" in s[2].verdict
    # without a chance line nothing is claimed about chance
    assert road.summary()[0].above_chance is None and "no chance line" in road.summary()[0].verdict
    with pytest.raises(CAManimError, match="chance must be one number"):
        road.summary(chance=[0.1, 0.2, 0.3, 0.4])


def test_plot_draws_the_chance_line(tmp_path):
    road = _road(np.array([[0.10], [0.30], [0.05]]))
    road.plot(tmp_path / "a.png")
    road.plot(tmp_path / "b.png", chance=0.2)
    from PIL import Image

    a = np.asarray(Image.open(tmp_path / "a.png").convert("RGB")).astype(int)
    b = np.asarray(Image.open(tmp_path / "b.png").convert("RGB")).astype(int)
    red = np.array([214, 39, 40])                              # matplotlib's tab:red
    # the best layer's star is red in both; a dashed red line across the axes only in b
    rows_a = (np.abs(a - red).sum(-1) < 40).sum(1)
    rows_b = (np.abs(b - red).sum(-1) < 40).sum(1)
    assert rows_b.max() > 0.15 * b.shape[1] > rows_a.max()


# ------------------------------------------------------------ pictures

def _circle_pixels(img: np.ndarray) -> int:
    """Pure black pixels: the best-layer circles (the ink is (30, 30, 30))."""
    return int((img.reshape(-1, 3) == 0).all(1).sum())


def test_no_best_mark_where_nothing_beats_chance():
    road = np.array([[0.1, 0.3, 0.2], [0.2, 0.1, 0.4]])       # (E, L)
    mask = np.array([[True, True, True], [False, True, False]])
    names = ["a", "b", "c"]
    marked = heatmap_image(road, [0, 1], names, mask=np.zeros_like(mask))
    one = heatmap_image(road, [0, 1], names, mask=mask)
    none = heatmap_image(road, [0, 1], names, mask=np.ones_like(mask))
    assert _circle_pixels(marked) > _circle_pixels(one) > _circle_pixels(none) == 0


def test_convergence_scale_holds_two_and_marks_the_first_epoch():
    names = ["l0", "l1"]
    change = np.array([[np.nan, np.nan], [0.5, 1.5], [1.0, np.nan]])
    img = convergence_image(change, [0, 1, 2], names)
    flat = convergence_image(np.array([[np.nan, np.nan], [1.0, 1.0], [1.0, 1.0]]), [0, 1, 2],
                             names)
    # 1.5 and 1.0 differ in colour (no clipping at 1)
    diff = np.abs(img.astype(int) - flat.astype(int)).sum(-1)
    assert (diff > 30).sum() > 100
    # first epoch (a column without values): white with dots; undefined cell: grey
    assert (img.reshape(-1, 3) == (250, 250, 250)).all(1).sum() > 50
    assert (img.reshape(-1, 3) == (215, 215, 215)).all(1).sum() > 50


def test_pictures_name_the_prefix_they_drop():
    names = ["model.layer1.0.conv1", "model.layer4.2.conv3"]
    assert short_names(names) == ["layer1.0.conv1", "layer4.2.conv3"]
    assert dropped_prefix(names) == "model." and dropped_prefix(["a.b", "c.d"]) == ""
    with_prefix = heatmap_image(np.ones((1, 2)), [0], names)
    without = heatmap_image(np.ones((1, 2)), [0], ["layer1.0.conv1", "layer4.2.conv3"])
    assert with_prefix.shape[0] > without.shape[0]            # one more legend line


def test_caption_keeps_the_class_name_whole():
    from camanim.engine import CAManim
    from camanim.viz.render import FrameRenderer

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.rand(1, 3, 32, 32)
    maps = CAManim(net, layers="conv")(x, [1])
    r = FrameRenderer(x, maps, normalization="both", size=128,
                      class_names=["normal", "malignant"], title="a long model title " * 4)
    texts: list[str] = []
    import camanim.viz.render as render

    real = render.join_fit

    def spy(parts, font, width, keep=1, sep=" · "):
        out = real(parts, font, width, keep=keep, sep=sep)
        texts.append(out)
        return out

    render.join_fit = spy
    try:
        r._canvas((0,))
    finally:
        render.join_fit = real
    assert texts and "malignant (1)" in texts[0]


# ------------------------------------------------------------ LayerTable

def test_layer_table_prints_as_a_table_and_exports_rows():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 2))
    table = list_layers(net, torch.zeros(1, 3, 16, 16), layers="all")
    text = str(table)
    assert text == repr(table)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["#", "name", "type"] and set(lines[1]) <= {"-", " "}
    assert "Conv2d" in text and "4x16x16" in text and "skipped" in text
    recs = table.to_records()
    assert [r["name"] for r in recs if r["index"] is not None] == table.names
    assert all(r["skipped"] for r in recs if r["index"] is None)
    assert recs[0]["output_shape"] == (4, 16, 16) and recs[0]["params"] == 3 * 4 * 9 + 4
    pd = pytest.importorskip("pandas")
    df = table.to_dataframe()
    assert isinstance(df, pd.DataFrame) and list(df["name"]) == [r["name"] for r in recs]
