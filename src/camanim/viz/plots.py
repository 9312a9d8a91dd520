"""Run-level pictures: the epoch-by-layer ROAD heatmap, one epoch's ybROAD
curve and the best-layer trajectories of a study.

The heatmap and curve are drawn with numpy + PIL (~10 ms, against ~0.5 s for
a matplotlib figure with 53 layer labels, where text layout dominates), so
the callback can draw them every epoch; `camanim study` draws the same
pictures with the same functions. Label strips, which never change during a
run, are cached.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .fonts import fit_text, mono_font
from .render import colormap_lut

__all__ = ["heatmap_image", "curve_image", "trajectories_image", "save_png"]

_BG = (255, 255, 255)
_INK = (30, 30, 30)
_GRID = (200, 200, 200)
_NAN = (215, 215, 215)
_strip_cache: dict[tuple, np.ndarray] = {}


def _label_strip(names: Sequence[str], row: int, font_size: int, rotate: bool) -> np.ndarray:
    """Layer labels, one per ``row`` pixels: the index right-aligned in its own
    column, then the name; only names, right-aligned and rotated 90 degrees,
    for an x axis. Cached (``(H, W, 3)`` uint8)."""
    key = (tuple(names), row, font_size, rotate)
    if key not in _strip_cache:
        from PIL import Image, ImageDraw

        font = mono_font(font_size)
        step = max(1, math.ceil(font_size * 1.1 / row))
        idx_w = 0 if rotate else int(font.getlength(str(len(names) - 1))) + 8
        width = idx_w + int(max(font.getlength(n) for n in names)) + 6
        im = Image.new("RGB", (width, row * len(names)), _BG)
        d = ImageDraw.Draw(im)
        for i in range(0, len(names), step):
            y = i * row + row / 2
            if rotate:
                d.text((width - 3, y), names[i], font=font, fill=_INK, anchor="rm")
            else:
                d.text((idx_w - 6, y), str(i), font=font, fill=_INK, anchor="rm")
                d.text((idx_w, y), names[i], font=font, fill=_INK, anchor="lm")
        if rotate:
            im = im.transpose(Image.Transpose.ROTATE_90)
        if len(_strip_cache) > 64:
            _strip_cache.clear()
        _strip_cache[key] = np.asarray(im)
    return _strip_cache[key]


def _colors(values: np.ndarray, v: float, lut: np.ndarray) -> np.ndarray:
    idx = np.clip((np.nan_to_num(values) + v) / (2 * v) * 255 + 0.5, 0, 255).astype(np.int64)
    rgb = lut[idx]
    rgb[~np.isfinite(values)] = _NAN
    return rgb


def heatmap_image(road: np.ndarray, epochs: Sequence[int], names: Sequence[str],
                       title: str = "", *, cmap: str = "RdYlGn", vmin: float | None = None,
                       vmax: float | None = None, mask: np.ndarray | None = None,
                       mark_best: bool = True) -> np.ndarray:
    """Epoch-by-layer ROAD heatmap (layers top to bottom, epochs left to
    right, each epoch's best layer marked, colour bar), ``(H, W, 3)`` uint8.
    A column is 14 px wide up to 40 epochs, so the image widens by one
    column per epoch; then columns narrow to keep it under ~560 px.

    ``cmap``, ``vmin``, ``vmax``: colour scale (default: RdYlGn, symmetric
    around 0 at the largest absolute value); ``mask``: ``(E, L)`` bool, cells
    drawn hatched (e.g. layers not above the chance line); ``mark_best``:
    circle each epoch's highest value."""
    from PIL import Image, ImageDraw

    road = np.asarray(road, dtype=np.float64).reshape(len(epochs), len(names))
    E, L = road.shape
    cw = 24 if E <= 20 else 14 if E <= 40 else max(2, 560 // E)
    rh = max(12, min(32, 320 // max(L, 1))) if L <= 80 else max(3, 960 // L)
    fs = 10
    strip = _label_strip(names, rh, fs, rotate=False)
    top, bottom, gap = 24, 34, 4
    x0 = strip.shape[1] + gap
    pw, ph = cw * max(E, 1), rh * L
    width = x0 + pw + 70
    height = top + ph + bottom
    im = Image.new("RGB", (width, height), _BG)
    canvas = np.asarray(im).copy()
    canvas[top:top + ph, :strip.shape[1]] = strip
    finite = road[np.isfinite(road)]
    v = float(np.abs(finite).max()) if finite.size else 1.0
    v = v if v > 0 else 1.0
    mid = 0.0
    if vmin is not None or vmax is not None:  # a fixed scale: shift it to be symmetric
        lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
        hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
        mid, v = (lo + hi) / 2, max((hi - lo) / 2, 1e-12)
    lut = colormap_lut(cmap)
    if E:
        cells = _colors(road.T - mid, v, lut)                            # (L, E, 3)
        canvas[top:top + ph, x0:x0 + pw] = np.repeat(np.repeat(cells, rh, 0), cw, 1)
        if mask is not None:  # diagonal hatching, every 4th pixel
            big = np.repeat(np.repeat(np.asarray(mask, bool).reshape(E, L).T, rh, 0), cw, 1)
            yy, xx = np.mgrid[0:ph, 0:pw]
            canvas[top:top + ph, x0:x0 + pw][big & ((xx + yy) % 4 == 0)] = (70, 70, 70)
    bar = _colors(np.linspace(v, -v, ph)[:, None], v, lut)             # colour bar
    bx = x0 + pw + 10
    canvas[top:top + ph, bx:bx + 10] = np.repeat(bar, 10, 1)
    im = Image.fromarray(canvas)
    d = ImageDraw.Draw(im)
    font = mono_font(fs)
    d.rectangle([x0 - 1, top - 1, x0 + pw, top + ph], outline=_INK)
    for e in range(E if mark_best else 0):
        if np.isfinite(road[e]).any():
            b = int(np.nanargmax(road[e]))
            cx, cy, r = x0 + e * cw + cw / 2, top + b * rh + rh / 2, max(2, min(cw, rh) / 2 - 2)
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(0, 0, 0), width=2)
    step = max(1, math.ceil(24 / cw))
    for e in range(0, E, step):
        d.text((x0 + e * cw + cw / 2, top + ph + 3), str(epochs[e]), font=font, fill=_INK,
               anchor="ma")
    d.text((x0 + pw / 2, top + ph + 18), "epoch", font=font, fill=_INK, anchor="ma")
    for val, y in ((mid + v, top), (mid, top + ph / 2), (mid - v, top + ph)):
        d.text((bx + 13, y), f"{val:+.2g}", font=font, fill=_INK, anchor="lm")
    d.text((4, 6), fit_text(title, mono_font(11), im.width - 8), font=mono_font(11), fill=_INK)
    return np.asarray(im)


def curve_image(road: np.ndarray, names: Sequence[str], title: str = "",
                     ebpg: np.ndarray | None = None, chance: float | None = None) -> np.ndarray:
    """This epoch's ybROAD curve (ROAD per layer, best layer marked), with
    the EBPG per layer dashed on a 0..1 axis when given, and ``chance`` (the
    ROAD of a random map) as a dashed reference line. ``(H, W, 3)`` uint8."""
    from PIL import Image, ImageDraw

    road = np.asarray(road, dtype=np.float64).reshape(-1)
    L = len(names)
    cw = max(6, min(16, 800 // max(L, 1)))
    fs = 10
    strip = _label_strip(names, cw, fs, rotate=True)                   # (h, L*cw)
    left, right, top, ph = 56, 50 if ebpg is not None else 16, 24, 150
    pw = cw * L
    width, height = left + pw + right, top + ph + 6 + strip.shape[0] + 4
    canvas = np.full((height, width, 3), 255, np.uint8)
    canvas[top + ph + 6: top + ph + 6 + strip.shape[0], left:left + pw] = strip[:, :pw]
    im = Image.fromarray(canvas)
    d = ImageDraw.Draw(im)
    font = mono_font(fs)
    finite = road[np.isfinite(road)]
    chance = None if chance is None or not math.isfinite(float(chance)) else float(chance)
    if chance is not None:
        finite = np.append(finite, chance)  # keep the line inside the axes
    lo = min(0.0, float(finite.min())) if finite.size else -1.0
    hi = max(0.0, float(finite.max())) if finite.size else 1.0
    if hi - lo < 1e-12:
        hi = lo + 1.0
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def y_of(val: float, a: float = lo, b: float = hi) -> float:
        return top + ph - (val - a) / (b - a) * ph

    def x_of(i: int) -> float:
        return left + i * cw + cw / 2

    d.rectangle([left, top, left + pw, top + ph], outline=_INK)
    d.line([(left, y_of(0.0)), (left + pw, y_of(0.0))], fill=_GRID)
    for val in (lo + pad, 0.0, hi - pad):
        d.text((left - 4, y_of(val)), f"{val:+.3g}", font=font, fill=_INK, anchor="rm")
    d.text((4, top + ph / 2 + 14), "ROAD", font=font, fill=(31, 119, 180))
    if ebpg is not None:
        eb = np.asarray(ebpg, dtype=np.float64).reshape(-1)
        pts = [(x_of(i), y_of(float(e), 0.0, 1.0)) for i, e in enumerate(eb) if np.isfinite(e)]
        for (xa, ya), (xb, yb) in zip(pts[:-1], pts[1:]):
            for k in range(0, 10, 2):  # dashed
                f0, f1 = k / 10, (k + 1) / 10
                d.line([(xa + (xb - xa) * f0, ya + (yb - ya) * f0),
                        (xa + (xb - xa) * f1, ya + (yb - ya) * f1)], fill=(148, 103, 189), width=2)
        for val in (0.0, 1.0):
            d.text((left + pw + 4, y_of(val, 0.0, 1.0)), f"{val:.0f}", font=font,
                   fill=(148, 103, 189), anchor="lm")
        d.text((left + pw + 4, top + ph / 2), "EBPG", font=font, fill=(148, 103, 189),
               anchor="lm")
    if chance is not None:
        yc = y_of(chance)
        for x in range(left, left + pw, 8):
            d.line([(x, yc), (min(x + 4, left + pw), yc)], fill=(214, 39, 40), width=1)
        d.text((left + 3, yc - 1), "chance", font=font, fill=(214, 39, 40), anchor="lb")
    pts = [(x_of(i), y_of(float(r))) for i, r in enumerate(road) if np.isfinite(r)]
    if len(pts) > 1:
        d.line(pts, fill=(31, 119, 180), width=2)
    for x, y in pts:
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(31, 119, 180))
    if np.isfinite(road).any():
        b = int(np.nanargmax(road))
        x, y = x_of(b), y_of(float(road[b]))
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=(245, 197, 24), outline=(0, 0, 0))
    d.text((4, 6), fit_text(title, mono_font(11), im.width - 8), font=mono_font(11), fill=_INK)
    return np.asarray(im)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas, no pyplot: no global state, no GUI, no leak
    return fig


def _to_rgb(fig) -> np.ndarray:
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    fig.clear()
    return rgb


def trajectories_image(series: Sequence[Any]) -> np.ndarray:
    """Best layer per epoch, one line per series (relative depth 0..1 when
    the series have different layer counts)."""
    counts = {len(s.names) for s in series}
    relative = len(counts) > 1
    fig = _figure(8.0, 4.6)
    ax = fig.add_axes((0.09, 0.12, 0.62, 0.8))
    n = len(series)
    for k, s in enumerate(series):
        best = s.best_layers().astype(np.float64)
        best[best < 0] = np.nan
        y = best / max(len(s.names) - 1, 1) if relative else best
        # a small offset per line so that equal trajectories stay visible
        y = y + (k - (n - 1) / 2) * (0.012 if relative else 0.06) * (n > 1)
        ax.plot(s.epochs, y, marker="o", markersize=3, linewidth=1.2,
                drawstyle="steps-post", label=f"{s.run} · {s.method} · {s.probe}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel("best layer (relative depth)" if relative else "best layer index",
                  fontsize=8)
    if not relative and series:
        names = series[0].names
        if len(names) <= 40:
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels(names, fontsize=6, family="monospace")
    ax.tick_params(labelsize=7)
    ax.set_title("best ybROAD layer per epoch", fontsize=9)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _to_rgb(fig)


def save_png(path: Path, rgb: np.ndarray) -> Path:
    """Write an ``(H, W, 3)`` uint8 image as PNG: complete under ``path`` or
    not there (temporary name, sync, rename)."""
    from PIL import Image

    from ..core.files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return path


