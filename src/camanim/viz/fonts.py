"""The one font loader for PIL drawing (video captions, heatmaps, curves), and
the text shortening that every figure shares: `short_names` drops the prefix
all layer names share, `fit_text` cuts in the middle, `join_fit` keeps the
first parts of a caption whole."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

from PIL import ImageFont

__all__ = ["sans_font", "mono_font", "fit_text", "wrap_text", "short_names", "dropped_prefix",
           "prefix_note", "join_fit"]


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
    while keep > 1:
        keep -= 1
        head = keep if tail else (keep + 1) // 2
        cand = text[:head] + "…" + text[len(text) - (keep - head):]
        if font.getlength(cand) <= width:
            return cand
    return "…" if font.getlength("…") <= width else ""


def wrap_text(text: str, font: Any, width: float, most: int = 10) -> list[str]:
    """``text`` broken at spaces onto at most ``most`` lines of ``width``
    pixels, words kept whole; the last line is cut in the middle if the text
    is still too long (or a word is wider than a line)."""
    lines: list[str] = []
    words = text.split(" ") if text else []
    while words and len(lines) < most - 1:
        k = len(words)
        while k > 1 and font.getlength(" ".join(words[:k])) > width:
            k -= 1
        if font.getlength(" ".join(words[:k])) > width:
            break                                    # one word wider than the line
        lines.append(" ".join(words[:k]))
        words = words[k:]
    if words:
        lines.append(fit_text(" ".join(words), font, width))
    return lines


def _shared_parts(names: Sequence[str]) -> int:
    """How many leading dotted parts `short_names` drops."""
    if len(set(names)) < 2:
        return 0
    parts = [n.split(".") for n in names]
    drop = 0
    while (drop < min(len(p) for p in parts) - 1
           and len({p[drop] for p in parts}) == 1):
        drop += 1
    return drop


def short_names(names: Sequence[str]) -> list[str]:
    """Layer names without the dotted prefix that all of them share
    (``model.`` when a LightningModule wraps the network); every name keeps
    at least its last part, and a single name is kept whole. A picture
    that shows them says which prefix went (`dropped_prefix`), so that its
    names can be found in the CSV files, which keep full names."""
    names = [str(n) for n in names]
    drop = _shared_parts(names)
    return [".".join(n.split(".")[drop:]) for n in names]


def dropped_prefix(names: Sequence[str]) -> str:
    """The prefix `short_names` drops (``"model."``), or ``""``."""
    names = [str(n) for n in names]
    drop = _shared_parts(names)
    return ".".join(names[0].split(".")[:drop]) + "." if drop else ""


def prefix_note(prefix: str) -> str:
    """The legend line of a picture whose layer names lost ``prefix``
    (`dropped_prefix`), e.g. "layer names without the shared prefix 'model'";
    the prefix is named without its last dot, so that no text in the
    picture reads like a full name."""
    return f"layer names without the shared prefix '{prefix.rstrip('.')}'" if prefix else ""


def join_fit(parts: Sequence[str | None], font: Any, width: float, keep: int = 1,
             sep: str = " · ") -> str:
    """``parts`` joined by ``sep`` within ``width`` pixels: the first ``keep``
    parts stay whole (only the first of them is cut, in the middle, when they
    alone are too wide); later parts follow while they fit, the first that
    does not is cut at its end and the rest are dropped. Empty (and ``None``)
    parts are left out."""
    kept = [p for p in parts if p]
    head = kept[:keep]
    if head:
        rest = "".join(sep + p for p in head[1:])
        head[0] = fit_text(head[0], font, width - font.getlength(rest))
    out = sep.join(head)
    for p in kept[keep:]:
        cand = out + sep + p if out else p
        if font.getlength(cand) <= width:
            out = cand
            continue
        cut = fit_text(cand, font, width, tail=True)
        if len(cut) - len(out) > len(sep) + 3:        # a few letters of p, not just "…"
            out = cut
        break
    return out
