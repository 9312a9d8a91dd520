"""The one font loader for PIL drawing (video captions, heatmaps, curves)."""

from __future__ import annotations

import functools
import os
from typing import Any

from PIL import ImageFont

__all__ = ["sans_font", "mono_font", "fit_text"]


@functools.lru_cache(maxsize=64)
def _truetype(name: str, size: int) -> Any:
    try:
        import matplotlib

        path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name)
        return ImageFont.truetype(path, size)
    except Exception:  # noqa: BLE001 - any font will do
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: fixed bitmap font only
            return ImageFont.load_default()


def sans_font(size: int) -> Any:
    """DejaVu Sans (shipped with matplotlib) at ``size`` px; PIL's default otherwise."""
    return _truetype("DejaVuSans.ttf", int(size))


def mono_font(size: int) -> Any:
    """DejaVu Sans Mono at ``size`` px (layer-name columns line up)."""
    return _truetype("DejaVuSansMono.ttf", int(size))


def fit_text(text: str, font: Any, width: float, tail: bool = False) -> str:
    """``text``, cut in the middle (layer names: both ends matter) or at the
    end (``tail=True``) with an ellipsis to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    keep = len(text)
    while keep > 4:
        keep -= 1
        head = keep if tail else (keep + 1) // 2
        cand = text[:head] + "…" + text[len(text) - (keep - head):]
        if font.getlength(cand) <= width:
            return cand
    return text[:4]
