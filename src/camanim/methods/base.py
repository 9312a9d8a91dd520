"""What every CAM method sees, and how methods are registered."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.inputs import Target
from ..core.layers import LayerInfo


@dataclass
class LayerContext:
    """Everything beyond (activations, gradients) a method may need.

    Attributes:
        model: the network (in eval mode while methods run).
        images: ``(B, C, H, W)`` input batch on the model's device.
        layer: the layer call being explained.
        targets: one score callable per image.
        batch_size: images per extra forward (Score-CAM, Ablation-CAM).
        generator: seeded generator for random methods (never the global RNG).
        progress: show a progress bar for long per-layer work.
        reshape_transform: user's token -> (B, C, h, w) transform, if any.
        stats: per-layer details a method reports (e.g. ``n_masks``).
    """

    model: nn.Module
    images: torch.Tensor
    layer: LayerInfo
    targets: Sequence[Target]
    batch_size: int = 32
    generator: torch.Generator | None = None
    progress: bool = False
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    stats: dict[str, Any] = field(default_factory=dict)


# fn(activations (B, C, h, w), gradients (B, C, h, w) | None, ctx) -> (B, h, w),
# before the ReLU that the engine applies to every map.
CamFn = Callable[[torch.Tensor, "torch.Tensor | None", LayerContext], torch.Tensor]


def need_gradients(grads: torch.Tensor | None, method: str) -> torch.Tensor:
    """``grads``, which a gradient method cannot do without.

    Raises:
        CAManimError: when the engine ran no backward pass (``grads`` None).
    """
    if grads is None:
        from ..errors import CAManimError

        raise CAManimError(f"{method} needs the gradients of the layer: register it with "
                           "uses_gradients=True")
    return grads


@dataclass(frozen=True)
class Method:
    """A registered CAM method.

    Attributes:
        name: the name users pass (``"gradcam"``).
        fn: per-layer map function (see `CamFn`).
        uses_gradients: needs the backward pass.
        extra_forwards: runs more forwards per layer (progress bar per layer).
        reference: the pytorch-grad-cam class it reproduces, if any.
        runner: for whole-network methods (Integrated Grad-CAM, SISE) a
            function ``(anim, images, layers, targets) -> LayerMaps``
            replacing the one-pass engine (``layers``: the selected
            `LayerInfo` calls).
        options: names of the options ``CAManim(..., **options)`` accepts
            for this method (none for the per-layer CAMs).
        check_options: ``(options dict) -> Any``, raises `CAManimError` on a
            bad value; run when `CAManim` is built.
        default_layers: the selector ``layers=None`` means (``"blocks"``
            for SISE and Ada-SISE, whose rule it is; else ``"conv"``).
    """

    name: str
    fn: CamFn | None
    uses_gradients: bool = True
    extra_forwards: bool = False
    reference: str | None = None
    runner: Callable[..., Any] | None = None
    options: tuple[str, ...] = ()
    check_options: Callable[[dict[str, Any]], Any] | None = None
    default_layers: str = "conv"
