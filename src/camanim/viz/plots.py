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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .fonts import dropped_prefix, fit_text, mono_font, prefix_note, short_names, wrap_text
from .overlay import colormap_lut

__all__ = ["ROAD_NOTE", "heatmap_image", "curve_image", "trajectories_image", "trajectories_figure",
           "agg_figure", "figure_rgb",
           "fit_figure", "label_size", "save_png"]

_BG = (255, 255, 255)
_INK = (30, 30, 30)
_GRID = (200, 200, 200)
_NAN = (215, 215, 215)
_ROAD = (31, 119, 180)
_CHANCE = (214, 39, 40)
_EBPG = (148, 103, 189)
_NAME_CHARS = 32              # longer layer names are cut in the middle
_BLANK = (250, 250, 250)      # cells with nothing to show (e.g. no previous epoch), dotted
#: The legend line under a ybROAD heatmap and curve (README: "Reading the numbers").
ROAD_NOTE = ("ROAD > 0: removing the pixels the map ranks most relevant hurts the class more "
             "than removing the least relevant; above chance (a random map) is the bar")
HEATMAP_NOTE = ("colour: ROAD, green > 0: the map finds the class; hatched: not above chance "
                "(a random map); circle: best layer, if above chance")
_strip_cache: dict[tuple, np.ndarray] = {}


def label_size(row: int) -> int:
    """Font size (px) of layer labels on rows ``row`` px apart: 12 px on
    roomy rows down to 8 px; rows under ~8 px get every k-th label."""
    return int(min(12, max(8, row - 2)))


def _label_step(font_size: int, row: int) -> int:
    return max(1, math.ceil(font_size * 1.15 / row))


def _label_strip(names: Sequence[str], row: int, font_size: int, rotate: bool) -> np.ndarray:
    """Layer labels, one per ``row`` pixels (every k-th when rows are too
    thin for the font): the index right-aligned in its own column, then the
    name; only names, right-aligned and rotated 90 degrees, for an x axis.
    Names longer than `_NAME_CHARS` are cut in the middle. The strip runs
    ``font_size`` px past the first and last row (room for the ends of the
    outer labels). Cached (``(H, W, 3)`` uint8; H is W when rotated)."""
    key = (tuple(names), row, font_size, rotate)
    if key not in _strip_cache:
        from PIL import Image, ImageDraw

        font = mono_font(font_size)
        step = _label_step(font_size, row)
        cap = font.getlength("M" * _NAME_CHARS)
        shown = [fit_text(n, font, cap) for n in names]
        idx_w = 0 if rotate else int(font.getlength(str(len(names) - 1))) + 8
        width = idx_w + int(max(font.getlength(n) for n in shown)) + 6
        im = Image.new("RGB", (width, row * len(names) + 2 * font_size), _BG)
        d = ImageDraw.Draw(im)
        for i in range(0, len(names), step):
            y = font_size + i * row + row / 2
            if rotate:
                d.text((width - 3, y), shown[i], font=font, fill=_INK, anchor="rm")
            else:
                d.text((idx_w - 6, y), str(i), font=font, fill=_INK, anchor="rm")
                d.text((idx_w, y), shown[i], font=font, fill=_INK, anchor="lm")
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


def _title_lines(title: str, font: Any, width: float, most: int = 3) -> list[str]:
    """``title`` broken at spaces onto at most ``most`` lines of ``width``
    pixels (the last cut in the middle if the title is still too long)."""
    return wrap_text(title, font, width, most)


