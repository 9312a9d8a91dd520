"""Capture: activations and gradients of many layer calls from one pass.

One `Hooks` object owns every hook. A forward with hooks on the selected
calls records their outputs; one ``torch.autograd.grad`` of the summed target
scores w.r.t. all recorded outputs gives every layer's gradient at once.

Why not pytorch-grad-cam's ``ActivationsAndGradients``: it keeps
``output.cpu().detach()`` (on CPU the very tensor a later in-place ReLU
overwrites) and pairs gradients with layers by arrival order (wrong when
branches interleave or a module runs twice). Here outputs are keyed by
module *and call*; an output that a later in-place op would overwrite is
replaced, for the rest of the network, by a clone; and gradients come from
``autograd.grad`` w.r.t. the recorded tensors, so ``param.grad`` is never
touched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CAManimError
from .guard import eval_mode
from .inputs import Target, resolve_targets, score_outputs
from .layers import LayerInfo
from .layout import NHWC, TOKENS


@dataclass
class Captured:
    """What one pass recorded.

    Attributes:
        logits: ``(B, K)`` model output (detached).
        activations: per layer ``(B, C, h, w)`` NCHW, detached.
        gradients: per layer ``(B, C, h, w)`` d(score)/d(activation), or
            ``None`` when gradients were not asked for.
        targets: one score callable per image.
        target_idx: ``(B,)`` class indices, or ``None`` for custom callables.
    """

    logits: torch.Tensor
    activations: list[torch.Tensor]
    gradients: list[torch.Tensor] | None
    targets: list[Target]
    target_idx: torch.Tensor | None


class Hooks:
    """Forward hooks on selected module calls; removed on exit, always.

    Args:
        model: the network.
        layers: the calls to record (``LayerInfo.module_name`` and ``.call``).
        clone: record the original output but hand a clone to the rest of the
            network, for these layer names (their output is overwritten in
            place later, e.g. by ``ReLU(inplace=True)``).
        replace: optional ``{layer name: fn(output) -> new output}`` applied
            after recording (used by ablation to swap one call's output).
    """

    def __init__(self, model: nn.Module, layers: Sequence[LayerInfo],
                 clone: set[str] | None = None,
                 replace: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                 record: bool = True) -> None:
        modules = dict(model.named_modules())
        self._want: dict[nn.Module, dict[int, str]] = {}
        for info in layers:
            module = modules.get(info.module_name)
            if module is None:
                raise CAManimError(f"layer {info.name!r} is not a submodule of this model")
            self._want.setdefault(module, {})[info.call] = info.name
        self.clone = clone or set()
        self.replace = replace or {}
        self.record = record
        self.outputs: dict[str, torch.Tensor] = {}
        self.versions: dict[str, int] = {}
        self._counts: dict[nn.Module, int] = {}
        self._handles: list[Any] = []

    def _hook(self, module: nn.Module, _inp: Any, out: Any) -> Any:
        k = self._counts.get(module, 0) + 1
        self._counts[module] = k
        name = self._want[module].get(k)
        if name is None:
            return None
        if not isinstance(out, torch.Tensor):
            raise CAManimError(f"layer {name!r} returned a {type(out).__name__}, not a tensor")
        if self.record:
            self.outputs[name] = out
            self.versions[name] = out._version
        if name in self.replace:
            return self.replace[name](out)
        if name in self.clone:
            return out.clone()
        return None

    def __enter__(self) -> Hooks:
        self._counts.clear()
        self.outputs.clear()
        for module in self._want:
            self._handles.append(module.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._counts.clear()

    def overwritten(self) -> list[str]:
        """Recorded outputs changed in place after recording."""
        return [n for n, t in self.outputs.items() if t._version != self.versions[n]]


def to_nchw(t: torch.Tensor, info: LayerInfo,
            reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Turn a recorded output (or its gradient) into ``(B, C, h, w)``.

    Token outputs ``(B, N, C)``: ``reshape_transform`` when given, else the
    grid discovery told (``info.token_grid``; a class token is dropped)."""
    if info.layout == NHWC:
        return t.permute(0, 3, 1, 2)
    if info.layout == TOKENS:
        if reshape_transform is None:
            if info.token_grid is None:
                raise CAManimError(f"layer {info.name!r} outputs tokens {tuple(t.shape)} "
                                   "whose grid cannot be told: pass reshape_transform= "
                                   "(a function (B, N, C) -> (B, C, h, w))")
            prefix, h, w = info.token_grid
            return t[:, prefix:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)
        t = reshape_transform(t)
        if t.dim() != 4:
            raise CAManimError(f"reshape_transform turned layer {info.name!r} into shape "
                               f"{tuple(t.shape)}; it must return (B, C, h, w)")
    return t


def forward_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if not isinstance(out, torch.Tensor):
        raise CAManimError(f"the model returned a {type(out).__name__}; camanim needs a "
                           "tensor of class scores (wrap the model to return logits)")
    return out


def capture(model: nn.Module, images: torch.Tensor, layers: Sequence[LayerInfo],
            targets: Any = None, *, gradients: bool = True,
            reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Captured:
    """One forward (and, if ``gradients``, one backward) for all ``layers``.

    Args:
        model: the network; left exactly as it was (modes, ``requires_grad``,
            ``.grad``, hooks).
        images: ``(B, C, H, W)`` checked batch on the model's device/dtype.
        layers: selected `LayerInfo` calls (from `camanim.list_layers`).
        targets: see `camanim.core.inputs.resolve_targets`.
        gradients: also compute d(sum of target scores)/d(each output).

    Returns:
        `Captured` with NCHW activations and gradients per layer.
    """
    clone = {i.name for i in layers if i.overwritten}
    for attempt in range(2):
        with eval_mode(model), torch.inference_mode(False), \
                torch.set_grad_enabled(gradients), Hooks(model, layers, clone=clone) as hooks:
            x = images.detach().requires_grad_(gradients)
            logits = forward_logits(model, x)
            tgt, idx = resolve_targets(targets, images.shape[0], logits.detach())
            missing = [i.name for i in layers if i.name not in hooks.outputs]
            if missing:
                raise CAManimError(f"layer(s) {missing[:5]} did not run for this input; "
                                   "discover layers on an input of the same size")
            outs = [hooks.outputs[i.name] for i in layers]
            changed = hooks.overwritten()
            if changed and attempt == 0:
                # discovery ran on another input and missed an in-place op: redo
                # with a clone for those layers (rare; costs one more pass)
                clone |= set(changed)
                continue
            grads = None
            if gradients:
                score = score_outputs(tgt, logits).sum()
                needs = [o.requires_grad for o in outs]
                got = torch.autograd.grad(
                    score, [o for o, n in zip(outs, needs, strict=False) if n], allow_unused=True
                )
                it = iter(got)
                grads = []
                for o, n in zip(outs, needs, strict=False):
                    g = next(it) if n else None
                    grads.append(torch.zeros_like(o) if g is None else g.detach())
            acts = [
                to_nchw(o.detach(), i, reshape_transform)
                for o, i in zip(outs, layers, strict=False)
            ]
            if grads is not None:
                grads = [
                    to_nchw(g, i, reshape_transform) for g, i in zip(grads, layers, strict=False)
                ]
            return Captured(logits=logits.detach(), activations=acts, gradients=grads,
                            targets=tgt, target_idx=idx)
    raise AssertionError("unreachable")  # pragma: no cover
