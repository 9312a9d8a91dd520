"""Every figure stays legible at 16, 53 and 156 layers: no text is clipped
at an edge, no two labels overlap, names lose their shared prefix, and the
frame captions keep the method and the normalization.

PIL figures: every ``ImageDraw.text`` call is recorded with its ink box
(``textbbox``) and the size of the image it is drawn on. Matplotlib figures:
every drawn text artist's window extent (``get_window_extent`` with the
canvas renderer) must lie inside the canvas.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import ImageDraw

from camanim.core.maps import LayerMaps
from camanim.runs.study import ProbeSeries
from camanim.viz import plots
from camanim.viz.figures import contact_sheet, plot_params
from camanim.viz.fonts import join_fit, sans_font, short_names
from camanim.viz.render import render_frames
from test_render import make_images, make_maps

COUNTS = (16, 53, 156)


@pytest.fixture(scope="module")
def resnet50_names() -> dict[int, list[str]]:
    """Layer names as a LightningModule holding a ResNet-50 as ``self.model``
    reports them: 53 conv layers, 16 of them evenly spaced (the example's
    default), and all 156 layers."""
    torchvision = pytest.importorskip("torchvision")
    from camanim import list_layers

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval()
    x = torch.zeros(1, 3, 64, 64)
    conv = ["model." + info.name for info in list_layers(net, x, "conv")]
    every = ["model." + info.name for info in list_layers(net, x, "all")]
    assert len(conv) == 53 and len(every) == 156
    pick = np.linspace(0, 52, 16).round().astype(int)
    return {16: [conv[i] for i in pick], 53: conv, 156: every}


# ------------------------------------------------------------ PIL checks

@pytest.fixture
def pil_texts(monkeypatch):
    """Record ``(image size, ink box, text)`` of every ``ImageDraw.text``
    call, grouped by the image drawn on; label strips are not served from
    the cache so that their text is drawn (and recorded) here."""
    drawn: dict[int, tuple[tuple[int, int], list, object]] = {}
    original = ImageDraw.ImageDraw.text

    def text(self, xy, txt, fill=None, font=None, anchor=None, *args, **kwargs):
        if txt:
            box = self.textbbox(xy, txt, font=font, anchor=anchor)
            # keyed by the drawer, kept alive so that its id is not reused
            drawn.setdefault(id(self), (self.im.size, [], self))[1].append((box, txt))
        return original(self, xy, txt, fill, font, anchor, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    monkeypatch.setattr(plots, "_strip_cache", {})
    return drawn


def _overlap(a, b, tol: float = 1.0) -> bool:
    return (min(a[2], b[2]) - max(a[0], b[0]) > tol) and (min(a[3], b[3]) - max(a[1], b[1]) > tol)


def check_pil(drawn) -> list[str]:
    """Every recorded text inside its image, no two overlapping; returns
    every text drawn."""
    assert drawn, "nothing was drawn"
    texts = []
    for size, items, _ in drawn.values():
        w, h = size
        for (x0, y0, x1, y1), txt in items:
            assert x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h, \
                f"{txt!r} at {(x0, y0, x1, y1)} is cut by the {w}x{h} image"
        for i, (a, ta) in enumerate(items):
            for b, tb in items[i + 1:]:
                assert not _overlap(a, b), f"{ta!r} {a} overlaps {tb!r} {b}"
        texts += [t for _, t in items]
    return texts


def _no_prefix(texts: list[str]) -> None:
    assert not any("model." in t for t in texts), [t for t in texts if "model." in t][:3]


@pytest.mark.parametrize("L", COUNTS)
def test_heatmap_legible(L, resnet50_names, pil_texts):
    names = resnet50_names[L]
    road = np.random.default_rng(L).normal(0, 0.1, (6, L))
    img = plots.heatmap_image(road, list(range(6)), names,
                              title="malignant_0: ybROAD by epoch (gradcam)")
    texts = check_pil(pil_texts)
    _no_prefix(texts)
    assert "malignant_0: ybROAD by epoch (gradcam)" in texts            # title whole
    shown = [t for t in texts if t in short_names(names)]
    assert len(shown) >= (L if L <= 80 else L // 2)                     # most rows named
    rows = (img.shape[0] - 24 - 34) / L
    assert rows >= 6 and img.shape[0] <= 1200
    # a study's long title on a narrow (2-epoch) heatmap: broken onto lines, whole
    pil_texts.clear()
    title = "runs/finetune_bus/version_12 · integrated_gradcam · malignant_0046: ybROAD"
    plots.heatmap_image(road[:2], [0, 1], names, title=title)
    labels = set(short_names(names))
    lines = [t for t in check_pil(pil_texts) if t in title and t not in labels and not t.isdigit()]
    assert len(lines) >= 2 and " ".join(lines) == title


@pytest.mark.parametrize("L", COUNTS)
def test_curve_legible(L, resnet50_names, pil_texts):
    names = resnet50_names[L]
    rng = np.random.default_rng(L)
    road = rng.normal(0, 0.1, L)
    road[7] = 2.5e3                                                     # a wide tick label
    plots.curve_image(road, names, title="malignant_0: ybROAD, epoch 5",
                      ebpg=rng.uniform(0, 1, L))
    plots.curve_image(np.abs(road) + 0.01, names)                       # all above zero
    texts = check_pil(pil_texts)
    _no_prefix(texts)
    assert any(t.startswith("best: " + short_names(names)[7]) for t in texts)


@pytest.mark.parametrize("L", (53, 156))
@pytest.mark.parametrize("size", (None, 160))
def test_frame_captions_keep_method_and_normalization(L, size, resnet50_names, pil_texts):
    """At the default frame width (128 px images: 320 px panels) and at the
    TensorBoard GIF width (160 px panels), with ybROAD scores (the caption
    shares its row with the curve), a class name and an epoch title."""
    base = make_maps(L=L, H=16, W=16)
    names = resnet50_names[L]
    maps = LayerMaps(names=names, raw=base.raw, input_size=base.input_size,
                     layers=base.layers, targets=base.targets, method="gradcam")
    road = np.linspace(-0.3, 0.4, L)[:, None]
    for norm in ("local", "global"):
        pil_texts.clear()
        gen = render_frames(make_images(1, 128, 128), maps, normalization=norm, road=road,
                            size=size, class_names=["malignant", "normal"], title="epoch 5")
        for _ in range(3):
            next(gen)
        texts = check_pil(pil_texts)
        _no_prefix(texts)
        caption = [t for t in texts if "gradcam" in t]
        assert caption and all(t.startswith(f"gradcam · {norm}") for t in caption), caption
        assert any(t.startswith("1/") and t.endswith("  " + short_names(names)[0])
                   for t in texts)


# ----------------------------------------------------- matplotlib checks

def check_mpl(fig: Figure) -> list[str]:
    """Draw ``fig``; every drawn text artist inside the canvas, no two
    overlapping; returns their texts."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    ticks, drawn = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                for lab in (tick.label1, tick.label2):
                    ticks.add(id(lab))
                    if (
                        lab.get_visible()
                        and lab.get_text().strip()
                        and lo - 1e-9 * abs(hi - lo) <= tick.get_loc() <= hi + 1e-9 * abs(hi - lo)
                    ):
                        drawn.append(lab)
    drawn += [t for t in fig.findobj(Text)
              if id(t) not in ticks and t.get_visible() and t.get_text().strip()]
    W, H = fig.bbox.width, fig.bbox.height
    boxes = []
    for t in drawn:
        e = t.get_window_extent(r)
        assert e.x0 >= -0.5 and e.y0 >= -0.5 and e.x1 <= W + 0.5 and e.y1 <= H + 0.5, \
            f"{t.get_text()!r} at {e.extents.round(1)} is cut by the {W:.0f}x{H:.0f} canvas"
        boxes.append(((e.x0, e.y0, e.x1, e.y1), t.get_text()))
    for i, (a, ta) in enumerate(boxes):
        for b, tb in boxes[i + 1:]:
            assert not _overlap(a, b), f"{ta!r} overlaps {tb!r}"
    return [t for _, t in boxes]


