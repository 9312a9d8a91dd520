"""Helpers shared by the whole-network seed methods (SISE, Ada-SISE,
Integrated Grad-CAM): their result type and the clean-image targets."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.capture import forward_logits
from ..core.guard import eval_mode
from ..core.inputs import Target, resolve_targets
from ..core.maps import LayerMaps


class ExplanationMaps(LayerMaps):
    """`LayerMaps` whose last frame is the method's final explanation."""

    @property
    def final(self) -> torch.Tensor:
        """``(B, H, W)``: the last frame at input size, min-max scaled per image
        (SISE / Ada-SISE: the fused map; Integrated Grad-CAM: the deepest
        selected layer)."""
        return self.select([len(self) - 1]).upsample("local")[0]


def clean_targets(model: nn.Module, x: torch.Tensor,
                  targets: Any) -> tuple[list[Target], torch.Tensor | None]:
    """Resolve ``targets`` on one no-grad forward of the clean images ``x``
    ``(B, C, H, W)``: B score callables and ``(B,)`` class indices (or ``None``)."""
    with eval_mode(model), torch.no_grad():
        logits = forward_logits(model, x)
    return resolve_targets(targets, x.shape[0], logits)


__all__ = ["ExplanationMaps", "clean_targets"]
