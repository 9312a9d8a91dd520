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
grid when it can be told from ``N`` and the image's aspect ratio: ``N = h*w``
(a grid alone) or ``N = 1 + h*w`` (a class token first, dropped), with
``h / w = H / W``. A one-line warning says so; ``reshape_transform=`` (a
function ``(B, N, C) -> (B, C, h, w)``) overrides it for every token layer.
Token outputs no grid fits (register tokens, pooled sequences) need
``reshape_transform=``; they are skipped by ``"all"`` / ``"blocks"`` and an
error when named.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
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

#: a user's token -> (B, C, h, w) transform
Transform = Callable[[torch.Tensor], torch.Tensor]
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

    def __iter__(self) -> Iterator[LayerInfo]:
        return iter(self.selected)

    def __len__(self) -> int:
        return len(self.selected)

    @property
    def names(self) -> list[str]:
        return [info.name for info in self.selected]


# --------------------------------------------------------------------------
# discovery

def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and module not in names:
            names[module] = name
    return names


def token_grid(n: int, image_size: tuple[int, int]) -> tuple[int, int, int] | None:
    """``(prefix, h, w)`` with ``n = prefix + h*w``, ``prefix`` 0 or 1 and
    ``h / w = H / W`` of ``image_size``; ``None`` if no such grid exists or
    both prefixes fit (ambiguous)."""
    height, width = (int(v) for v in image_size)
    g = math.gcd(height, width) or 1
    ah, aw = height // g, width // g                 # h = k * ah, w = k * aw
    fits = []
    for prefix in (0, 1):
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


def _layout(module: nn.Module, out: Any, known_sizes: set[tuple[int, int]],
            image_size: tuple[int, int] = (0, 0),
            in_layout: tuple[str, tuple[int, int]] | None = None,
            ) -> tuple[str, str | None, tuple[int, int, int] | None]:
    """Layout of one output, the reason it cannot be drawn (or ``None``), and
    the token grid of a ``(B, N, C)`` output (or ``None``). ``in_layout``:
    the module input's layout and size, when known."""
    if not isinstance(out, torch.Tensor):
        return UNKNOWN, f"output is a {type(out).__name__}, not a single tensor", None
    if not out.is_floating_point():
        return UNKNOWN, f"output has dtype {out.dtype}, not a float map", None
    shape = tuple(out.shape)
    if out.dim() == 2:
        return VECTOR, ("vector output (B, F): it has no spatial extent, a CAM "
                        "of it only draws lines (CAManim paper, Fig. 7)"), None
    if out.dim() == 3:
        grid = token_grid(int(shape[1]), image_size)
        if grid is not None and grid[1] * grid[2] > 1:
            return TOKENS, None, grid
        return TOKENS, (f"token sequence (B, N, C) with N = {shape[1]}: no patch grid "
                        f"h x w with the image's aspect ratio fits N or N - 1 (class "
                        "token); pass reshape_transform= to turn it into (B, C, h, w)"), None
    if out.dim() != 4:
        return UNKNOWN, f"{out.dim()}-D output {shape}: layout cannot be told", None
    _, a, b, c = shape
    if (b, c) == (1, 1) or (a, b) == (1, 1):
        return VECTOR, ("1x1 spatial output: no spatial extent, a CAM of it "
                        "is constant (CAManim paper, Fig. 7)"), None
    if isinstance(module, _NCHW_TYPES):
        layout = NCHW
    else:
        nchw = (b, c) in known_sizes
        nhwc = (a, b) in known_sizes
        if nchw and not nhwc:
            layout = NCHW
        elif nhwc and not nchw:
            layout = NHWC
        elif nchw and nhwc:
            # (B, h, h, h)-like shapes: only trust NCHW when the module keeps
            # its input's layout (element-wise or channel-mixing conv).
            layout = (
                NCHW if isinstance(module, (nn.ReLU, nn.SiLU, nn.GELU, nn.Sequential)) else UNKNOWN
            )
        elif in_layout is not None and _downsized(in_layout[1], (b, c) if in_layout[0] == NCHW
                                                 else (a, b)):
            # a new, smaller size with the input's aspect ratio (Swin's patch
            # merging, NHWC in and out): keep the input's layout
            layout = in_layout[0]
        else:
            layout = UNKNOWN
    if layout == UNKNOWN:
        return UNKNOWN, (f"4-D output {shape} matches no spatial size seen in "
                         "this forward (window or patch tensor?): layout cannot be told"), None
    return layout, None, None


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
    a, b = (int(x.shape[2]), int(x.shape[3])), (int(out.shape[2]), int(out.shape[3]))
    return (a, b) if a != b else None