@pytest.fixture
def saved_figures(monkeypatch):
    """Check each figure as it is saved (at the dpi it is saved with)."""
    checked: list[list[str]] = []
    original = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        dpi = kwargs.get("dpi")
        old = self.dpi
        if isinstance(dpi, (int, float)):
            self.set_dpi(dpi)
        checked.append(check_mpl(self))
        self.set_dpi(old)
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return checked


def _series(names: list[str], run: str, seed: int, method: str = "gradcam") -> ProbeSeries:
    road = np.random.default_rng(seed).normal(0, 0.1, (8, len(names)))
    return ProbeSeries(run=run, method=method, probe="malignant_0", epochs=list(range(8)),
                       names=names, road=road)


@pytest.mark.parametrize("L", COUNTS)
def test_best_layer_trajectories_legible(L, resnet50_names):
    names = resnet50_names[L]
    series = [_series(names, f"runs/finetune_bus/version_{k}", k) for k in range(3)]
    fig = plots.trajectories_figure(series)
    texts = check_mpl(fig)
    _no_prefix(texts)
    labels = [t for t in texts if t.split()[0] in short_names(names)]
    assert len(labels) >= min(L, 40)                    # the y axis names the layers
    assert any("layer4.2.conv3" in t for t in labels) or L == 16
    img = plots.trajectories_image(series)
    assert img.shape[:2] == (int(fig.bbox.height), int(fig.bbox.width))
    # different layer counts: relative depth, still nothing cut
    mixed = series[:1] + [_series(resnet50_names[16], "runs/other_run_with_a_long_name", 9,
                                  method="integrated_gradcam")]
    check_mpl(plots.trajectories_figure(mixed))


