"""Image files in, model-ready tensors out.

`load_image` reads any file PIL can open and returns RGB floats in [0, 1]:
EXIF orientation is applied (a phone photo is shown the way it was taken),
grayscale, palette and CMYK images become RGB, transparent images are laid
on white, and 16- or 32-bit images are scaled by their bit depth rather than
clipped to 255.

`to_model_input` resizes and normalizes such an image into the ``(1, C, H, W)``
tensor a classifier expects (ImageNet mean and std by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import CAManimError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Size = tuple[int, int]


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB.

    Returns:
        ``(H, W, 3)`` float32 array in [0, 1], upright per its EXIF tag.
    """
    path = Path(path)
    if not path.exists():
        raise CAManimError(f"no image file at {path}: check the path")
    if path.is_dir():
        raise CAManimError(f"{path} is a folder, not an image file: pass image files")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return pil_to_rgb(im)
    except UnidentifiedImageError:
        raise CAManimError(f"cannot read {path}: not an image format PIL knows "
                           "(PNG, JPEG, TIFF, BMP, ... are)") from None
    except (OSError, ValueError) as e:
        raise CAManimError(f"cannot read image {path}: {e}") from None


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` float32 in [0, 1] from a PIL image of any mode."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        gray = np.asarray(im).astype(np.float32) / 65535.0
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "I":
        # 32-bit integer mode: PIL also opens 16-bit PNGs this way; scale by
        # the smallest bit depth that holds the data.
        a = np.asarray(im).astype(np.float64)
        top = a.max(initial=0)
        scale = 255.0 if top <= 255 else 65535.0 if top <= 65535 else float(2 ** 32 - 1)
        gray = np.clip(a / scale, 0, 1).astype(np.float32)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        a = np.asarray(im).astype(np.float32)
        if not np.isfinite(a).all():
            a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min(initial=0)), float(a.max(initial=0))
        if lo < 0 or hi > 1:  # arbitrary float range: stretch to [0, 1]
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        return np.repeat(a[..., None], 3, axis=-1)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or im.mode == "RGBA":
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def parse_size(size: int | str | Sequence[int] | None) -> Size | None:
    """``224`` -> ``(224, 224)``; ``"320x256"`` -> ``(320, 256)`` (H x W);
    ``None`` / ``"none"`` -> ``None`` (keep the original resolution)."""
    if size is None or (isinstance(size, str) and size.strip().lower() in ("none", "original", "")):
        return None
    try:
        if isinstance(size, str):
            parts = [int(p) for p in size.lower().replace("×", "x").split("x")]
        elif isinstance(size, int):
            parts = [size]
        else:
            parts = [int(p) for p in size]
    except (TypeError, ValueError):
        raise CAManimError(f"bad image size {size!r}: use an int like 224, HxW like "
                           "320x256, or none to keep the original resolution") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 8:
        raise CAManimError(f"bad image size {size!r}: need one or two sizes of at least 8 pixels")
    return parts[0], parts[1]


def resize(rgb: np.ndarray, size: Size | None) -> np.ndarray:
    """Resize ``(H, W, 3)`` floats to ``size = (H', W')`` (bilinear,
    antialiased); ``None`` returns the input."""
    if size is None or tuple(rgb.shape[:2]) == tuple(size):
        return rgb
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(t, size=tuple(size), mode="bilinear",
                                          align_corners=False, antialias=True)
    return out[0].permute(1, 2, 0).clamp(0, 1).numpy()


def to_model_input(rgb: np.ndarray, size: Size | None = (224, 224),
                   mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD,
                   channels: int = 3) -> torch.Tensor:
    """Turn an RGB image into a normalized batch of one.

    Args:
        rgb: ``(H, W, 3)`` floats in [0, 1] (from `load_image`).
        size: ``(H', W')`` to resize to, or ``None`` to keep ``(H, W)``.
        mean, std: per-channel normalization (3 values, or ``channels``).
        channels: 3, or 1 for grayscale models (luminance; a 3-value mean
            and std are averaged).

    Returns:
        ``(1, channels, H', W')`` float32 tensor.
    """
    x = resize(rgb, size)
    if channels == 1:
        x = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    elif channels != 3:
        raise CAManimError(f"the model expects {channels} input channels; camanim's image "
                           "loader makes 1 (grayscale) or 3 (RGB)")
    m, s = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
    if (s == 0).any():
        raise CAManimError("std must not contain zeros")
    x = (x - m) / s
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(2, 0, 1)[None]


def _per_channel(v: Sequence[float], channels: int, what: str) -> np.ndarray:
    a = np.asarray(list(v), dtype=np.float32).reshape(-1)
    if a.size == channels:
        return a
    if a.size == 1:
        return np.repeat(a, channels)
    if channels == 1:
        return np.asarray(a.mean(keepdims=True), dtype=np.float32)
    raise CAManimError(f"{what} has {a.size} values but the model takes {channels} channels")