def discover(model: nn.Module, example_input: torch.Tensor) -> list[LayerInfo]:
    """Record every module call of one forward of ``example_input``.

    Runs under ``torch.no_grad()`` in eval mode; every submodule's train/eval
    mode is restored and every hook removed, also when the forward raises.
    """
    names = _module_names(model)
    children = {m: set(c for c in m.children()) for m in names}
    parent_of: dict[nn.Module, nn.Module] = {}
    for m in names:
        for c in children[m]:
            parent_of.setdefault(c, m)

    calls: list[dict[str, Any]] = []
    counts: dict[nn.Module, int] = {}
    last_child_call: dict[nn.Module, int] = {}  # parent -> index into calls
    image_size = (int(example_input.shape[-2]), int(example_input.shape[-1]))
    known_sizes = {image_size}
    same_stage: list[tuple[tuple[int, int], tuple[int, int]]] = []

    def hook(module: nn.Module, inp: Any, out: Any) -> None:
        counts[module] = counts.get(module, 0) + 1
        k = counts[module]
        mname = names[module]
        in_layout = _input_layout(inp, known_sizes)
        layout, reason, grid = _layout(module, out, known_sizes, image_size,
                                       in_layout)
        if layout == NCHW and isinstance(module, _NCHW_TYPES):
            known_sizes.add((int(out.shape[2]), int(out.shape[3])))
        elif layout in SPATIAL and in_layout is not None:
            h = 2 if layout == NCHW else 1
            size = (int(out.shape[h]), int(out.shape[h + 1]))
            if size not in known_sizes and _downsized(in_layout[1], size):
                known_sizes.add(size)
        pair = _stride_one_resize(module, inp, out)
        if pair is not None:
            same_stage.append(pair)
        rec = {
            "module": module, "module_name": mname, "call": k, "out": out,
            "version": out._version if isinstance(out, torch.Tensor) else None,
            "layout": layout, "skipped": reason, "merged_into": None,
            "aliases": [], "grid": grid,
        }
        idx = len(calls)
        # A container whose output is the very tensor of its last child call
        # is one layer: the container's record absorbs the child's.
        if children[module]:
            j = last_child_call.get(module)
            if j is not None and isinstance(out, torch.Tensor) and calls[j]["out"] is out:
                child = calls[j]
                child["merged_into"] = idx
                rec["aliases"] = child["aliases"] + [_call_name(child)]
        calls.append(rec)
        p = parent_of.get(module)
        if p is not None:
            last_child_call[p] = idx

    handles = []
    try:
        for m in names:
            handles.append(m.register_forward_hook(hook))
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

    # A call counted more than once gets '#k' on every call after the first.
    infos: list[LayerInfo] = []
    for i, rec in enumerate(calls):
        out = rec["out"]
        overwritten = isinstance(out, torch.Tensor) and out._version != rec["version"]
        module = rec["module"]
        mname = rec["module_name"]
        infos.append(LayerInfo(
            name=_call_name(rec),
            module_name=mname,
            call=rec["call"],
            order=i,
            type=type(module).__name__,
            output_shape=tuple(out.shape) if isinstance(out, torch.Tensor) else (),
            params=sum(p.numel() for p in module.parameters(recurse=False)),
            params_total=sum(p.numel() for p in module.parameters()),
            depth=mname.count("."),
            layout=rec["layout"],
            skipped=rec["skipped"],
            aliases=tuple(rec["aliases"]),
            overwritten=bool(overwritten),
            merged=rec["merged_into"] is not None,
            token_grid=rec["grid"],
        ))
    _number_stages(infos, same_stage)
    return infos


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

def _drawable(info: LayerInfo, reshape_transform: Transform | None) -> str | None:
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


