"""Layer discovery: every module *call* of one forward, in execution order.

A dry forward with a hook on every submodule records each call (a module
called k > 1 times in one forward appears as ``name#k``), its output shape
and layout, and which calls share one output tensor. Selectors then pick the
layers a CAM can be drawn for:

* ``"conv"``: every ``nn.Conv2d`` call,
* ``"all"``: every call whose output is a spatial map; a container whose
  output is the very tensor of its last child call is one layer (named after
  the container), not two,
* ``"blocks"``: the last layer before each downsampling (the SISE rule),
  see `block_layers`; ResNet-50: ``relu, layer1..layer4``, VGG: the ReLU
  before each max pool,
* a list of call names (``"layer1.0.relu"`` is the first call of that
  module, ``"layer1.0.relu#2"`` the second; any call can be named, also one
  that ``"all"`` folds into its container),
* a callable ``(name, module) -> bool``.

Token outputs ``(B, N, C)`` (vision transformers) are drawn on their patch
grid. What the model states is read first (`read_layout`): timm's
``num_prefix_tokens`` (class, distillation and register tokens), its patch
grid (``patch_embed.dynamic_feat_size`` for the input at hand, or
``patch_embed.grid_size``), ``output_fmt == "NHWC"`` (Swin stages), and
torchvision's ``class_token`` / ``patch_size`` / ``seq_length``. When the
model states nothing, the grid is told from ``N`` and the image's aspect
ratio: ``N = h*w`` or ``N = 1 + h*w`` (a class token first, dropped), with
``h / w = H / W``. One warning names what was read or guessed;
``reshape_transform=`` (a function ``(B, N, C) -> (B, C, h, w)``) overrides
it for every token layer. Token outputs no grid fits, tokens in an unrolled
(mask-unit) order (timm Hiera) and tensors whose first dimension is not the
batch (attention windows) are skipped by ``"all"`` / ``"blocks"`` with their
reason, and an error when named: never drawn scrambled. Token layers whose
patch tokens get no gradient from the output (the last block of a
class-token ViT) are drawn and flagged ``zero_gradient``.

On timm models ``"blocks"`` is the model's own feature stages
(``feature_info``) where they can be drawn: ResNet ``act1, layer1..layer4``,
ConvNeXt ``stages.0..3``, Swin ``layers.0..3`` (NHWC), ViT every block
``blocks.0..blocks.{depth-1}`` (one resolution, so the SISE rule would give
one layer).
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CAManimError
from .guard import eval_mode

# Output layouts.
NCHW = "nchw"        # spatial map, channels first
NHWC = "nhwc"        # spatial map, channels last (ConvNeXt blocks, Swin)
TOKENS = "tokens"    # (B, N, C) token sequence (ViT): needs reshape_transform
VECTOR = "vector"    # (B, F) or (B, C, 1, 1): no spatial extent
UNKNOWN = "unknown"  # cannot be told (MaxViT windows, tuples, ...)
SPATIAL = (NCHW, NHWC)

Selector = str | Sequence[str] | Callable[[str, nn.Module], bool]

# Pooling layers: their output only carries a map to the next resolution, it
# is never "the last layer before a downsampling" (see block_layers).
_POOL_TYPES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
               nn.LPPool2d, nn.FractionalMaxPool2d)
_POOL_NAMES = frozenset(t.__name__ for t in _POOL_TYPES)

# Modules whose 4-D output is NCHW by construction.
_NCHW_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.MaxPool2d,
               nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
               nn.InstanceNorm2d, nn.GroupNorm, nn.Upsample, nn.Dropout2d)


@dataclass
class LayerInfo:
    """One module call of the forward pass.

    Attributes:
        name: selectable name; ``module_name`` or ``module_name#call``.
        module_name: qualified name from ``model.named_modules()``.
        call: 1-based call number of that module within one forward.
        order: position among all recorded calls (execution order).
        type: class name of the module.
        output_shape: shape of the output for the example input.
        params: the module's own parameters (``recurse=False``).
        params_total: parameters of the module and all its children.
        depth: nesting depth of ``module_name`` (``"layer1.0"`` is 1).
        layout: one of ``nchw``, ``nhwc``, ``tokens``, ``vector``, ``unknown``.
        skipped: why this call cannot be drawn (``None`` if it can).
        aliases: names of inner calls whose output is this very tensor.
        overwritten: a later in-place op changed this output (capture clones).
        merged: this call's output is also its parent container's output;
            the container stands for both (not listed by ``"all"``).
        stage: resolution stage of a drawable map (0, 1, ... in order of
            appearance): maps whose sizes differ only by the border a
            stride-1 convolution or pooling trims (Inception's unpadded 3x3
            convs) share a stage; a stride or a pooling starts a new one.
            ``None`` for outputs without a spatial grid.
        token_grid: ``(prefix, h, w)`` for a token output ``(B, prefix + h*w,
            C)`` whose patch grid was told from its length (``prefix``: 1
            class token or 0), else ``None``.
        layout_source: where a token or channels-last layout came from:
            ``"read from the model: ..."`` (what was read, e.g.
            ``num_prefix_tokens``, ``patch_embed.grid_size``, ``output_fmt``),
            ``"guessed from the token count"``, or ``None``.
        zero_gradient: the output's patch tokens get no gradient from the
            model's output (a class-token ViT's last block: the class token
            reads the patches only through attention, before). Gradient maps
            of such a layer are zero; it is drawn, and flagged.
    """

    name: str
    module_name: str
    call: int
    order: int
    type: str
    output_shape: tuple[int, ...]
    params: int
    params_total: int
    depth: int
    layout: str
    skipped: str | None = None
    aliases: tuple[str, ...] = ()
    overwritten: bool = False
    merged: bool = False
    stage: int | None = None
    token_grid: tuple[int, int, int] | None = None
    layout_source: str | None = None
    zero_gradient: bool = False

    @property
    def spatial_size(self) -> tuple[int, int] | None:
        """``(h, w)`` of the map for spatial layouts (and token outputs with a
        known grid), else ``None``."""
        if self.layout == NCHW:
            return tuple(self.output_shape[2:4])  # type: ignore[return-value]
        if self.layout == NHWC:
            return tuple(self.output_shape[1:3])  # type: ignore[return-value]
        if self.layout == TOKENS and self.token_grid is not None:
            return tuple(self.token_grid[1:])  # type: ignore[return-value]
        return None

    @property
    def channels(self) -> int | None:
        if self.layout == NCHW:
            return int(self.output_shape[1])
        if self.layout == NHWC:
            return int(self.output_shape[3])
        if self.layout == TOKENS and self.token_grid is not None:
            return int(self.output_shape[2])
        return None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerInfo:
        d = dict(d)
        d["output_shape"] = tuple(d["output_shape"])
        d["aliases"] = tuple(d.get("aliases", ()))
        if d.get("token_grid") is not None:
            d["token_grid"] = tuple(d["token_grid"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerTable:
    """All calls of one forward plus the selection made from them."""

    calls: list[LayerInfo]
    selected: list[LayerInfo]
    skipped: list[LayerInfo] = field(default_factory=list)

    def __iter__(self):
        return iter(self.selected)

    def __len__(self) -> int:
        return len(self.selected)

    @property
    def names(self) -> list[str]:
        return [info.name for info in self.selected]



# --------------------------------------------------------------------------
# what the model itself says about its layouts

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


# --------------------------------------------------------------------------
# discovery

def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and module not in names:
            names[module] = name
    return names


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


def _downsized(before: tuple[int, int], after: tuple[int, int]) -> bool:
    """``after`` is a smaller map size with the aspect ratio of ``before``."""
    return (0 < after[0] < before[0] and 0 < after[1] < before[1]
            and after[0] * before[1] == after[1] * before[0])


def _input_layout(inp: Any, known_sizes: set[tuple[int, int]]
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
class _Context:
    """What one discovery forward knows while it runs."""

    image_size: tuple[int, int]
    batch: int
    model_layout: ModelLayout
    known_sizes: set[tuple[int, int]]
    unrolled: bool = False   # the model's unroll module has run: tokens are not raster


# (layout, reason it cannot be drawn, token grid, where the layout came from)
_Layout = tuple[str, str | None, tuple[int, int, int] | None, str | None]


def _token_layout(shape: tuple[int, ...], ctx: _Context) -> _Layout:
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


def _map_layout(module: nn.Module, shape: tuple[int, ...], ctx: _Context,
                in_layout: tuple[str, tuple[int, int]] | None) -> str:
    """NCHW, NHWC or UNKNOWN for a 4-D output with a spatial extent."""
    _, a, b, c = shape
    if isinstance(module, _NCHW_TYPES):
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
    if in_layout is not None and _downsized(in_layout[1], (b, c) if in_layout[0] == NCHW
                                            else (a, b)):
        # a new, smaller size with the input's aspect ratio (Swin's patch
        # merging, NHWC in and out): keep the input's layout
        return in_layout[0]
    return UNKNOWN


def _layout(module: nn.Module, out: Any, ctx: _Context,
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


def _stride_one_resize(module: nn.Module, inp: Any, out: Any) -> tuple[tuple[int, int],
                                                                      tuple[int, int]] | None:
    """``(input size, output size)`` of a stride-1 convolution or pooling that
    changed the map size (no padding), else ``None``."""
    if not isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return None
    x = inp[0] if isinstance(inp, tuple) and inp else inp
    if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)
            and x.dim() == 4 and out.dim() == 4):
        return None
    stride = module.stride
    strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if any(int(s) != 1 for s in strides):
        return None
    a, b = tuple(x.shape[2:4]), tuple(out.shape[2:4])
    return (a, b) if a != b else None


class _Recorder:
    """The forward hook of discovery: one record per module call."""

    def __init__(self, model: nn.Module, ctx: _Context) -> None:
        self.names = _module_names(model)
        self.children = {m: set(m.children()) for m in self.names}
        self.parent_of: dict[nn.Module, nn.Module] = {}
        for m in self.names:
            for c in self.children[m]:
                self.parent_of.setdefault(c, m)
        self.ctx = ctx
        self.calls: list[dict[str, Any]] = []
        self.counts: dict[nn.Module, int] = {}
        self.last_child_call: dict[nn.Module, int] = {}  # parent -> index into calls
        self.same_stage: list[tuple[tuple[int, int], tuple[int, int]]] = []

    def _learn_size(self, module: nn.Module, out: Any, layout: str,
                    in_layout: tuple[str, tuple[int, int]] | None) -> None:
        known = self.ctx.known_sizes
        if layout == NCHW and isinstance(module, _NCHW_TYPES):
            known.add(tuple(out.shape[2:4]))
        elif layout in SPATIAL and in_layout is not None:
            size = tuple(out.shape[2:4]) if layout == NCHW else tuple(out.shape[1:3])
            if size not in known and _downsized(in_layout[1], size):  # type: ignore[arg-type]
                known.add(size)  # type: ignore[arg-type]

    def hook(self, module: nn.Module, inp: Any, out: Any) -> None:
        self.counts[module] = k = self.counts.get(module, 0) + 1
        in_layout = _input_layout(inp, self.ctx.known_sizes)
        if module is self.ctx.model_layout.unroll:
            self.ctx.unrolled = True  # its own output and every later token output
        layout, reason, grid, source = _layout(module, out, self.ctx, in_layout)
        self._learn_size(module, out, layout, in_layout)
        pair = _stride_one_resize(module, inp, out)
        if pair is not None:
            self.same_stage.append(pair)
        rec = {
            "module": module, "module_name": self.names[module], "call": k, "out": out,
            "version": out._version if isinstance(out, torch.Tensor) else None,
            "layout": layout, "skipped": reason, "merged_into": None,
            "aliases": [], "grid": grid, "source": source,
        }
        idx = len(self.calls)
        # A container whose output is the very tensor of its last child call
        # is one layer: the container's record absorbs the child's.
        j = self.last_child_call.get(module) if self.children[module] else None
        if j is not None and isinstance(out, torch.Tensor) and self.calls[j]["out"] is out:
            child = self.calls[j]
            child["merged_into"] = idx
            rec["aliases"] = child["aliases"] + [_call_name(child)]
        self.calls.append(rec)
        p = self.parent_of.get(module)
        if p is not None:
            self.last_child_call[p] = idx

    def infos(self) -> list[LayerInfo]:
        """The records as `LayerInfo` (a repeated call gets ``#k``)."""
        infos: list[LayerInfo] = []
        for i, rec in enumerate(self.calls):
            out, module, mname = rec["out"], rec["module"], rec["module_name"]
            overwritten = isinstance(out, torch.Tensor) and out._version != rec["version"]
            infos.append(LayerInfo(
                name=_call_name(rec), module_name=mname, call=rec["call"], order=i,
                type=type(module).__name__,
                output_shape=tuple(out.shape) if isinstance(out, torch.Tensor) else (),
                params=sum(p.numel() for p in module.parameters(recurse=False)),
                params_total=sum(p.numel() for p in module.parameters()),
                depth=mname.count("."), layout=rec["layout"], skipped=rec["skipped"],
                aliases=tuple(rec["aliases"]), overwritten=bool(overwritten),
                merged=rec["merged_into"] is not None, token_grid=rec["grid"],
                layout_source=rec["source"]))
        return infos


def discover(model: nn.Module, example_input: torch.Tensor) -> list[LayerInfo]:
    """Record every module call of one forward of ``example_input``.

    Runs under ``torch.no_grad()`` in eval mode; every submodule's train/eval
    mode is restored and every hook removed, also when the forward raises.
    Token layouts the model states itself (`read_layout`) are read, not
    guessed; token layers whose patch tokens get no gradient from the output
    (the last block of a class-token ViT) are flagged ``zero_gradient``.
    """
    image_size = tuple(int(v) for v in example_input.shape[-2:])
    ml = read_layout(model, image_size)  # type: ignore[arg-type]
    known = {image_size} | (set(ml.grids()) if ml.nhwc else set())
    ctx = _Context(image_size=image_size, batch=int(example_input.shape[0]),  # type: ignore[arg-type]
                   model_layout=ml, known_sizes=known)  # type: ignore[arg-type]
    rec = _Recorder(model, ctx)
    handles = []
    try:
        for m in rec.names:
            handles.append(m.register_forward_hook(rec.hook))
        with eval_mode(model), torch.inference_mode(False), torch.no_grad():
            model(example_input.clone())
    except CAManimError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise CAManimError(
            f"the model failed on an input of shape {tuple(example_input.shape)}: "
            f"{type(e).__name__}: {e}. Check the image size and channels the model expects.") from e
    finally:
        for h in handles:
            h.remove()
    infos = rec.infos()
    _number_stages(infos, rec.same_stage)
    _flag_zero_gradients(model, example_input, infos)
    return infos


def _flag_zero_gradients(model: nn.Module, x: torch.Tensor, infos: list[LayerInfo]) -> None:
    """Flag token layers (with prefix tokens) whose patch tokens get an exactly
    zero gradient from the output while their prefix tokens do not: in a
    class-token ViT, every output after the last block's attention. Costs one
    forward and backward, only for models with such layers."""
    cands = [i for i in infos if i.layout == TOKENS and i.token_grid and i.token_grid[0] > 0]
    if not cands:
        return
    from .capture import Hooks  # local import: capture imports layers

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
        prefix = info.token_grid[0]  # type: ignore[index]
        if g is not None and bool((g[:, prefix:] == 0).all()) and bool((g[:, :prefix] != 0).any()):
            info.zero_gradient = True


def _number_stages(infos: list[LayerInfo],
                   same: list[tuple[tuple[int, int], tuple[int, int]]]) -> None:
    """Set ``info.stage``: map sizes joined by a stride-1 resize are one stage."""
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def root(s: tuple[int, int]) -> tuple[int, int]:
        parent.setdefault(s, s)
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    for a, b in same:
        parent[root(a)] = root(b)
    number: dict[tuple[int, int], int] = {}
    for info in infos:
        size = info.spatial_size
        if size is not None:
            info.stage = number.setdefault(root(size), len(number))


def _call_name(rec: dict[str, Any]) -> str:
    return rec["module_name"] if rec["call"] == 1 else f"{rec['module_name']}#{rec['call']}"


# --------------------------------------------------------------------------
# selection

def _drawable(info: LayerInfo, reshape_transform: Callable | None) -> str | None:
    """Reason why ``info`` cannot be drawn, or ``None``."""
    if info.layout in SPATIAL:
        return None
    if info.layout == TOKENS and (reshape_transform is not None or info.token_grid is not None):
        return None
    return info.skipped or f"layout {info.layout} cannot be drawn"


def is_pool_output(info: LayerInfo, pools: set[str] | frozenset[str]) -> bool:
    """The call is a pooling layer, or a container whose output is one's
    (``pools``: names of the pooling calls)."""
    return info.type in _POOL_NAMES or any(a in pools for a in info.aliases)


def block_layers(cands: list[LayerInfo], calls: list[LayerInfo]) -> list[LayerInfo]:
    """The SISE rule: the last layer before each downsampling.

    Per resolution stage (see `LayerInfo.stage`), among the candidates at the
    shallowest nesting depth there, the last one executed: the block's output
    (ResNet-50: ``relu, layer1, layer2, layer3, layer4``; DenseNet: each dense
    block, not the transition's 1x1 conv that belongs to the downsampling).
    Pooling outputs are not candidates: a pool ends a stage, it computes
    nothing at the resolution it hands on. So a stage reached only by pooling
    has no block: VGG gives the ReLU before each of its five max pools, not
    the last pool's output (its ``features`` container) nor ``avgpool``.
    """
    pools = {i.name for i in calls if i.type in _POOL_NAMES}
    by_stage: dict[int, list[LayerInfo]] = {}
    for info in cands:
        if info.stage is not None and not is_pool_output(info, pools):
            by_stage.setdefault(info.stage, []).append(info)
    chosen = []
    for group in by_stage.values():
        depth = min(i.depth for i in group)
        chosen.append([i for i in group if i.depth == depth][-1])
    return sorted(chosen, key=lambda i: i.order)


def _prefix_words(prefix: int, source: str) -> str:
    """``"a class token (dropped) + "``, ``"5 prefix tokens (dropped) + "`` or ``""``."""
    if not prefix:
        return ""
    if prefix == 1 and "register" not in source and "distillation" not in source:
        return "a class token (dropped) + "
    return f"{prefix} prefix token{'s' if prefix > 1 else ''} (dropped) + "


def _notice(chosen: list[LayerInfo], reshape_transform: Callable | None) -> None:
    """One warning: how token layers were laid out (what was read from the
    model, or guessed from their length) and which layers get no gradient."""
    parts = []
    if reshape_transform is None:
        by_source: dict[str, set[tuple[int, int, int]]] = {}
        for i in chosen:
            if i.layout == TOKENS and i.token_grid:
                by_source.setdefault(i.layout_source or "guessed", set()).add(i.token_grid)
        for source, grids in by_source.items():
            what = "; ".join(f"(B, {p + h * w}, C) drawn as {_prefix_words(p, source)}"
                             f"a {h}x{w} patch grid" for p, h, w in sorted(grids))
            parts.append(f"token outputs {what} ({source})")
        if parts:
            parts[-1] += "; pass reshape_transform= to read them otherwise"
    zero = [i.name for i in chosen if i.zero_gradient]
    if zero:
        shown = ", ".join(zero[:3]) + (f" and {len(zero) - 3} more" if len(zero) > 3 else "")
        parts.append(f"{len(zero)} layer(s) ({shown}) get no gradient from the output: in a "
                     "class-token ViT the last block's patch tokens never reach the class "
                     "token, so gradient-based maps there are zero (drawn; flagged "
                     "zero_gradient in the layer table)")
    if parts:
        warnings.warn("camanim: " + ". ".join(parts) + ".", UserWarning, stacklevel=3)


def _feature_blocks(model: nn.Module, calls: list[LayerInfo]) -> list[LayerInfo] | None:
    """The calls of the model's own feature stages (timm's ``feature_info``,
    also on a wrapped model), or ``None`` when it has none that ran."""
    prefix, dicts = "", None
    for name, module in model.named_modules():
        info = getattr(module, "feature_info", None)
        got = info.get_dicts() if hasattr(info, "get_dicts") else info
        if isinstance(got, (list, tuple)) and got and all(isinstance(d, dict) for d in got):
            prefix, dicts = name, got
            break
    if dicts is None:
        return None
    first = {i.module_name: i for i in reversed(calls) if i.call == 1}
    found: list[LayerInfo] = []
    for d in dicts:
        name = str(d.get("module", ""))
        for cand in (name, name.replace("_", ".")):
            full = f"{prefix}.{cand}" if prefix else cand
            if full in first and first[full] not in found:
                found.append(first[full])
                break
    return sorted(found, key=lambda i: i.order) or None


class _Keeper:
    """Splits candidate calls into drawable ones and skipped ones."""

    def __init__(self, reshape_transform: Callable | None) -> None:
        self.reshape_transform = reshape_transform
        self.skipped: list[LayerInfo] = []

    def __call__(self, cands: list[LayerInfo]) -> list[LayerInfo]:
        out = []
        for info in cands:
            if _drawable(info, self.reshape_transform) is None:
                out.append(info)
            elif info not in self.skipped:
                self.skipped.append(info)
        return out


def _select_builtin(calls: list[LayerInfo], layers: str, model: nn.Module | None,
                    keep: _Keeper) -> list[LayerInfo]:
    """``"conv"``, ``"all"`` or ``"blocks"``: the model's own feature stages
    (timm's ``feature_info``) where it has drawable ones, else the SISE rule."""
    modules = dict(model.named_modules()) if model is not None else {}
    merged = {i.name for i in calls if i.merged}
    if layers == "conv":
        chosen = keep([i for i in calls if i.type in ("Conv2d",) or
                       isinstance(modules.get(i.module_name), nn.Conv2d)])
    else:
        chosen = keep([i for i in calls if i.name not in merged])
        if layers == "blocks":
            stages = keep(_feature_blocks(model, calls) or []) if model is not None else []
            chosen = stages or block_layers(chosen, calls)
    if not chosen:
        kinds = sorted({i.layout for i in calls})
        raise CAManimError(
            f"layers={layers!r} matched no drawable layer in this model "
            f"(layouts seen: {', '.join(kinds)}). A model with no spatial "
            "layers cannot be explained by a CAM; for token models pass "
            "reshape_transform=, or name layers explicitly "
            "(see camanim.list_layers).")
    return chosen


def _select_names(calls: list[LayerInfo], wanted: list[Any],
                  reshape_transform: Callable | None) -> list[LayerInfo]:
    """The calls named in ``wanted``, in execution order; a clear error for
    an unknown or undrawable name."""
    if not wanted:
        raise CAManimError("an empty list of layers selects nothing; name at "
                           "least one layer or use 'conv' / 'all' / 'blocks'")
    by_name = {i.name: i for i in calls}
    chosen: list[LayerInfo] = []
    for w in wanted:
        if not isinstance(w, str):
            raise CAManimError(f"layer names must be strings, got {w!r}")
        if w not in by_name:
            close = difflib.get_close_matches(w, list(by_name), n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CAManimError(
                f"no layer named {w!r} in this model{hint} "
                f"(camanim.list_layers lists all {len(by_name)} layer calls)")
        info = by_name[w]
        reason = _drawable(info, reshape_transform)
        if reason is not None:
            raise CAManimError(f"layer {info.name!r} cannot be drawn: {reason}")
        if info not in chosen:
            chosen.append(info)
    return sorted(chosen, key=lambda i: i.order)


def _spaced(chosen: list[LayerInfo], max_layers: int | None) -> list[LayerInfo]:
    """At most ``max_layers`` evenly spaced layers of ``chosen``."""
    if max_layers is None:
        return chosen
    if int(max_layers) < 1:
        raise CAManimError(f"max_layers must be >= 1, got {max_layers}")
    if len(chosen) <= max_layers:
        return chosen
    idx = np.unique(np.round(np.linspace(0, len(chosen) - 1, int(max_layers))).astype(int))
    return [chosen[i] for i in idx]


def select(calls: list[LayerInfo], layers: Selector, model: nn.Module | None = None,
           reshape_transform: Callable | None = None,
           max_layers: int | None = None) -> LayerTable:
    """Pick the drawable calls named by ``layers`` (see module docstring)."""
    keep = _Keeper(reshape_transform)
    if isinstance(layers, str) and layers in ("conv", "all", "blocks"):
        chosen = _select_builtin(calls, layers, model, keep)
    elif layers is None:
        raise CAManimError("layers=None selects nothing here: use 'conv', 'all', 'blocks', a "
                           "list of layer names, or a callable (name, module) -> bool")
    elif isinstance(layers, str):
        raise CAManimError(
            f"unknown layer selector {layers!r}: use 'conv', 'all', 'blocks', a list "
            "of layer names, or a callable (name, module) -> bool")
    elif callable(layers):
        modules = dict(model.named_modules()) if model is not None else {}
        chosen = keep([i for i in calls if layers(i.name, modules.get(i.module_name))])
        if not chosen:
            raise CAManimError("the layer callable selected no drawable layer; "
                               "see camanim.list_layers(model, x) for what exists")
    else:
        chosen = _select_names(calls, list(layers), reshape_transform)
    chosen = _spaced(chosen, max_layers)
    _notice(chosen, reshape_transform)
    return LayerTable(calls=calls, selected=chosen, skipped=keep.skipped)


def list_layers(model: nn.Module, example_input: torch.Tensor, layers: Selector = "all",
                reshape_transform: Callable | None = None,
                max_layers: int | None = None) -> LayerTable:
    """Discover the layer calls of ``model`` on ``example_input`` and select.

    Args:
        model: any ``nn.Module`` taking ``(B, C, H, W)`` images.
        example_input: ``(B, C, H, W)`` tensor (batch 1 is enough).
        layers: ``"conv"``, ``"all"``, ``"blocks"``, names, or a callable.
        reshape_transform: turns token outputs into ``(B, C, h, w)``.
        max_layers: keep this many evenly spaced layers at most.

    Returns:
        `LayerTable` with ``calls`` (every call, in order), ``selected`` (the
        drawable calls picked) and ``skipped`` (matched but not drawable, each
        with its ``skipped`` reason).
    """
    from .inputs import check_images  # local import: inputs imports layers

    x = check_images(example_input, model)
    calls = discover(model, x[:1])
    return select(calls, layers, model=model, reshape_transform=reshape_transform,
                  max_layers=max_layers)
