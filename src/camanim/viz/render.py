r"""CAManim frames: one picture per layer, ready for a video.

A frame shows the layer's class activation map over the image as the user
sees it (the model's input normalization undone), a caption band (layer
``i/L``, name, type, output shape, parameters, method, normalization,
target, and when ybROAD scores are given the layer's ROAD score with a small
curve of all layers' scores and a marker at this one) and a thin progress
strip of the depth through the network::

    +----------------------+----------------------+
    |  local               |  global              |   header (only with
    +----------------------+----------------------+   several panels)
    |   image + CAM        |   image + CAM        |
    +----------------------+----------------------+
    | 12/53  layer2.0.conv1                       |   caption band
    | Conv2d · 128×28×28 · 147k params            |
    | gradcam · local · target: tabby  ~~~/\~~o~  |
    +=====================------------------------+   progress strip

Every frame of one call has the same, even, size (H.264 needs even sides).
Everything static (backgrounds, band, curve) is drawn once; per frame only
the overlay and two lines of text are drawn, and maps are upsampled one layer
at a time, so memory does not grow with the number of layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..core.guard import one_torch_thread
from ..core.images import IMAGENET_MEAN, IMAGENET_STD
from ..core.layers import LayerInfo
from ..core.maps import NORMALIZATIONS, LayerMaps
from ..errors import CAManimError
from .fonts import fit_text, join_fit, sans_font, short_names
from .overlay import colormap_lut, display_images, iter_maps, overlay

__all__ = ["render_frames", "FrameRenderer", "colormap_lut", "display_images", "iter_maps",
           "overlay", "panel_size", "road_scores", "IMAGENET_MEAN", "IMAGENET_STD"]

# Frame panels are upscaled to at least this width so captions stay legible,
# and downscaled to at most this long side to keep videos light.
MIN_PANEL_WIDTH = 320
MAX_PANEL_SIDE = 1024
_SEP = 2                          # pixels between panels (even: keeps sizes even)
_BG = (17, 17, 17)                # band and separator colour
_FG = (240, 240, 240)
_DIM = (160, 160, 160)
_ACCENT = (245, 197, 24)          # the "yellow brick road": progress + ROAD marker
_CURVE = (110, 170, 255)


# ----------------------------------------------------------------- helpers

def road_scores(road: Any, n_layers: int, batch: int) -> np.ndarray | None:
    """``(L, B)`` float array from a YbRoad-like object (``.scores``) or an
    array; ``None`` stays ``None``."""
    if road is None:
        return None
    scores = getattr(road, "scores", road)
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1 and batch == 1:
        scores = scores[:, None]
    if scores.shape != (n_layers, batch):
        raise CAManimError(f"road scores have shape {scores.shape} but the maps have "
                           f"{n_layers} layers and {batch} images: pass scores of shape "
                           f"({n_layers}, {batch}) computed on these maps")
    return scores


def _human(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def shape_text(info: LayerInfo) -> str:
    """``"128x28x28"`` (C x h x w) for spatial layers, else the recorded
    shape (the default font has no multiplication sign)."""
    size, c = info.spatial_size, info.channels
    if size is not None and c is not None:
        return f"{c}x{size[0]}x{size[1]}"
    return "x".join(str(s) for s in info.output_shape[1:]) or "?"


def _even(n: float) -> int:
    return max(2, int(round(n / 2.0)) * 2)


def panel_size(image_hw: tuple[int, int],
               size: int | Sequence[int] | None = None) -> tuple[int, int]:
    """Even ``(H, W)`` of one image panel.

    ``size=None``: the image size, upscaled to at least `MIN_PANEL_WIDTH`
    wide and downscaled to at most `MAX_PANEL_SIDE` on the long side; an int:
    the long side; ``(H, W)``: exactly that (rounded to even).
    """
    h, w = image_hw
    if size is None:
        s = max(1.0, MIN_PANEL_WIDTH / w)
        if max(h, w) * s > MAX_PANEL_SIDE:
            s = MAX_PANEL_SIDE / max(h, w)
        return _even(h * s), _even(w * s)
    if isinstance(size, (int, np.integer)):
        s = int(size) / max(h, w)
        return _even(h * s), _even(w * s)
    hh, ww = (int(v) for v in size)
    return _even(hh), _even(ww)


# ----------------------------------------------------------------- layout

@dataclass(frozen=True)
class _Layout:
    ph: int                 # panel height
    pw: int                 # panel width
    n_norm: int             # panels per tile (1, or 2 for local | global)
    rows: int               # tiles down
    cols: int               # tiles across
    header: int             # label row above each tile row (0 if none)
    band: int               # caption band height
    strip: int              # progress strip height
    font: int               # caption font size

    @property
    def tile_w(self) -> int:
        return self.n_norm * self.pw + (self.n_norm - 1) * _SEP

    @property
    def width(self) -> int:
        return self.cols * self.tile_w + (self.cols - 1) * _SEP

    @property
    def grid_h(self) -> int:
        return self.rows * (self.header + self.ph) + (self.rows - 1) * _SEP

    @property
    def height(self) -> int:
        return self.grid_h + self.band + self.strip

    def panel_origin(self, tile: int, k: int) -> tuple[int, int]:
        """Top-left ``(y, x)`` of panel ``k`` of tile ``tile``."""
        r, c = divmod(tile, self.cols)
        y = r * (self.header + self.ph + _SEP) + self.header
        x = c * (self.tile_w + _SEP) + k * (self.pw + _SEP)
        return y, x


# --------------------------------------------------------------- renderer

class FrameRenderer:
    """Draws the frames of one batch; build once, then iterate layers.

    Args:
        images: the model's input images (see `display_images`), B of them.
        maps: `LayerMaps` of those B images.
        normalization: ``"local"``, ``"global"``, ``"none"`` (raw values,
            clipped to [0, 1]) or ``"both"`` (local | global side by side).
        colormap: matplotlib colormap name (``"jet"`` as in the paper).
        alpha: heatmap weight in the blend (0..1).
        mean, std, denormalize: how to undo the input normalization.
        road: ybROAD scores, a YbRoad-like object with ``.scores`` ``(L, B)``
            or an ``(L, B)`` array.
        size: panel size: ``None`` (automatic), long side, or ``(H, W)``.
        grid: all B images in one frame (one output) instead of one output
            per image.
        class_names: names for the target class indices in the captions.
        title: extra caption text (e.g. the model name).
    """

    def __init__(self, images: Any, maps: LayerMaps, normalization: str = "local",
                 colormap: str = "jet", alpha: float = 0.5,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 denormalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 road: Any = None, size: int | Sequence[int] | None = None,
                 grid: bool = False, class_names: Sequence[str] | None = None,
                 title: str | None = None) -> None:
        if not isinstance(maps, LayerMaps):
            raise CAManimError(f"maps must be a camanim.LayerMaps, got {type(maps).__name__}")
        if len(maps) == 0:
            raise CAManimError("these maps hold no layers: nothing to draw")
        if normalization == "both":
            self.norms: tuple[str, ...] = ("local", "global")
        elif normalization in NORMALIZATIONS:
            self.norms = (normalization,)
        else:
            raise CAManimError(f"unknown normalization {normalization!r}; use local, "
                               "global, both (side by side) or none")
        if not 0.0 <= float(alpha) <= 1.0:
            raise CAManimError(f"alpha must be between 0 and 1, got {alpha}")
        self.maps = maps
        self.alpha = float(alpha)
        self.lut = colormap_lut(colormap).astype(np.float32) * self.alpha
        self.grid = bool(grid)
        self.class_names = list(class_names) if class_names is not None else None
        self.title, self.labels = title, short_names(maps.names)
        B = maps.batch_size
        disp = display_images(images, mean, std, denormalize)
        if disp.shape[0] != B:
            raise CAManimError(f"got {disp.shape[0]} images for maps of {B} images: pass "
                               "the same batch the maps were computed on")
        self.scores = road_scores(road, len(maps), B)
        ph, pw = panel_size(disp.shape[1:3], size)
        cols = math.ceil(math.sqrt(B)) if self.grid else 1
        rows = math.ceil(B / cols) if self.grid else 1
        font = int(min(28, max(12, round(pw * len(self.norms) * cols / 26))))
        line = int(font * 1.3)
        n_lines = 3 + (self.scores is not None)
        header = _even(line + 4) if (len(self.norms) > 1 or (self.grid and B > 1)) else 0
        self.layout = _Layout(ph=ph, pw=pw, n_norm=len(self.norms), rows=rows, cols=cols,
                              header=header, band=_even(n_lines * line + 0.8 * font),
                              strip=_even(max(4, ph // 48)), font=font)
        self.font = sans_font(font)
        self.font_big = sans_font(font + 2)
        self.line = line  # the curve takes 30% of the width, less if method · norm needs it
        kept = [maps.method or "CAM"] + (list(self.norms) if len(self.norms) == 1 else [])
        need = self.font.getlength(" · ".join(kept)) + 3 * self._pad
        self._curve_w = int(max(0, min(0.3 * self.layout.width, self.layout.width - need)))
        # Backgrounds at panel size, pre-scaled by (1 - alpha), 0..255.
        t = torch.from_numpy(disp).permute(0, 3, 1, 2)
        if tuple(t.shape[-2:]) != (ph, pw):
            with one_torch_thread():
                t = torch.nn.functional.interpolate(t, size=(ph, pw), mode="bilinear",
                                                    align_corners=False, antialias=True)
        bg = t.clamp(0, 1).permute(0, 2, 3, 1).numpy()
        self.backgrounds = np.ascontiguousarray(bg * (255.0 * (1.0 - self.alpha)), dtype=np.float32)
        self.canvases = [self._canvas(b) for b in self._outputs()]

    # ..................................................... public interface
    @property
    def frame_size(self) -> tuple[int, int]:
        """``(H, W)`` of every frame (both even)."""
        return self.layout.height, self.layout.width

    @property
    def n_outputs(self) -> int:
        """Frames per layer: 1 in grid mode, else B (one per image)."""
        return 1 if self.grid else self.maps.batch_size

    def __len__(self) -> int:
        return len(self.maps)

    def iter_layers(self) -> Iterator[list[np.ndarray]]:
        """Yield, per layer, `n_outputs` frames ``(H, W, 3)`` uint8."""
        size = (self.layout.ph, self.layout.pw)
        streams = [iter_maps(self.maps, n, size, overlay_on=(self.backgrounds, self.lut))
                   for n in self.norms]
        # each of cams: overlay panels (B, ph, pw, 3) uint8
        for i, cams in enumerate(zip(*streams, strict=False)):
            yield [self._frame(i, cams, out) for out in range(self.n_outputs)]

    # ..................................................... drawing
    def _outputs(self) -> list[tuple[int, ...]]:
        """Image indices drawn in each output frame."""
        B = self.maps.batch_size
        return [tuple(range(B))] if self.grid else [(b,) for b in range(B)]

    def _target_text(self, b: int) -> str:
        t = self.maps.targets
        if t is None:
            return ""
        k = int(t.reshape(-1)[b])
        if self.class_names is not None and 0 <= k < len(self.class_names):
            return f"{self.class_names[k]} ({k})"
        return f"class {k}"

    def _score_series(self, imgs: tuple[int, ...]) -> np.ndarray | None:
        if self.scores is None:
            return None
        s = self.scores[:, list(imgs)]
        with np.errstate(all="ignore"):
            return np.nanmean(s, axis=1) if s.shape[1] > 1 else s[:, 0]

    def _curve_box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the ybROAD curve inside the band: right of
        caption rows 2-3, so rows 0-1 (name, type, shape) keep full width."""
        lay, pad = self.layout, self._pad
        return lay.width - pad - self._curve_w, self._row_y(2), lay.width - pad, lay.band - pad // 2

    def _curve_point(self, i: int, v: float, lo: float, hi: float) -> tuple[float, float]:
        x0, y0, x1, y1 = self._curve_box()
        n = max(1, len(self.maps) - 1)
        x = x0 + (x1 - x0) * i / n
        y = y1 - (y1 - y0) * ((v - lo) / (hi - lo) if hi > lo else 0.5)
        return x, y

    def _score_range(self, series: np.ndarray) -> tuple[float, float]:
        finite = series[np.isfinite(series)]
        if finite.size == 0:
            return -1.0, 1.0
        lo, hi = float(min(finite.min(), 0.0)), float(max(finite.max(), 0.0))
        return (lo, hi) if hi > lo else (lo - 1.0, hi + 1.0)

    def _canvas(self, imgs: tuple[int, ...]) -> np.ndarray:
        """The static part of every frame of output ``imgs``."""
        lay = self.layout
        im = Image.new("RGB", (lay.width, lay.height), _BG)
        d = ImageDraw.Draw(im)
        if lay.header:
            for tile, b in enumerate(imgs):
                for k, norm in enumerate(self.norms):
                    y, x = lay.panel_origin(tile, k)
                    label = norm if len(imgs) == 1 else f"#{b} {norm}"
                    if len(imgs) > 1 and k == 0 and self._target_text(b):
                        label += f" · {self._target_text(b)}"
                    d.text((x + 4, y - lay.header + 2), fit_text(label, self.font, lay.pw - 8),
                           font=self.font, fill=_DIM)
        series = self._score_series(imgs)
        if series is not None:
            lo, hi = self._score_range(series)
            x0, y0, x1, y1 = self._curve_box()
            top = lay.grid_h
            zero = self._curve_point(0, 0.0, lo, hi)[1]
            d.line([(x0, top + zero), (x1, top + zero)], fill=(70, 70, 70), width=1)
            pts = [(x, top + y) for i, v in enumerate(series) if np.isfinite(v)
                   for x, y in [self._curve_point(i, float(v), lo, hi)]]
            if len(pts) > 1:
                d.line(pts, fill=_CURVE, width=max(1, lay.font // 10))
            elif pts:
                d.point(pts, fill=_CURVE)
        caption, _ = self._caption(imgs)
        d.text((self._pad, lay.grid_h + self._row_y(2)), caption, font=self.font, fill=_DIM)
        strip_y = lay.grid_h + lay.band
        d.rectangle([0, strip_y, lay.width, lay.height], fill=(55, 55, 55))
        return np.asarray(im).copy()

    def _caption(self, imgs: tuple[int, ...]) -> tuple[str, str]:
        """Caption row 2 of output ``imgs`` and the class name moved to row 1
        (``""`` when it is on row 2). The method (cut in the middle only if
        it alone is too wide) and the normalization come first and stay
        whole; the target's class name stays whole too: on row 2 ("target:"
        dropped when narrow), else at the front of row 1 (full width); the
        title is shortened first."""
        norm = self.norms[0] if len(self.norms) == 1 else ""  # else the panels are labelled
        target = self._target_text(imgs[0]) if len(imgs) == 1 else ""
        width = self._text_width()
        method = self.maps.method or "CAM"
        head = [p for p in (method, norm) if p]
        moved = ""
        if target:
            if self.font.getlength(" · ".join([*head, f"target: {target}"])) <= width:
                head.append(f"target: {target}")
            elif self.font.getlength(" · ".join([*head, target])) <= width:
                head.append(target)                         # narrow: drop the "target:" word
            else:
                moved = target                              # narrower: to row 1
        bits = [*head, self.title]
        return join_fit(bits, self.font, width, keep=len(head)), moved

    @property
    def _pad(self) -> int:
        return max(4, self.layout.font // 2)

    def _row_y(self, k: int) -> int:
        """Top of caption row ``k`` inside the band."""
        return self._pad // 2 + k * self.line + (2 if k else 0)

    def _text_width(self) -> int:
        """Room for caption rows 2-3 (left of the ybROAD curve, if any)."""
        if self.scores is None:
            return self.layout.width - 2 * self._pad
        return self._curve_box()[0] - 2 * self._pad

    def _frame(self, i: int, panels: list[np.ndarray], out: int) -> np.ndarray:
        lay = self.layout
        imgs = self._outputs()[out]
        frame = self.canvases[out].copy()
        for tile, b in enumerate(imgs):
            for k, panel in enumerate(panels):
                y, x = lay.panel_origin(tile, k)
                frame[y:y + lay.ph, x:x + lay.pw] = panel[b]
        band = frame[lay.grid_h:lay.grid_h + lay.band]
        frame[lay.grid_h:lay.grid_h + lay.band] = self._draw_band(band, i, imgs)
        filled = int(round(lay.width * (i + 1) / len(self.maps)))
        frame[lay.grid_h + lay.band:, :filled] = _ACCENT
        return frame

    def _draw_band(self, band: np.ndarray, i: int, imgs: tuple[int, ...]) -> np.ndarray:
        """Draw layer ``i``'s caption rows (and curve marker) on ``band``."""
        lay = self.layout
        info = self.maps.layers[i]
        im = Image.fromarray(band)
        d = ImageDraw.Draw(im)
        pad, text_w = self._pad, self._text_width()
        d.text((pad, self._row_y(0)), fit_text(f"{i + 1}/{len(self.maps)}  {self.labels[i]}",
                                           self.font_big, lay.width - 2 * pad),
               font=self.font_big, fill=_FG)
        _, target = self._caption(imgs)
        row1 = [target, info.type, shape_text(info), f"{_human(info.params_total)} params"]
        d.text((pad, self._row_y(1)), join_fit(row1, self.font, lay.width - 2 * pad, keep=1),
               font=self.font, fill=_FG)
        series = self._score_series(imgs)
        if series is not None:
            v = series[i]
            label = "ROAD" if len(imgs) == 1 else f"ROAD (mean of {len(imgs)})"
            val = f"{v:+.3f}" if np.isfinite(v) else "n/a"
            d.text((pad, self._row_y(3)), fit_text(f"{label} {val}", self.font, text_w),
                   font=self.font, fill=_ACCENT)
            if np.isfinite(v):
                lo, hi = self._score_range(series)
                x, y = self._curve_point(i, float(v), lo, hi)
                x0, y0, x1, y1 = self._curve_box()
                d.line([(x, y0), (x, y1)], fill=(90, 90, 90), width=1)
                r = max(2, lay.font // 4)
                d.ellipse([x - r, y - r, x + r, y + r], fill=_ACCENT)
        return np.asarray(im)


# ----------------------------------------------------------------- public

def render_frames(images: Any, maps: LayerMaps, normalization: str = "local",
                  colormap: str = "jet", alpha: float = 0.5,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  road: Any = None, size: int | Sequence[int] | None = None,
                  grid: bool = False, index: int | None = None,
                  denormalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  class_names: Sequence[str] | None = None,
                  title: str | None = None) -> Iterator[np.ndarray]:
    """Yield one CAManim frame per layer.

    Args:
        images: ``(B, C, H, W)`` tensor as fed to the model (or display-ready
            numpy / PIL images, see `display_images`).
        maps: `LayerMaps` computed on ``images``.
        normalization: ``"local"``, ``"global"``, ``"both"`` (local | global
            side by side) or ``"none"``.
        colormap: matplotlib colormap name; ``alpha``: heatmap weight.
        mean, std: the input normalization to undo (e.g. `IMAGENET_MEAN`,
            `IMAGENET_STD`); or ``denormalize``, a callable.
        road: ybROAD scores (YbRoad or ``(L, B)`` array) for the captions.
        size: panel size (``None``: automatic; int: long side; ``(H, W)``).
        grid: tile all B images into each frame.
        index: which image of the batch to draw when B > 1 and not ``grid``.
        class_names: names of the target classes, for the captions.
        title: extra caption text, e.g. the model name.

    Yields:
        ``(H, W, 3)`` uint8 frames, all of one even size, layer by layer.
    """
    B = maps.batch_size
    if not grid and B > 1 and index is None:
        raise CAManimError(f"these maps hold {B} images: pass index=i for one image's "
                           "frames, or grid=True to tile them into each frame")
    if index is not None and not grid:
        if not -B <= int(index) < B:
            raise CAManimError(f"index {index} is out of range for {B} images")
        b = int(index) % B
        maps = maps.image(b)
        scores = road_scores(road, len(maps), B)  # None stays None
        road = None if scores is None else scores[:, b:b + 1]
        images = _take(images, b)
    r = FrameRenderer(images, maps, normalization=normalization, colormap=colormap,
                      alpha=alpha, mean=mean, std=std, denormalize=denormalize, road=road,
                      size=size, grid=grid, class_names=class_names, title=title)
    for frames in r.iter_layers():
        yield frames[0]


def _take(images: Any, b: int) -> Any:
    if isinstance(images, torch.Tensor):
        return images[b:b + 1] if images.dim() == 4 else images
    if isinstance(images, np.ndarray):
        return images[b:b + 1] if images.ndim == 4 else images
    if isinstance(images, (list, tuple)):
        return [images[b]]
    return images