def _token_notice(chosen: list[LayerInfo], reshape_transform: Transform | None) -> None:
    """One warning for all token layers drawn on a grid told from their length."""
    if reshape_transform is not None:
        return
    grids = sorted({i.token_grid for i in chosen if i.layout == TOKENS and i.token_grid})
    if not grids:
        return
    what = "; ".join(f"(B, {p + h * w}, C) drawn as " + ("a class token (dropped) + " if p else "")
                     + f"a {h}x{w} patch grid" for p, h, w in grids)
    warnings.warn(f"camanim: token outputs {what}; pass reshape_transform= to read "
                  "them otherwise.", UserWarning, stacklevel=3)


def select(calls: list[LayerInfo], layers: Selector, model: nn.Module | None = None,
           reshape_transform: Transform | None = None,
           max_layers: int | None = None) -> LayerTable:
    """Pick the drawable calls named by ``layers`` (see module docstring)."""
    merged = {i.name for i in calls if i.merged}
    modules = dict(model.named_modules()) if model is not None else {}
    skipped: list[LayerInfo] = []

    def keep(cands: list[LayerInfo]) -> list[LayerInfo]:
        out = []
        for info in cands:
            reason = _drawable(info, reshape_transform)
            if reason is None:
                out.append(info)
            else:
                skipped.append(info)
        return out

    if isinstance(layers, str) and layers in ("conv", "all", "blocks"):
        if layers == "conv":
            chosen = keep([i for i in calls if i.type in ("Conv2d",) or
                           isinstance(modules.get(i.module_name), nn.Conv2d)])
        else:
            chosen = keep([i for i in calls if i.name not in merged])
            if layers == "blocks":
                chosen = block_layers(chosen, calls)
        if not chosen:
            kinds = sorted({i.layout for i in calls})
            raise CAManimError(
                f"layers={layers!r} matched no drawable layer in this model "
                f"(layouts seen: {', '.join(kinds)}). A model with no spatial "
                "layers cannot be explained by a CAM; for token models pass "
                "reshape_transform=, or name layers explicitly "
                "(see camanim.list_layers).")
    elif layers is None:
        raise CAManimError("layers=None selects nothing here: use 'conv', 'all', 'blocks', a "
                           "list of layer names, or a callable (name, module) -> bool")
    elif isinstance(layers, str):
        raise CAManimError(
            f"unknown layer selector {layers!r}: use 'conv', 'all', 'blocks', a list "
            "of layer names, or a callable (name, module) -> bool")
    elif callable(layers):
        chosen = keep([i for i in calls if layers(i.name, modules[i.module_name])])
        if not chosen:
            raise CAManimError("the layer callable selected no drawable layer; "
                               "see camanim.list_layers(model, x) for what exists")
    else:
        wanted = list(layers)
        if not wanted:
            raise CAManimError("an empty list of layers selects nothing; name at "
                               "least one layer or use 'conv' / 'all' / 'blocks'")
        by_name = {i.name: i for i in calls}
        chosen = []
        for w in wanted:
            if not isinstance(w, str):
                raise CAManimError(f"layer names must be strings, got {w!r}")
            found = [by_name[w]] if w in by_name else []
            if not found:
                close = difflib.get_close_matches(w, list(by_name), n=5)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise CAManimError(
                    f"no layer named {w!r} in this model{hint} "
                    f"(camanim.list_layers lists all {len(by_name)} layer calls)")
            for info in found:
                reason = _drawable(info, reshape_transform)
                if reason is not None:
                    raise CAManimError(f"layer {info.name!r} cannot be drawn: {reason}")
                if info not in chosen:
                    chosen.append(info)
        chosen.sort(key=lambda i: i.order)

    if max_layers is not None:
        if int(max_layers) < 1:
            raise CAManimError(f"max_layers must be >= 1, got {max_layers}")
        if len(chosen) > max_layers:
            idx = np.unique(np.round(np.linspace(0, len(chosen) - 1, int(max_layers))).astype(int))
            chosen = [chosen[i] for i in idx]
    _token_notice(chosen, reshape_transform)
    return LayerTable(calls=calls, selected=chosen, skipped=skipped)


def list_layers(model: nn.Module, example_input: torch.Tensor, layers: Selector = "all",
                reshape_transform: Transform | None = None,
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