@pytest.mark.parametrize("L", (53, 156))
def test_contact_sheet_and_params_legible(L, resnet50_names, saved_figures, tmp_path: Path):
    base = make_maps(L=L, H=16, W=16)
    maps = LayerMaps(names=resnet50_names[L], raw=base.raw, input_size=base.input_size,
                     layers=base.layers, targets=base.targets, method="gradcam",
                     seconds=base.seconds)
    road = np.linspace(-0.3, 0.4, L)[:, None]
    contact_sheet(tmp_path / "sheet.png", make_images(1, 16, 16), maps, road=road,
                  normalization="both")
    plot_params(tmp_path / "params.png", maps)
    few = LayerMaps(names=maps.names[:3], raw=maps.raw[:3], input_size=maps.input_size,
                    layers=maps.layers[:3], targets=maps.targets, method="integrated_gradcam")
    contact_sheet(tmp_path / "few.png", make_images(1, 16, 16), few, normalization="both")
    sheet, params, small = saved_figures
    _no_prefix(sheet)
    assert any(t.startswith("layer4") for t in sheet)
    assert any("156 layers" in t or "53 layers" in t for t in params)
    assert any(t.startswith("integrated_gradcam") for t in small)        # the title whole


# ------------------------------------------------------------ text helpers

def test_short_names_drop_the_shared_prefix_only():
    assert short_names(["model.conv1", "model.layer1.0.conv1"]) == ["conv1", "layer1.0.conv1"]
    assert short_names(["model.backbone.a", "model.backbone.b.c"]) == ["a", "b.c"]
    # every name keeps its last part; nothing shared, or one name: unchanged
    assert short_names(["model.layer1", "model.layer1.0.conv1"]) == ["layer1", "layer1.0.conv1"]
    assert short_names(["conv1", "layer1.relu#2"]) == ["conv1", "layer1.relu#2"]
    assert short_names(["model.layer4.2.conv3"]) == ["model.layer4.2.conv3"]
    assert short_names(["modelx.a", "model.b"]) == ["modelx.a", "model.b"]


def test_join_fit_keeps_the_first_parts_whole():
    font = sans_font(12)
    parts = ["integrated_gradcam", "global", "target: malignant (1)", "epoch 12"]
    full = " · ".join(parts)
    assert join_fit(parts, font, font.getlength(full) + 1, keep=2) == full
    for width in (300, 250, 200, 172):
        out = join_fit(parts, font, width, keep=2)
        assert out.startswith("integrated_gradcam · global") and font.getlength(out) <= width
    # too narrow even for method and normalization: the method is cut in the middle
    out = join_fit(parts, font, 150, keep=2)
    assert out.endswith(" · global") and "…" in out and font.getlength(out) <= 150
