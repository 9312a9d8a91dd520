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
grid, read from the model where it states it, else told from ``N`` (see
`camanim.core.layout`); one warning names what was read or guessed, and
``reshape_transform=`` (``(B, N, C) -> (B, C, h, w)``) overrides it. Outputs
no grid fits, tokens in an unrolled order (timm Hiera) and window tensors
are skipped with their reason (an error when named), never drawn scrambled.
Token layers whose patch tokens get no gradient from the output (the last
block of a class-token ViT) are drawn and flagged ``zero_gradient``.

On timm models ``"blocks"`` is the model's own ``feature_info`` stages
(README: what it picks on ResNet, ConvNeXt, ViT and Swin).
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CAManimError
from .guard import eval_mode
from .layout import (
    NCHW,
    NCHW_TYPES,
    NHWC,
    SPATIAL,
    TOKENS,
    LayoutContext,
    downsized,
    flag_zero_gradients,
    input_layout,
    output_layout,
    prefix_words,
    read_layout,
)

Selector = str | Sequence[str] | Callable[[str, nn.Module], bool]
ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]

# Pooling layers: their output only carries a map to the next resolution, it
# is never "the last layer before a downsampling" (see block_layers).
_POOL_TYPES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
               nn.LPPool2d, nn.FractionalMaxPool2d)
_POOL_NAMES = frozenset(t.__name__ for t in _POOL_TYPES)

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


@dataclass(repr=False)
class LayerTable:
    """All calls of one forward plus the selection made from them.

    ``print(table)`` (and the REPL) shows the selected layers as a text
    table, then the skipped ones with the reason; `to_records` and
    `to_dataframe` export one row per layer call.
    """

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

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per selected, then per skipped layer (`camanim.core.tables`)."""
        from .tables import layer_records

        return layer_records(self)

    def to_dataframe(self) -> Any:
        """`to_records` as a ``pandas.DataFrame`` (pandas is not a dependency)."""
        from .tables import records_dataframe

        return records_dataframe(self.to_records(), "LayerTable.to_dataframe")

    def __str__(self) -> str:
        from .tables import layer_table_text

        return layer_table_text(self)

    __repr__ = __str__



# --------------------------------------------------------------------------
# discovery

def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and module not in names:
            names[module] = name
    return names


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


class _Recorder:
    """The forward hook of discovery: one record per module call."""

    def __init__(self, model: nn.Module, ctx: LayoutContext) -> None:
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
        if layout == NCHW and isinstance(module, NCHW_TYPES):
            known.add(tuple(out.shape[2:4]))
        elif layout in SPATIAL and in_layout is not None:
            size = tuple(out.shape[2:4]) if layout == NCHW else tuple(out.shape[1:3])
            if size not in known and downsized(in_layout[1], size):
                known.add(size)

    def hook(self, module: nn.Module, inp: Any, out: Any) -> None:
        self.counts[module] = k = self.counts.get(module, 0) + 1
        in_layout = input_layout(inp, self.ctx.known_sizes)
        if module is self.ctx.model_layout.unroll:
            self.ctx.unrolled = True  # its own output and every later token output
        layout, reason, grid, source = output_layout(module, out, self.ctx, in_layout)
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
    ctx = LayoutContext(image_size=image_size, batch=int(example_input.shape[0]),  # type: ignore[arg-type]
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
    flag_zero_gradients(model, example_input, infos)
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

def _drawable(info: LayerInfo, reshape_transform: ReshapeTransform | None) -> str | None:
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


def _notice(chosen: list[LayerInfo], reshape_transform: ReshapeTransform | None) -> None:
    """One warning: how token layers were laid out (what was read from the
    model, or guessed from their length) and which layers get no gradient."""
    parts = []
    if reshape_transform is None:
        by_source: dict[str, set[tuple[int, int, int]]] = {}
        for i in chosen:
            if i.layout == TOKENS and i.token_grid:
                by_source.setdefault(i.layout_source or "guessed", set()).add(i.token_grid)
        for source, grids in by_source.items():
            what = "; ".join(f"(B, {p + h * w}, C) drawn as {prefix_words(p, source)}"
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
        info: Any = getattr(module, "feature_info", None)
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

    def __init__(self, reshape_transform: ReshapeTransform | None) -> None:
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
            "(`camanim layers --model NAME --layers all` lists them).")
    return chosen


def _select_names(calls: list[LayerInfo], wanted: list[Any],
                  reshape_transform: ReshapeTransform | None) -> list[LayerInfo]:
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
                f"(`camanim layers --model NAME --layers all` lists all {len(by_name)} "
                "layer calls)")
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
           reshape_transform: ReshapeTransform | None = None,
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
        # without a model (select() called alone) the callable gets module None
        chosen = keep([i for i in calls
                       if layers(i.name, modules.get(i.module_name))])  # type: ignore[arg-type]
        if not chosen:
            raise CAManimError("the layer callable selected no drawable layer; "
                               "`camanim layers --model NAME --layers all` (or "
                               "camanim.list_layers(model, x)) shows what exists")
    else:
        chosen = _select_names(calls, list(layers), reshape_transform)
    chosen = _spaced(chosen, max_layers)
    _notice(chosen, reshape_transform)
    return LayerTable(calls=calls, selected=chosen, skipped=keep.skipped)


def list_layers(model: nn.Module, example_input: torch.Tensor, layers: Selector = "all",
                reshape_transform: ReshapeTransform | None = None,
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
