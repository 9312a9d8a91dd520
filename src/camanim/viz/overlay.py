"""Class activation maps as overlays: colour tables, the images as the user
sees them, the blend, and maps streamed layer by layer as colour indices or
finished overlay panels (computed where the maps are: on an accelerator
only uint8 crosses to the CPU)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..core.guard import one_torch_thread
from ..core.images import IMAGENET_MEAN, IMAGENET_STD
from ..core.maps import LayerMaps
from ..errors import CAManimError

__all__ = ["colormap_lut", "display_images", "overlay", "colour_indices", "blend", "iter_maps"]


def colormap_lut(name: str = "jet") -> np.ndarray:
    """``(256, 3)`` uint8 lookup table of a matplotlib colormap."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(matplotlib.colormaps), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CAManimError(f"unknown colormap {name!r}{hint} (any matplotlib colormap "
                           "name works: jet, turbo, viridis, inferno, ...)") from None
    return (cmap(np.linspace(0, 1, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


def display_images(images: Any, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None,
                   denormalize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """The images as the user sees them.

    Args:
        images: a ``(B, C, H, W)`` / ``(C, H, W)`` tensor as fed to the model,
            or ``(B, H, W, C)`` / ``(H, W, C)`` numpy (uint8, or floats in
            [0, 1]), or a list of PIL images of one size.
        mean, std: the per-channel normalization the model needed; undone
            as ``x * std + mean``.
        denormalize: instead of mean/std, a callable mapping the
            ``(B, C, H, W)`` tensor to [0, 1].
        Without either, values already in [0, 1] are kept and anything else
        is min-max stretched per image.

    Returns:
        ``(B, H, W, 3)`` float32 in [0, 1].
    """
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        from ..core.images import pil_to_rgb

        arrs = [pil_to_rgb(im) for im in images]
        if len({a.shape for a in arrs}) != 1:
            raise CAManimError("the PIL images have different sizes; resize them to one size")
        return np.stack(arrs)
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4:
            raise CAManimError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        if denormalize is not None:
            x = denormalize(x).detach().float().cpu()
        elif mean is not None or std is not None:
            c = x.shape[1]
            m = _channel_vector(IMAGENET_MEAN if mean is None else mean, c, "mean")
            s = _channel_vector(IMAGENET_STD if std is None else std, c, "std")
            x = x * s[None, :, None, None] + m[None, :, None, None]
        arr = x.permute(0, 2, 3, 1).numpy()
        undone = denormalize is not None or mean is not None or std is not None
    elif isinstance(images, np.ndarray):
        arr = images
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise CAManimError(f"images must be (B, H, W, C), got shape {images.shape}")
        if arr.shape[-1] not in (1, 3, 4) and arr.shape[1] in (1, 3, 4):
            arr = arr.transpose(0, 2, 3, 1)  # channels-first numpy
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif arr.dtype == np.uint16:
            arr = arr.astype(np.float32) / 65535.0
        undone = False
    else:
        raise CAManimError(f"images must be a tensor, a numpy array or a list of PIL images, "
                           f"got {type(images).__name__}")
    arr = np.asarray(arr, dtype=np.float32)
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    elif arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] != 3:
        raise CAManimError(f"images have {arr.shape[-1]} channels; frames can show 1, 3 or 4")
    if not undone and (arr.min() < -1e-3 or arr.max() > 1 + 1e-3):
        # Normalized input without mean/std: stretch each image so it shows.
        lo = arr.min(axis=(1, 2, 3), keepdims=True)
        hi = arr.max(axis=(1, 2, 3), keepdims=True)
        arr = (arr - lo) / np.maximum(hi - lo, 1e-12)
    return np.clip(np.nan_to_num(arr), 0.0, 1.0)


def _channel_vector(v: Sequence[float], c: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(
        list(v) if not isinstance(v, torch.Tensor) else v, dtype=torch.float32
    ).reshape(-1)
    if t.numel() == 1:
        t = t.expand(c)
    if t.numel() != c:
        raise CAManimError(f"{what} has {t.numel()} values but the images have {c} channels")
    return t


def overlay(image: np.ndarray, cam: np.ndarray, colormap: str | np.ndarray = "jet",
            alpha: float = 0.5) -> np.ndarray:
    """Blend a colour-mapped CAM over an image.

    Args:
        image: ``(H, W, 3)`` floats in [0, 1].
        cam: ``(H, W)`` map in [0, 1] (values outside are clipped).
        colormap: matplotlib name or a ``(256, 3)`` uint8 table.
        alpha: weight of the heatmap.

    Returns:
        ``(H, W, 3)`` uint8: ``(1 - alpha) * image + alpha * colormap(cam)``.
    """
    lut = colormap_lut(colormap) if isinstance(colormap, str) else colormap
    cam = np.asarray(cam)
    idx = torch.from_numpy(cam) if cam.dtype == np.uint8 else colour_indices(torch.from_numpy(cam))
    bg = torch.from_numpy(np.asarray(image, np.float32) * np.float32(255.0 * (1.0 - alpha)))
    return blend(bg, idx, torch.from_numpy(lut.astype(np.float32) * np.float32(alpha))).numpy()


def colour_indices(cam: torch.Tensor) -> torch.Tensor:
    """Colour-map indices of maps in [0, 1]: ``round(clip(cam, 0, 1) * 255)``
    as uint8 (values outside [0, 1] are clipped), on ``cam``'s device."""
    return (cam.float().clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)


def blend(background: torch.Tensor, idx: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """The overlay ``background + lut[idx]`` as uint8, on the tensors' device.

    Args:
        background: ``(..., H, W, 3)`` float32 image already scaled by
            ``255 * (1 - alpha)``.
        idx: ``(..., H, W)`` uint8 colour-map indices (`colour_indices`).
        lut: ``(256, 3)`` float32 colour table already scaled by ``alpha``.

    Returns:
        ``(..., H, W, 3)`` uint8 (rounded: ``+ 0.5`` then truncated).
    """
    return (background + lut[idx.long()]).add_(0.5).to(torch.uint8)


def iter_maps(maps: LayerMaps, normalization: str, size: tuple[int, int],
              quantize: bool = False,
              overlay_on: tuple[np.ndarray, np.ndarray] | None = None) -> Iterator[np.ndarray]:
    """Yield each layer's normalized map upsampled to ``size``: ``(B, H, W)``
    float32 numpy, one layer at a time (memory stays flat).

    ``quantize``: the uint8 colour-map indices instead (`colour_indices`).
    ``overlay_on=(backgrounds, lut)``: the finished overlay panels
    ``(B, H, W, 3)`` uint8 instead (`blend`; ``backgrounds`` ``(B, H, W, 3)``
    and ``lut`` ``(256, 3)``, float32, pre-scaled). Both are computed where
    the maps are (upsampling, normalization, colour lookup and blend are
    tensor ops on their device), so only uint8 crosses from an accelerator.
    """
    stream = maps.iter_upsampled(normalization, size)
    device = maps.raw[0].device if maps.raw else torch.device("cpu")
    on_cpu = device.type == "cpu"
    if overlay_on is not None:
        bg, lut = (torch.as_tensor(np.asarray(a, np.float32)).to(device) for a in overlay_on)
    while True:
        with one_torch_thread(on_cpu):
            try:
                up = next(stream)
            except StopIteration:
                return
            if overlay_on is not None:
                arr = blend(bg, colour_indices(up), lut).cpu().numpy()
            elif quantize:
                arr = colour_indices(up).cpu().numpy()
            else:
                arr = up.detach().float().cpu().numpy()
        yield arr
