"""Still figures of a CAManim run (matplotlib, Agg backend).

* `contact_sheet`: every 10th-percentile layer side by side, layer names
  under the tiles (paper Figs. 4-5);
* `plot_params`: the parameters of every drawn layer on a log axis
  (paper Fig. 3);
* `run_summary` / `format_summary` / `write_summary`: the paper's Table 1 for
  one run (total parameters, total and mean per-layer runtime, layers drawn).
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.files import save_figure, write_text
from ..core.maps import LayerMaps
from ..errors import CAManimError
from .fonts import sans_font, short_names, wrap_text
from .overlay import colormap_lut, display_images, iter_maps, overlay
from .plots import fit_figure
from .render import road_scores

__all__ = ["percentile_layers", "contact_sheet", "plot_params", "run_summary",
           "format_summary", "write_summary"]

PERCENTILES = tuple(range(0, 101, 10))


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        try:
            matplotlib.use("Agg", force=False)
        except Exception:  # noqa: BLE001 - an interactive session keeps its backend
            pass
    import matplotlib.pyplot as plt

    return plt


def percentile_layers(n_layers: int, percentiles: Sequence[float] = PERCENTILES) -> list[int]:
    """Layer indices at the given percentages of depth (0 = first layer,
    100 = last), rounded, without repeats: 11 layers for the paper's
    0, 10, ..., 100 when there are at least 11."""
    if n_layers < 1:
        raise CAManimError("no layers to pick from")
    bad = [p for p in percentiles if not 0 <= float(p) <= 100]
    if bad:
        raise CAManimError(f"percentiles must be within 0..100, got {bad}")
    idx = [int(round(float(p) / 100.0 * (n_layers - 1))) for p in percentiles]
    return sorted(set(idx))


def _label(name: str, width: int = 18) -> str:
    """A layer name wrapped on its dots to at most 3 lines."""
    parts = name.replace(".", ".\u200b").split("\u200b")
    lines, cur = [], ""
    for p in parts:
        if cur and len(cur) + len(p) > width:
            lines.append(cur)
            cur = p
        else:
            cur += p
    lines.append(cur)
    lines = [seg for line in lines for seg in textwrap.wrap(line, width) or [line]]
    return "\n".join(lines[:3]) + ("…" if len(lines) > 3 else "")


_GAP, _TOP, _HEAD = 0.06, 0.36, 0.18   # contact sheet (inches): between tiles, title, heads


def _sheet_background(disp: np.ndarray, tile: int) -> np.ndarray:
    """One ``(H, W, 3)`` image resized (bilinear, antialiased) so that its
    long side is ``tile`` px (at least 8 px a side), values in 0..1."""
    h, w = disp.shape[:2]
    s = tile / max(h, w)
    th, tw = max(8, int(round(h * s))), max(8, int(round(w * s)))
    return torch.nn.functional.interpolate(torch.from_numpy(disp[None]).permute(0, 3, 1, 2),
                                           size=(th, tw), mode="bilinear", align_corners=False,
                                           antialias=True)[0].permute(1, 2, 0).clamp(0, 1).numpy()


def _sheet_title(method: str, targets: torch.Tensor | None, b: int, norms: Sequence[str]) -> str:
    """The default contact sheet title: method, target class, normalization."""
    bits = [method or "CAM"]
    if targets is not None:
        bits.append(f"target class {int(targets.reshape(-1)[b])}")
    bits.append(", ".join(norms) + " normalization")
    return " · ".join(bits)


def _sheet_layout(title: str, notes: list[str], n: int, n_rows: int, tile_in: tuple[float, float],
                  road: bool) -> tuple[float, float, float, list[str]]:
    """Explicit layout in inches: title, column heads, ``n_rows`` rows of
    ``n`` tiles, names; wide enough for the title (DejaVu Sans,
    matplotlib's default, 9 pt). Returns the grid's left edge, the figure's
    width and height, and the legend lines wrapped to that width."""
    tw_in, th_in = tile_in
    left = 0.3 if n_rows > 1 else 0.08
    grid_w = n * tw_in + (n - 1) * _GAP
    title_w = sans_font(90).getlength(title) / 720 + 0.2      # 9 pt = 1/8 inch
    left += max(0.0, title_w - (left + grid_w + 0.08)) / 2
    fig_w = max(left + grid_w + 0.08, title_w, 3.0)
    # legend lines (6.5 pt) wrapped to the figure's width; matplotlib draws
    # them up to ~7% wider than PIL measures, hence the margin
    nfont = sans_font(65)
    notes = [ln for note in notes
             for ln in wrap_text(note, nfont, (fig_w - 0.2) * 720 / 1.1)]
    fig_w = max([fig_w] + [nfont.getlength(ln) * 1.1 / 720 + 0.2 for ln in notes])
    bottom = 0.42 + (0.13 if road else 0.0) + 0.14 * len(notes)
    fig_h = _TOP + _HEAD + n_rows * th_in + (n_rows - 1) * _GAP + bottom
    return left, fig_w, fig_h, notes


def _sheet_grid(fig: Any, tiles: dict[str, list[np.ndarray]], norms: Sequence[str],
                picks: Sequence[int], labels: Sequence[str], road: np.ndarray | None,
                left: float, tile_in: tuple[float, float], size: tuple[float, float]) -> None:
    """Place the tiles, one row per normalization: depth heads over the
    first row, the normalization left of each row (when several), layer
    names (and ROAD, where finite) under the last; ``size``: the figure's
    width and height (inches)."""
    tw_in, th_in = tile_in
    fig_w, fig_h = size
    L = len(labels)
    for r, norm in enumerate(norms):
        for c, (i, im) in enumerate(zip(picks, tiles[norm], strict=False)):
            x0 = left + c * (tw_in + _GAP)
            y0 = fig_h - _TOP - _HEAD - (r + 1) * th_in - r * _GAP
            ax = fig.add_axes((x0 / fig_w, y0 / fig_h, tw_in / fig_w, th_in / fig_h))
            ax.imshow(im, interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                depth = 100.0 * i / (L - 1) if L > 1 else 100.0
                fig.text((x0 + tw_in / 2) / fig_w, (y0 + th_in + 0.03) / fig_h,
                         f"{depth:.0f}%  ({i + 1}/{L})", ha="center", va="bottom", fontsize=7)
            if c == 0 and len(norms) > 1:
                fig.text((x0 - 0.05) / fig_w, (y0 + th_in / 2) / fig_h, norm, rotation=90,
                         ha="right", va="center", fontsize=8)
            if r == len(norms) - 1:
                text = _label(labels[i], width=max(10, int(tw_in * 17)))
                if road is not None and np.isfinite(road[i]):
                    text += f"\nROAD {road[i]:+.3f}"
                fig.text((x0 + tw_in / 2) / fig_w, (y0 - 0.03) / fig_h, text, ha="center",
                         va="top", fontsize=6, linespacing=1.1)


def contact_sheet(path: str | Path, images: Any, maps: LayerMaps,
                  normalization: str | Sequence[str] = "local", index: int = 0,
                  percentiles: Sequence[float] = PERCENTILES, colormap: str = "jet",
                  alpha: float = 0.5, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None,
                  denormalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  road: Any = None, title: str | None = None, tile: int = 150,
                  dpi: int = 100) -> Path:
    """One image's CAMs at every 10th percentile of depth, in a row.

    Args:
        path: ``.png`` (or any format matplotlib saves) to write.
        images, maps: the batch and its `LayerMaps` (see `render_frames`).
        normalization: ``"local"``, ``"global"``, ``"both"``, or a list of
            them: one row each.
        index: which image of the batch.
        percentiles: depths to show (default 0, 10, ..., 100).
        road: ybROAD scores (``(L, B)`` or YbRoad): shown under the names.
        title: figure title (default: method and target).
        tile: tile size in pixels (long side).

    Returns:
        ``path``.
    """
    norms = _norm_list(normalization)
    B = maps.batch_size
    if not -B <= int(index) < B:
        raise CAManimError(f"index {index} is out of range for {B} images")
    b = int(index) % B
    disp = display_images(images, mean, std, denormalize)
    if disp.shape[0] != B:
        raise CAManimError(f"got {disp.shape[0]} images for maps of {B} images")
    bg = _sheet_background(disp[b], tile)
    th, tw = bg.shape[:2]
    picks = percentile_layers(len(maps), percentiles)
    scores = road_scores(road, len(maps), B)
    lut = colormap_lut(colormap)
    tiles: dict[str, list[np.ndarray]] = {}
    one = maps.image(b)
    for norm in norms:  # every layer goes through: "global" needs all ranges
        want = set(picks)
        tiles[norm] = [overlay(bg, m[0], lut, alpha)
                       for i, m in enumerate(iter_maps(one, norm, (th, tw))) if i in want]
    if title is None:
        title = _sheet_title(maps.method, maps.targets, b, norms)
    plt = _pyplot()
    tile_in = (tw / dpi, th / dpi)
    notes = _sheet_notes(norms, scores is not None, maps.names)
    left, fig_w, fig_h, notes = _sheet_layout(title, notes, len(picks), len(norms), tile_in,
                                              scores is not None)
    fig = plt.figure(figsize=(fig_w, fig_h))
    _sheet_grid(fig, tiles, norms, picks, short_names(maps.names),
                None if scores is None else scores[:, b], left, tile_in,
                (fig_w, fig_h))
    fig.text(0.5, 1 - 0.08 / fig_h, title, ha="center", va="top", fontsize=9)
    for k, note in enumerate(reversed(notes)):
        fig.text(0.08 / fig_w, (0.06 + 0.14 * k) / fig_h, note, ha="left", va="bottom",
                 fontsize=6.5, color="0.3")
    return save_figure(fig, path, dpi)


def _sheet_notes(norms: Sequence[str], road: bool, names: Sequence[str]) -> list[str]:
    """The legend lines under a contact sheet: how to read each row."""
    from .fonts import dropped_prefix, prefix_note

    notes = []
    if "local" in norms:
        notes.append("local: each layer scaled to its own min..max (where it looks, not how "
                     "strongly)")
    if "global" in norms:
        notes.append("global: one scale for all layers of the image; the layer with the largest "
                     "values sets it, so layers with small values look dark")
    if road:
        notes.append("ROAD > 0: removing the pixels the map ranks most relevant hurts the class "
                     "more than removing the least relevant")
    prefix = dropped_prefix(names)
    if prefix:
        notes.append(prefix_note(prefix))
    return notes


def _norm_list(normalization: str | Sequence[str]) -> list[str]:
    if isinstance(normalization, str):
        norms = ["local", "global"] if normalization == "both" else [normalization]
    else:
        norms = list(normalization)
    for n in norms:
        if n not in ("local", "global", "none"):
            raise CAManimError(f"unknown normalization {n!r}; use local, global, both or none")
    if not norms:
        raise CAManimError("no normalization given")
    return norms


def plot_params(path: str | Path, maps: LayerMaps, title: str | None = None,
                dpi: int = 110) -> Path:
    """Parameters of every drawn layer (module and its children) on a log
    axis, coloured by layer type (paper Fig. 3). Layers without parameters
    (ReLU, pooling) are marked on the x axis."""
    plt = _pyplot()
    params = np.array([info.params_total for info in maps.layers], dtype=float)
    types = [info.type for info in maps.layers]
    x = np.arange(len(maps))
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 0.12 * len(maps) + 4)), 3.4))
    cmap = plt.get_cmap("tab10")
    for k, t in enumerate(dict.fromkeys(types)):
        sel = np.array([tt == t for tt in types]) & (params > 0)
        if sel.any():
            ax.bar(x[sel], params[sel], width=0.8, color=cmap(k % 10), label=t)
    zero = params <= 0
    ax.set_yscale("log")
    if zero.any():
        lo = params[~zero].min() if (~zero).any() else 1.0
        ax.set_ylim(bottom=max(0.5, lo / 3))
        ax.plot(x[zero], np.full(zero.sum(), max(0.5, lo / 3)), "x", color="gray", ms=4,
                clip_on=False, label="no parameters")
    ax.set_xlabel("layer index (execution order)")
    ax.set_ylabel("parameters (log)")
    ax.set_title(title or f"Parameters per layer ({len(maps)} layers, total "
                 f"{int(params.sum()):,})", fontsize=10)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.margins(x=0.01)
    # outside the axes: bars of any height stay visible
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    fit_figure(fig)
    return save_figure(fig, path, dpi)


def run_summary(maps: LayerMaps, model: nn.Module | None = None,
                seconds: float | None = None, **extra: Any) -> dict[str, Any]:
    """The paper's Table 1 for one run.

    Args:
        maps: the run's `LayerMaps` (per-layer ``seconds`` and parameters).
        model: if given, its total parameter count is reported.
        seconds: wall time of the whole run, if measured (else the sum of the
            per-layer times).
        **extra: more JSON-ready fields to include (model name, image, ...).

    Returns:
        dict with ``layers``, ``method``, ``input_size``, ``total_params``
        (model, or ``None``), ``layer_params_total`` / ``mean_params_per_layer``
        (drawn layers, children included), ``runtime_s``,
        ``mean_runtime_per_layer_s``, ``first_layer``, ``last_layer``.
    """
    params = [info.params_total for info in maps.layers]
    secs = [float(s) for s in maps.seconds] if maps.seconds else []
    total_s = float(seconds) if seconds is not None else (float(sum(secs)) if secs else None)
    out: dict[str, Any] = dict(extra)
    out.update(
        {
            "method": maps.method,
            "layers": len(maps),
            "input_size": list(maps.input_size),
            "total_params": int(sum(p.numel() for p in model.parameters()))
            if model is not None
            else None,
            "layer_params_total": int(sum(params)),
            "mean_params_per_layer": float(np.mean(params)) if params else 0.0,
            "runtime_s": total_s,
            "mean_runtime_per_layer_s": (total_s / len(maps))
            if total_s is not None and len(maps)
            else None,
            "first_layer": maps.names[0] if len(maps) else None,
            "last_layer": maps.names[-1] if len(maps) else None,
        }
    )
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """A small aligned ``key  value`` table of a `run_summary`."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if math.isfinite(v) and abs(v) >= 1000:
                return f"{v:,.0f}"
            return f"{v:.4g}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        if isinstance(v, (list, tuple)):
            return "x".join(str(x) for x in v)
        return str(v)

    keys = [k for k, v in summary.items() if not isinstance(v, dict)]
    width = max((len(k) for k in keys), default=0)
    return "\n".join(f"{k:<{width}}  {fmt(summary[k])}" for k in keys)


def write_summary(path: str | Path, summary: dict[str, Any]) -> Path:
    """Write a summary dict as JSON (complete under ``path`` or not there)."""
    return write_text(path, json.dumps(summary, indent=2, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)