def _heat_geometry(E: int, L: int) -> tuple[int, int]:
    """Column width and row height (px) of an ``E``-epoch, ``L``-layer heatmap."""
    cw = 24 if E <= 20 else 14 if E <= 40 else max(2, 560 // E)
    rh = max(12, min(32, 320 // max(L, 1))) if L <= 80 else max(6, 960 // L)
    return cw, rh


def _heat_scale(road: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    """Centre and half-range of the colour scale: symmetric around 0 at the
    largest absolute value, or the fixed ``vmin``..``vmax`` when given."""
    finite = road[np.isfinite(road)]
    v = float(np.abs(finite).max()) if finite.size else 1.0
    v = v if v > 0 else 1.0
    mid = 0.0
    if vmin is not None or vmax is not None:  # a fixed scale: shift it to be symmetric
        lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
        hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
        mid, v = (lo + hi) / 2, max((hi - lo) / 2, 1e-12)
    return mid, v


def _heat_cells(canvas: np.ndarray, road: np.ndarray, mid: float, v: float, lut: np.ndarray,
                mask: np.ndarray | None, blank: Sequence[bool] | np.ndarray | None,
                origin: tuple[int, int], cell: tuple[int, int]) -> None:
    """Paint the ``(E, L)`` cells into ``canvas`` at ``origin`` (x, y):
    colours, hatching where ``mask``, white dotted columns where ``blank``."""
    (x0, top), (cw, rh) = origin, cell
    E, L = road.shape
    ph, pw = rh * L, cw * max(E, 1)
    cells = _colors(road.T - mid, v, lut)                            # (L, E, 3)
    canvas[top:top + ph, x0:x0 + pw] = np.repeat(np.repeat(cells, rh, 0), cw, 1)
    if mask is not None:  # diagonal hatching, every 4th pixel
        big = np.repeat(np.repeat(np.asarray(mask, bool).reshape(E, L).T, rh, 0), cw, 1)
        yy, xx = np.mgrid[0:ph, 0:pw]
        canvas[top:top + ph, x0:x0 + pw][big & ((xx + yy) % 4 == 0)] = (70, 70, 70)
    for c in np.flatnonzero(np.asarray(blank, bool)) if blank is not None else ():
        col = canvas[top:top + ph, x0 + c * cw:x0 + (c + 1) * cw]
        col[:] = _BLANK
        col[1::4, 1::4] = (150, 150, 150)


def _heat_best(d: Any, road: np.ndarray, mask: np.ndarray | None, mark_best: bool,
               origin: tuple[int, int], cell: tuple[int, int]) -> None:
    """Circle each epoch's best layer, except in columns where every finite
    cell is masked (nothing there beats chance)."""
    (x0, top), (cw, rh) = origin, cell
    E, L = road.shape
    masked = None if mask is None else np.asarray(mask, bool).reshape(E, L)
    hidden = [masked is not None and bool(masked[e][np.isfinite(road[e])].all())
              for e in range(E)]
    for e in range(E if mark_best else 0):
        if np.isfinite(road[e]).any() and not hidden[e]:    # no "best" where none beats chance
            b = int(np.nanargmax(road[e]))
            cx, cy, r = x0 + e * cw + cw / 2, top + b * rh + rh / 2, max(2, min(cw, rh) / 2 - 2)
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(0, 0, 0), width=2)


def _heat_axes_text(d: Any, font: Any, epochs: Sequence[int], bar_labels: list[tuple[str, float]],
                    origin: tuple[int, int], plot: tuple[int, int], cw: int, bx: int) -> None:
    """Epoch ticks (every k-th where columns are thin), the ``epoch`` label
    and the colour bar's labels."""
    (x0, top), (pw, ph) = origin, plot
    tick_w = max((font.getlength(str(e)) for e in epochs), default=0) + 8
    for e in range(0, len(epochs), max(1, math.ceil(tick_w / cw))):
        d.text((x0 + e * cw + cw / 2, top + ph + 3), str(epochs[e]), font=font, fill=_INK,
               anchor="ma")
    d.text((x0 + pw / 2, top + ph + 18), "epoch", font=font, fill=_INK, anchor="ma")
    for text, f in bar_labels:
        anchor = "la" if f == 0 else "ld" if f == 1 else "lm"   # ends stay inside
        d.text((bx + 13, top + f * ph), text, font=font, fill=_INK, anchor=anchor)


def _heat_notes(names: Sequence[str], cmap: str, note: str | None) -> list[str]:
    """The legend lines under a heatmap: the dropped name prefix, then
    ``note`` (``"auto"``: `HEATMAP_NOTE` with the default colours)."""
    if note == "auto":
        note = HEATMAP_NOTE if cmap == "RdYlGn" else None
    prefix = dropped_prefix(names)
    return ([prefix_note(prefix)] if prefix else []) + ([note] if note else [])


def heatmap_image(road: np.ndarray, epochs: Sequence[int], names: Sequence[str],
                       title: str = "", *, cmap: str = "RdYlGn", vmin: float | None = None,
                       vmax: float | None = None, mask: np.ndarray | None = None,
                       mark_best: bool = True, blank: Sequence[bool] | np.ndarray | None = None,
                       note: str | None = "auto") -> np.ndarray:
    """Epoch-by-layer ROAD heatmap (layers top to bottom, epochs left to
    right, each epoch's best layer marked, colour bar), ``(H, W, 3)`` uint8.
    A column is 14 px wide up to 40 epochs, so the image widens by one
    column per epoch; then columns narrow to keep it under ~560 px. Rows are
    32..12 px up to 80 layers (every label shown), then ~960 px in all with
    every k-th label; names lose the prefix they all share.

    ``cmap``, ``vmin``, ``vmax``: colour scale (default: RdYlGn, symmetric
    around 0 at the largest absolute value); ``mask``: ``(E, L)`` bool, cells
    drawn hatched (e.g. layers not above the chance line); ``mark_best``:
    circle each epoch's highest value, except in a column whose every cell
    is masked (nothing there beats chance, so no layer is "best");
    ``blank``: ``(E,)`` bool, columns drawn white and dotted (nothing to
    show, e.g. the first epoch of a map change); ``note``: a legend line
    under the picture (``"auto"``: `HEATMAP_NOTE` with the default colours,
    none otherwise). Layer names lose the prefix they all share; the
    picture says which (`prefix_note`)."""
    from PIL import Image, ImageDraw

    road = np.asarray(road, dtype=np.float64).reshape(len(epochs), len(names))
    E, L = road.shape
    cw, rh = _heat_geometry(E, L)
    fs = label_size(rh)
    strip = _label_strip(short_names(names), rh, fs, rotate=False)
    font, tfont = mono_font(10), mono_font(11)
    notes = _heat_notes(names, cmap, note)
    mid, v = _heat_scale(road, vmin, vmax)
    bar_labels = [(f"{val:+.2g}", y) for val, y in ((mid + v, 0.0), (mid, 0.5), (mid - v, 1.0))]
    x0 = strip.shape[1] + 4
    pw, ph = cw * max(E, 1), rh * L
    bx = x0 + pw + 10
    width = max(x0 + pw + 70, bx + 16 + int(max(font.getlength(t) for t, _ in bar_labels)) + 6)
    lines = _title_lines(title, tfont, width - 8)
    note_lines = [ln for n in notes for ln in _title_lines(n, font, width - 8, most=10)]
    top = 10 + 14 * max(1, len(lines))
    height = top + ph + 34 + 13 * len(note_lines)
    canvas = np.asarray(Image.new("RGB", (width, height), _BG)).copy()
    canvas[top - fs:top + ph + fs, :strip.shape[1]] = strip
    lut = colormap_lut(cmap)
    if E:
        _heat_cells(canvas, road, mid, v, lut, mask, blank, (x0, top), (cw, rh))
    bar = _colors(np.linspace(v, -v, ph)[:, None], v, lut)             # colour bar
    canvas[top:top + ph, bx:bx + 10] = np.repeat(bar, 10, 1)
    im = Image.fromarray(canvas)
    d = ImageDraw.Draw(im)
    d.rectangle([x0 - 1, top - 1, x0 + pw, top + ph], outline=_INK)
    _heat_best(d, road, mask, mark_best, (x0, top), (cw, rh))
    _heat_axes_text(d, font, epochs, bar_labels, (x0, top), (pw, ph), cw, bx)
    for k, line in enumerate(lines):
        d.text((4, 6 + 14 * k), line, font=tfont, fill=_INK)
    for k, line in enumerate(note_lines):
        d.text((4, top + ph + 32 + 13 * k), line, font=font, fill=(90, 90, 90))
    return np.asarray(im)


def _curve_range(finite: np.ndarray, chance: float | None,
                 ph: int) -> tuple[float, float, list[tuple[float, str]]]:
    """The y range of a curve (finite ROAD values and the chance line, 0
    included, padded by 8%) and its ticks: the lowest score, zero and the
    highest, an end close to zero left out."""
    if chance is not None:
        finite = np.append(finite, chance)  # keep the line inside the axes
    lo = min(0.0, float(finite.min())) if finite.size else -1.0
    hi = max(0.0, float(finite.max())) if finite.size else 1.0
    if hi - lo < 1e-12:
        hi = lo + 1.0
    pad = 0.08 * (hi - lo)
    ticks = [(0.0, "+0")] + [(val, f"{val:+.3g}") for val in (lo, hi)
                             if abs(val) / (hi - lo) * ph / 1.16 > 12]
    return lo - pad, hi + pad, ticks


def _curve_y(val: float, top: int, ph: int, a: float, b: float) -> float:
    """The pixel row of ``val`` on an axis from ``a`` (bottom) to ``b`` (top)."""
    return top + ph - (val - a) / (b - a) * ph


def _dashed(d: Any, xa: float, ya: float, xb: float, yb: float, fill: Any = _EBPG) -> None:
    """A dashed line from (xa, ya) to (xb, yb): five dashes, 2 px wide."""
    for k in range(0, 10, 2):
        f0, f1 = k / 10, (k + 1) / 10
        d.line([(xa + (xb - xa) * f0, ya + (yb - ya) * f0),
                (xa + (xb - xa) * f1, ya + (yb - ya) * f1)], fill=fill, width=2)


def _curve_notes(names: Sequence[str], ebpg: bool) -> list[str]:
    """The legend lines under a curve: how to read ROAD (and EBPG), the
    dropped name prefix."""
    prefix = dropped_prefix(names)
    notes = [ROAD_NOTE] + (["EBPG: share of the map's energy inside the lesion (1: all)"]
                           if ebpg else [])
    if prefix:
        notes.append(prefix_note(prefix))
    return notes


def _curve_legend(d: Any, font: Any, legend: list[tuple[str, Any, bool]], best_text: str,
                  width: int) -> None:
    """The legend row above a curve: a line sample and name per series,
    then the best layer (cut to fit)."""
    x = 4.0
    for text, color, dash in legend:
        if dash:
            _dashed(d, x, 29, x + 20, 29, color)
        else:
            d.line([(x, 29), (x + 20, 29)], fill=color, width=2)
        d.text((x + 26, 29), text, font=font, fill=color, anchor="lm")
        x += 26 + font.getlength(text) + 12
    if best_text:
        d.text((x, 29), fit_text(best_text, font, width - x - 4), font=font, fill=_INK,
               anchor="lm")


def _curve_ebpg(d: Any, font: Any, ebpg: np.ndarray, frame: tuple[int, int, int, int],
                cw: int) -> None:
    """EBPG per layer, dashed, on a 0..1 axis labelled on the right."""
    left, top, pw, ph = frame
    eb = np.asarray(ebpg, dtype=np.float64).reshape(-1)
    pts = [(left + i * cw + cw / 2, _curve_y(float(e), top, ph, 0.0, 1.0))
           for i, e in enumerate(eb) if np.isfinite(e)]
    for (xa, ya), (xb, yb) in zip(pts[:-1], pts[1:], strict=False):
        _dashed(d, xa, ya, xb, yb)
    for val in (0.0, 1.0):
        d.text((left + pw + 4, _curve_y(val, top, ph, 0.0, 1.0)), f"{val:.0f}", font=font,
               fill=_EBPG, anchor="lm")


def _curve_road(d: Any, road: np.ndarray, best: int, chance: float | None,
                frame: tuple[int, int, int, int], cw: int, span: tuple[float, float]) -> None:
    """The chance line (dashed red), the ROAD curve with its points, and the
    best layer's point in gold."""
    left, top, pw, ph = frame
    lo, hi = span
    if chance is not None:
        yc = _curve_y(chance, top, ph, lo, hi)
        for xc in range(left, left + pw, 8):
            d.line([(xc, yc), (min(xc + 4, left + pw), yc)], fill=_CHANCE, width=1)
    pts = [(left + i * cw + cw / 2, _curve_y(float(r), top, ph, lo, hi))
           for i, r in enumerate(road) if np.isfinite(r)]
    if len(pts) > 1:
        d.line(pts, fill=_ROAD, width=2)
    for x, y in pts:
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=_ROAD)
    if best >= 0:
        x, y = left + best * cw + cw / 2, _curve_y(float(road[best]), top, ph, lo, hi)
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=(245, 197, 24), outline=(0, 0, 0))


def curve_image(road: np.ndarray, names: Sequence[str], title: str = "",
                     ebpg: np.ndarray | None = None, chance: float | None = None) -> np.ndarray:
    """This epoch's ybROAD curve (ROAD per layer, best layer marked and
    named), with the EBPG per layer dashed on a 0..1 axis when given and
    ``chance`` (the ROAD of a random map) as a dashed red reference line.
    Columns are 16..6 px (every k-th name under thin ones), names lose the
    prefix they all share (named under the picture), and a line under it
    says how to read ROAD (and EBPG). ``(H, W, 3)`` uint8."""
    from PIL import Image, ImageDraw

    road = np.asarray(road, dtype=np.float64).reshape(-1)
    labels = short_names(names)
    L = len(labels)
    cw = max(6, min(16, 800 // max(L, 1)))
    fs = label_size(cw)
    strip = _label_strip(labels, cw, fs, rotate=True)                  # (h, L*cw + 2fs)
    font, tfont = mono_font(10), mono_font(11)
    top, ph = 40, 150
    finite = road[np.isfinite(road)]
    best = int(np.nanargmax(road)) if finite.size else -1
    chance = None if chance is None or not math.isfinite(float(chance)) else float(chance)
    lo, hi, ticks = _curve_range(finite, chance, ph)
    left = int(max(font.getlength(t) for _, t in ticks)) + 12
    right = max(fs + 2, int(font.getlength("1")) + 12 if ebpg is not None else 16)
    pw = cw * L
    legend = [("ROAD", _ROAD, False)] + ([("EBPG (right axis)", _EBPG, True)]
                                          if ebpg is not None else []) \
        + ([("chance", _CHANCE, True)] if chance is not None else [])
    best_text = f"best: {labels[best]} ({road[best]:+.3g})" if best >= 0 else ""
    legend_w = sum(26 + font.getlength(t) + 12 for t, _, _ in legend) + font.getlength(best_text)
    width = max(left + pw + right, int(legend_w) + 12, min(900, int(tfont.getlength(title)) + 10))
    notes = _curve_notes(names, ebpg is not None)
    note_lines = [ln for n in notes for ln in _title_lines(n, font, width - 8, most=10)]
    height = top + ph + 6 + strip.shape[0] + 4 + 13 * len(note_lines)
    canvas = np.full((height, width, 3), 255, np.uint8)
    canvas[top + ph + 6: top + ph + 6 + strip.shape[0], left - fs:left + pw + fs] = strip
    im = Image.fromarray(canvas)
    d = ImageDraw.Draw(im)
    d.rectangle([left, top, left + pw, top + ph], outline=_INK)
    d.line([(left, _curve_y(0.0, top, ph, lo, hi)), (left + pw, _curve_y(0.0, top, ph, lo, hi))],
           fill=_GRID)
    for val, text in ticks:
        d.text((left - 4, _curve_y(val, top, ph, lo, hi)), text, font=font, fill=_INK, anchor="rm")
    _curve_legend(d, font, legend, best_text, width)
    if ebpg is not None:
        _curve_ebpg(d, font, ebpg, (left, top, pw, ph), cw)
    _curve_road(d, road, best, chance, (left, top, pw, ph), cw, (lo, hi))
    d.text((4, 6), fit_text(title, tfont, im.width - 8), font=tfont, fill=_INK)
    y0 = top + ph + 6 + strip.shape[0] + 2
    for k, line in enumerate(note_lines):
        d.text((4, y0 + 13 * k), line, font=font, fill=(90, 90, 90))
    return np.asarray(im)


def agg_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas, no pyplot: no global state, no GUI, no leak
    return fig


def figure_rgb(fig: Any) -> np.ndarray:
    """Draw ``fig`` and return its pixels, ``(H, W, 3)`` uint8 (the figure is cleared)."""
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    fig.clear()
    return rgb


def fit_figure(fig: Any, pad: float = 0.1) -> Any:
    """Resize ``fig`` to the box of everything it draws plus ``pad`` inches
    (what ``bbox_inches="tight"`` does when saving), moving the axes with
    it, so that no label, legend or title is cut at an edge. Returns ``fig``."""
    fig.canvas.draw()
    box = fig.get_tightbbox(fig.canvas.get_renderer())            # inches
    w, h = fig.get_size_inches()
    nw, nh = box.width + 2 * pad, box.height + 2 * pad
    for ax in fig.axes:
        p = ax.get_position()
        ax.set_position(((p.x0 * w - box.x0 + pad) / nw, (p.y0 * h - box.y0 + pad) / nh,
                         p.width * w / nw, p.height * h / nh))
    fig.set_size_inches(nw, nh)
    return fig


def _cut(text: str, n: int) -> str:
    """``text`` cut in the middle to at most ``n`` characters."""
    return (
        text
        if len(text) <= n
        else text[: (n - 1) // 2 + (n - 1) % 2] + "…" + text[-((n - 1) // 2) :]
    )


def trajectories_figure(series: Sequence[Any]) -> Any:
    """The matplotlib figure of `trajectories_image`, laid out to fit."""
    counts = {len(s.names) for s in series}
    relative = len(counts) > 1
    names = [] if relative or not series else short_names(series[0].names)
    L = len(names)
    step = max(1, math.ceil(L / 60))                     # y labels: at most ~60
    n_ticks = math.ceil(L / step)
    fig = agg_figure(7.0, max(3.6, 0.14 * n_ticks + 1.0))
    ax = fig.add_axes((0.3, 0.1, 0.5, 0.8))
    # the legend names only what differs between the series; the rest goes in the title
    keys = ("run", "method", "probe")
    same = [k for k in keys if len({str(getattr(s, k)) for s in series}) == 1]
    varying = [k for k in keys if k not in same] or ["probe"]
    n = len(series)
    for k, s in enumerate(series):
        best = s.best_layers().astype(np.float64)
        best[best < 0] = np.nan
        y = best / max(len(s.names) - 1, 1) if relative else best
        # a small offset per line so that equal trajectories stay visible
        y = y + (k - (n - 1) / 2) * (0.012 if relative else 0.06) * (n > 1)
        ax.plot(s.epochs, y, marker="o", markersize=3, linewidth=1.2, drawstyle="steps-post",
                label=_cut(" · ".join(str(getattr(s, k)) for k in varying), 48))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel("best layer (relative depth)" if relative else "best layer", fontsize=8)
    if L:
        digits = len(str(L - 1))
        ax.set_yticks(range(0, L, step))
        ax.set_yticklabels([f"{_cut(names[i], _NAME_CHARS)} {i:>{digits}}"
                            for i in range(0, L, step)], fontsize=7, family="monospace")
        ax.set_ylim(-0.5, L - 0.5)
    ax.tick_params(labelsize=7)
    sub = " · ".join(str(getattr(series[0], k)) for k in same) if series else ""
    ax.set_title("best ybROAD layer per epoch" + (f"\n{_cut(sub, 80)}" if sub else ""),
                 fontsize=9)
    if n > 1 or not same:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fit_figure(fig)


def trajectories_image(series: Sequence[Any]) -> np.ndarray:
    """Best layer per epoch, one line per series (relative depth 0..1 when
    the series have different layer counts; else layer names on the y axis,
    every k-th past 60 layers). ``(H, W, 3)`` uint8."""
    return figure_rgb(trajectories_figure(series))


def save_png(path: Path, rgb: np.ndarray) -> Path:
    """Write an ``(H, W, 3)`` uint8 image as PNG: complete under ``path`` or
    not there (temporary name, sync, rename)."""
    from PIL import Image

    from ..core.files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return path


