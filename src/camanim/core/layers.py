"""Layer discovery: every module *call* of one forward, in execution order.

A dry forward with a hook on every submodule records each call (a module
called k > 1 times in one forward appears as ``name#k``), its output shape
and layout, and which calls share one output tensor. Selectors then pick the
layers a CAM can be drawn for:

* ``"conv"``: every ``nn.Conv2d`` call,
* ``"all"``: every call whose output is a spatial map; a container whose
  output is the very tensor of its last child call is one layer (named after
  the container), not two,
* ``"blocks"``: for each spatial resolution, the last of the shallowest layers
  at that resolution (the SISE rule; ResNet-50: ``relu, layer1..layer4``),
* a list of call names (``"layer1.0.relu"`` is the first call of that
  module, ``"layer1.0.relu#2"`` the second; any call can be named, also one
  that ``"all"`` folds into its container),
* a callable ``(name, module) -> bool``.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..errors import CAManimError

# Output layouts.
NCHW = "nchw"        # spatial map, channels first
NHWC = "nhwc"        # spatial map, channels last (ConvNeXt blocks, Swin)
TOKENS = "tokens"    # (B, N, C) token sequence (ViT): needs reshape_transform
VECTOR = "vector"    # (B, F) or (B, C, 1, 1): no spatial extent
UNKNOWN = "unknown"  # cannot be told (MaxViT windows, tuples, ...)
SPATIAL = (NCHW, NHWC)

Selector = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]

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

    @property
    def spatial_size(self) -> tuple[int, int] | None:
        """``(h, w)`` of the map for spatial layouts, else ``None``."""
        if self.layout == NCHW:
            return tuple(self.output_shape[2:4])  # type: ignore[return-value]
        if self.layout == NHWC:
            return tuple(self.output_shape[1:3])  # type: ignore[return-value]
        return None

    @property
    def channels(self) -> int | None:
        if self.layout == NCHW:
            return int(self.output_shape[1])
        if self.layout == NHWC:
            return int(self.output_shape[3])
        return None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerInfo":
        d = dict(d)
        d["output_shape"] = tuple(d["output_shape"])
        d["aliases"] = tuple(d.get("aliases", ()))
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
# discovery

def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and module not in names:
            names[module] = name
    return names


def _first_tensor_layout_hint(model: nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def _layout(module: nn.Module, out: Any, known_sizes: set[tuple[int, int]]) -> tuple[str, str | None]:
    """Layout of one output and, if it cannot be drawn, the reason."""
    if not isinstance(out, torch.Tensor):
        return UNKNOWN, f"output is a {type(out).__name__}, not a single tensor"
    if not out.is_floating_point():
        return UNKNOWN, f"output has dtype {out.dtype}, not a float map"
    shape = tuple(out.shape)
    if out.dim() == 2:
        return VECTOR, ("vector output (B, F): it has no spatial extent, a CAM "
                        "of it only draws lines (CAManim paper, Fig. 7)")
    if out.dim() == 3:
        return TOKENS, ("token sequence (B, N, C): pass reshape_transform= to "
                        "turn it into (B, C, h, w)")
    if out.dim() != 4:
        return UNKNOWN, f"{out.dim()}-D output {shape}: layout cannot be told"
    _, a, b, c = shape
    if (b, c) == (1, 1) or (a, b) == (1, 1):
        return VECTOR, ("1x1 spatial output: no spatial extent, a CAM of it "
                        "is constant (CAManim paper, Fig. 7)")
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
            layout = NCHW if isinstance(module, (nn.ReLU, nn.SiLU, nn.GELU, nn.Sequential)) else UNKNOWN
        else:
            layout = UNKNOWN
    if layout == UNKNOWN:
        return UNKNOWN, (f"4-D output {shape} matches no spatial size seen in "
                         "this forward (window or patch tensor?): layout cannot be told")
    return layout, None


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
    known_sizes = {tuple(example_input.shape[-2:])}

    def hook(module: nn.Module, _inp: Any, out: Any) -> None:
        counts[module] = counts.get(module, 0) + 1
        k = counts[module]
        mname = names[module]
        layout, reason = _layout(module, out, known_sizes)
        if layout == NCHW and isinstance(module, _NCHW_TYPES):
            known_sizes.add(tuple(out.shape[2:4]))
        rec = {
            "module": module, "module_name": mname, "call": k, "out": out,
            "version": out._version if isinstance(out, torch.Tensor) else None,
            "layout": layout, "skipped": reason, "merged_into": None,
            "aliases": [],
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
    modes = {m: m.training for m in model.modules()}
    try:
        for m in names:
            handles.append(m.register_forward_hook(hook))
        model.eval()
        with torch.inference_mode(False), torch.no_grad():
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
        for m, t in modes.items():
            m.training = t

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
        ))
    return infos


def _call_name(rec: dict[str, Any]) -> str:
    return rec["module_name"] if rec["call"] == 1 else f"{rec['module_name']}#{rec['call']}"


# --------------------------------------------------------------------------
# selection

def _drawable(info: LayerInfo, reshape_transform: Callable | None) -> str | None:
    """Reason why ``info`` cannot be drawn, or ``None``."""
    if info.layout in SPATIAL:
        return None
    if info.layout == TOKENS and reshape_transform is not None:
        return None
    return info.skipped or f"layout {info.layout} cannot be drawn"


def _blocks(cands: list[LayerInfo]) -> list[LayerInfo]:
    """For each spatial resolution, the last of the shallowest layers there."""
    by_size: dict[tuple[int, int], list[LayerInfo]] = {}
    for info in cands:
        size = info.spatial_size
        if size is not None:
            by_size.setdefault(size, []).append(info)
    chosen = []
    for group in by_size.values():
        depth = min(i.depth for i in group)
        chosen.append([i for i in group if i.depth == depth][-1])
    return sorted(chosen, key=lambda i: i.order)


def select(calls: list[LayerInfo], layers: Selector, model: nn.Module | None = None,
           reshape_transform: Callable | None = None,
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
                chosen = _blocks(chosen)
        if not chosen:
            kinds = sorted({i.layout for i in calls})
            raise CAManimError(
                f"layers={layers!r} matched no drawable layer in this model "
                f"(layouts seen: {', '.join(kinds)}). A model with no spatial "
                "layers cannot be explained by a CAM; for token models pass "
                "reshape_transform=, or name layers explicitly "
                "(see camanim.list_layers).")
    elif isinstance(layers, str):
        raise CAManimError(
            f"unknown layer selector {layers!r}: use 'conv', 'all', 'blocks', a list "
            "of layer names, or a callable (name, module) -> bool")
    elif callable(layers):
        chosen = keep([i for i in calls if layers(i.name, modules.get(i.module_name))])
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
    return LayerTable(calls=calls, selected=chosen, skipped=skipped)


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
