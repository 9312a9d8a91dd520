"""Output layouts: what a model states about its tokens and maps
(`read_layout`: timm's ``num_prefix_tokens``, patch grid and ``output_fmt``,
Hiera's unroll; torchvision's ``class_token``), and the layout of one module
output (`output_layout`): NCHW, NHWC, tokens on a patch grid (read from the
model, else told from their count), a vector, or unknown with the reason.
`camanim.core.layers` records these for every call of one forward.

Read first: timm's ``num_prefix_tokens`` (class, distillation and register
tokens), its patch grid (``patch_embed.dynamic_feat_size`` for the input at
hand, or ``patch_embed.grid_size``; token outputs of a hierarchical model
may be on a 2x, 4x, ... downsampled grid), ``output_fmt == "NHWC"`` (Swin
stages), Hiera's ``unroll`` (every later token output is in mask-unit order:
skipped), and torchvision's ``class_token`` / ``patch_size`` /
``seq_length``. When the model states nothing, a token grid is told from
``N`` and the image's aspect ratio: ``N = h*w`` or ``N = 1 + h*w`` (a class
token first, dropped), ``h / w = H / W``. Token tensors whose first
dimension is not the batch (Swin's attention windows) are never drawn."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Output layouts.
NCHW = "nchw"        # spatial map, channels first
NHWC = "nhwc"        # spatial map, channels last (ConvNeXt blocks, Swin)
TOKENS = "tokens"    # (B, N, C) token sequence (ViT): needs reshape_transform
VECTOR = "vector"    # (B, F) or (B, C, 1, 1): no spatial extent
UNKNOWN = "unknown"  # cannot be told (MaxViT windows, tuples, ...)
SPATIAL = (NCHW, NHWC)

# Modules whose 4-D output is NCHW by construction.
NCHW_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.MaxPool2d,
              nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
              nn.InstanceNorm2d, nn.GroupNorm, nn.Upsample, nn.Dropout2d)


@dataclass(frozen=True)
class ModelLayout:
    """Layouts a model states itself (timm, torchvision ViT), read before a
    forward; empty when it states nothing (today's rule then applies).

    Attributes:
        prefix: tokens before the patch grid (class, distillation and register
            tokens), or ``None`` when the model does not say.
        grid: the patch grid ``(h, w)`` for the input at hand, or ``None``.
        nhwc: the model's stages are channels-last (``output_fmt == "NHWC"``).
        unroll: tokens output after this module's call are not in raster
            order (timm Hiera's mask-unit unroll); they are skipped.
        read: what was read, for the notice (e.g. ``"num_prefix_tokens=5"``).
    """

    prefix: int | None = None
    grid: tuple[int, int] | None = None
    nhwc: bool = False
    unroll: nn.Module | None = None
    read: tuple[str, ...] = ()

    def grids(self) -> list[tuple[int, int]]:
        """The patch grid and its 2x, 4x, ... downsamplings (ceil), largest first."""
        if self.grid is None:
            return []
        out, (h, w) = [], self.grid
        while h >= 1 and w >= 1 and (h, w) not in out:
            out.append((h, w))
            if h == 1 and w == 1:
                break
            h, w = -(-h // 2), -(-w // 2)
        return out


def _prefix_parts(model: nn.Module, prefix: int) -> str:
    """``"1 class + 4 register tokens"`` (timm's own token parameters)."""
    cls = int(getattr(model, "cls_token", None) is not None)
    dist = int(getattr(model, "dist_token", None) is not None)
    reg = prefix - cls - dist
    parts = [f"{cls} class"] * bool(cls) + [f"{dist} distillation"] * bool(dist)
    parts += [f"{reg} register"] * (reg > 0)
    return " + ".join(parts) + (" token" if prefix == 1 else " tokens") if parts else "no"


def _read_grid(model: nn.Module, image_size: tuple[int, int]) -> tuple[tuple[int, int], str] | None:
    """The patch grid for ``image_size`` and where it was read, or ``None``."""
    embed = getattr(model, "patch_embed", None)
    if isinstance(embed, nn.Module):
        size_fn = getattr(embed, "dynamic_feat_size", None)
        if callable(size_fn) and hasattr(embed, "patch_size"):
            try:
                h, w = size_fn(tuple(image_size))
                return (int(h), int(w)), "patch_embed.dynamic_feat_size"
            except (TypeError, ValueError, IndexError):  # not timm's signature
                pass
        grid = getattr(embed, "grid_size", None)
        if isinstance(grid, (tuple, list)) and len(grid) == 2:
            return (int(grid[0]), int(grid[1])), "patch_embed.grid_size"
    patch = getattr(model, "patch_size", None)
    if isinstance(getattr(model, "class_token", None), torch.Tensor) and isinstance(patch, int):
        return (image_size[0] // patch, image_size[1] // patch), "patch_size"  # torchvision ViT
    return None


def read_layout(model: nn.Module, image_size: tuple[int, int]) -> ModelLayout:
    """What ``model`` says about its token and map layouts (see `ModelLayout`)."""
    read: list[str] = []
    prefix = getattr(model, "num_prefix_tokens", None)
    if isinstance(prefix, int) and not isinstance(prefix, bool):
        read.append(f"num_prefix_tokens={prefix} ({_prefix_parts(model, prefix)})")
    elif isinstance(getattr(model, "class_token", None), torch.Tensor):
        prefix = 1  # torchvision VisionTransformer: one class token before the grid
        read.append("class_token (1 class token)")
    else:
        prefix = None
    found = _read_grid(model, image_size)
    grid = found[0] if found else None
    if found:
        read.append(f"a {grid[0]}x{grid[1]} patch grid ({found[1]})")  # type: ignore[index]
        seq = getattr(model, "seq_length", None)
        if isinstance(seq, int) and prefix is not None and seq != prefix + grid[0] * grid[1]:  # type: ignore[index]
            grid = None  # torchvision ViT whose seq_length disagrees: trust neither
            read.pop()
    nhwc = str(getattr(model, "output_fmt", "")).upper() == "NHWC"
    if nhwc:
        read.append("output_fmt=NHWC")
    unroll = getattr(model, "unroll", None)
    unroll = unroll if isinstance(unroll, nn.Module) and hasattr(model, "reroll") else None
    if unroll is not None:
        read.append("unroll (tokens in mask-unit order)")
    return ModelLayout(prefix=prefix, grid=grid, nhwc=nhwc, unroll=unroll, read=tuple(read))


def _read_token_grid(n: int, layout: ModelLayout) -> tuple[int, int, int] | None:
    """``(prefix, h, w)`` for ``n`` tokens from the grid (or its
    downsamplings) and prefix the model states, else ``None``."""
    prefixes = [layout.prefix, 0] if layout.prefix else [0]
    for h, w in layout.grids():
        for p in prefixes:
            if n == p + h * w and h * w > 1:
                return p, h, w
    return None


def token_grid(n: int, image_size: tuple[int, int],
               prefixes: Sequence[int] = (0, 1)) -> tuple[int, int, int] | None:
    """``(prefix, h, w)`` with ``n = prefix + h*w``, ``prefix`` one of
    ``prefixes`` and ``h / w = H / W`` of ``image_size``; ``None`` if no such
    grid exists or more than one prefix fits (ambiguous)."""
    height, width = (int(v) for v in image_size)
    g = math.gcd(height, width) or 1
    ah, aw = height // g, width // g                 # h = k * ah, w = k * aw
    fits = []
    for prefix in prefixes:
        cells = n - prefix
        if cells < 1 or cells % (ah * aw):
            continue
        k = math.isqrt(cells // (ah * aw))
        if k * k * ah * aw == cells:
            fits.append((prefix, k * ah, k * aw))
    return fits[0] if len(fits) == 1 else None


def downsized(before: tuple[int, int], after: tuple[int, int]) -> bool:
    """``after`` is a smaller map size with the aspect ratio of ``before``."""
    return (0 < after[0] < before[0] and 0 < after[1] < before[1]
            and after[0] * before[1] == after[1] * before[0])


def input_layout(inp: Any, known_sizes: set[tuple[int, int]]
                  ) -> tuple[str, tuple[int, int]] | None:
    """``(layout, (h, w))`` of a 4-D input whose layout the known sizes tell."""
    x = inp[0] if isinstance(inp, tuple) and inp else inp
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return None
    nchw, nhwc = tuple(x.shape[2:4]), tuple(x.shape[1:3])
    if (nchw in known_sizes) == (nhwc in known_sizes):
        return None
    return (NCHW, nchw) if nchw in known_sizes else (NHWC, nhwc)  # type: ignore[return-value]


@dataclass
class LayoutContext:
    """What one discovery forward knows while it runs."""

    image_size: tuple[int, int]
    batch: int
    model_layout: ModelLayout
    known_sizes: set[tuple[int, int]]
    unrolled: bool = False   # the model's unroll module has run: tokens are not raster


# (layout, reason it cannot be drawn, token grid, where the layout came from)
_Layout = tuple[str, str | None, tuple[int, int, int] | None, str | None]


def _token_layout(shape: tuple[int, ...], ctx: LayoutContext) -> _Layout:
    """Layout of a ``(B, N, C)`` output: its patch grid read from the model,
    else told from ``N`` and the image's aspect ratio (today's rule)."""
    n, ml = int(shape[1]), ctx.model_layout
    if int(shape[0]) != ctx.batch:
        return UNKNOWN, (f"3-D output {shape} whose first dimension is not the batch of "
                         f"{ctx.batch} (window or patch tensor): layout cannot be told"), None, None
    if ctx.unrolled:
        return TOKENS, ("tokens in the model's unrolled (mask-unit) order (timm Hiera): drawn "
                        "as a raster grid they would be scrambled; pass a reshape_transform= "
                        "that rerolls them (see the model's reroll)"), None, None
    read = _read_token_grid(n, ml)
    if read is not None:
        return TOKENS, None, read, "read from the model: " + ", ".join(ml.read)
    if ml.prefix:
        grid = token_grid(n, ctx.image_size, (ml.prefix,)) or token_grid(n, ctx.image_size, (0,))
        if grid is not None and grid[1] * grid[2] > 1:
            return TOKENS, None, grid, "prefix read from the model: " + ", ".join(ml.read)
    grid = token_grid(n, ctx.image_size)
    if grid is not None and grid[1] * grid[2] > 1:
        return TOKENS, None, grid, "guessed from the token count"
    return TOKENS, (f"token sequence (B, N, C) with N = {n}: no patch grid h x w with the "
                    "image's aspect ratio fits N or N - 1 (class token), and the model states "
                    "no prefix and grid that fit; pass reshape_transform= to turn it into "
                    "(B, C, h, w)"), None, None


def _map_layout(module: nn.Module, shape: tuple[int, ...], ctx: LayoutContext,
                in_layout: tuple[str, tuple[int, int]] | None) -> str:
    """NCHW, NHWC or UNKNOWN for a 4-D output with a spatial extent."""
    _, a, b, c = shape
    if isinstance(module, NCHW_TYPES):
        return NCHW
    nchw, nhwc = (b, c) in ctx.known_sizes, (a, b) in ctx.known_sizes
    if nchw and not nhwc:
        return NCHW
    if nhwc and not nchw:
        return NHWC
    if nchw and nhwc:
        # (B, h, h, h)-like shapes: a model stating NHWC stages is read so;
        # else only trust NCHW when the module keeps its input's layout
        if ctx.model_layout.nhwc:
            return NHWC
        return NCHW if isinstance(module, (nn.ReLU, nn.SiLU, nn.GELU, nn.Sequential)) else UNKNOWN
    if in_layout is not None and downsized(in_layout[1], (b, c) if in_layout[0] == NCHW
                                            else (a, b)):
        # a new, smaller size with the input's aspect ratio (Swin's patch
        # merging, NHWC in and out): keep the input's layout
        return in_layout[0]
    return UNKNOWN


def output_layout(module: nn.Module, out: Any, ctx: LayoutContext,
            in_layout: tuple[str, tuple[int, int]] | None = None) -> _Layout:
    """Layout of one output, the reason it cannot be drawn (or ``None``), the
    token grid of a ``(B, N, C)`` output and where its layout was read.
    ``in_layout``: the module input's layout and size, when known."""
    if not isinstance(out, torch.Tensor):
        return UNKNOWN, f"output is a {type(out).__name__}, not a single tensor", None, None
    if not out.is_floating_point():
        return UNKNOWN, f"output has dtype {out.dtype}, not a float map", None, None
    shape = tuple(out.shape)
    if out.dim() == 2:
        return VECTOR, ("vector output (B, F): it has no spatial extent, a CAM "
                        "of it only draws lines (CAManim paper, Fig. 7)"), None, None
    if out.dim() == 3:
        return _token_layout(shape, ctx)
    if out.dim() != 4:
        return UNKNOWN, f"{out.dim()}-D output {shape}: layout cannot be told", None, None
    _, a, b, c = shape
    if (b, c) == (1, 1) or (a, b) == (1, 1):
        return VECTOR, ("1x1 spatial output: no spatial extent, a CAM of it "
                        "is constant (CAManim paper, Fig. 7)"), None, None
    layout = _map_layout(module, shape, ctx, in_layout)
    if layout == UNKNOWN:
        return UNKNOWN, (f"4-D output {shape} matches no spatial size seen in this "
                         "forward (window or patch tensor?): layout cannot be told"), None, None
    source = "read from the model: output_fmt=NHWC" if layout == NHWC and ctx.model_layout.nhwc \
        else None
    return layout, None, None, source


def prefix_words(prefix: int, source: str) -> str:
    """``"a class token (dropped) + "``, ``"5 prefix tokens (dropped) + "`` or ``""``."""
    if not prefix:
        return ""
    if prefix == 1 and "register" not in source and "distillation" not in source:
        return "a class token (dropped) + "
    return f"{prefix} prefix token{'s' if prefix > 1 else ''} (dropped) + "


def flag_zero_gradients(model: nn.Module, x: torch.Tensor, infos: list[Any]) -> None:
    """Flag token layers (with prefix tokens) whose patch tokens get an exactly
    zero gradient from the output while their prefix tokens do not: in a
    class-token ViT, every output after the last block's attention. Costs one
    forward and backward, only for models with such layers."""
    cands = [i for i in infos if i.layout == TOKENS and i.token_grid and i.token_grid[0] > 0]
    if not cands:
        return
    from .capture import Hooks  # local import: capture imports layers, which imports this
    from .guard import eval_mode

    with eval_mode(model), torch.inference_mode(False), torch.enable_grad(), \
            Hooks(model, cands, clone={i.name for i in cands if i.overwritten}) as hooks:
        out = model(x.detach().clone().requires_grad_(True))
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return
        outs = [hooks.outputs.get(i.name) for i in cands]
        pairs = [(i, o) for i, o in zip(cands, outs, strict=True)
                 if o is not None and o.requires_grad]
        if not pairs:
            return
        grads = torch.autograd.grad(out.float().sum(), [o for _, o in pairs], allow_unused=True)
    for (info, _), g in zip(pairs, grads, strict=True):
        prefix = info.token_grid[0]
        if g is not None and bool((g[:, prefix:] == 0).all()) and bool((g[:, :prefix] != 0).any()):
            info.zero_gradient = True
