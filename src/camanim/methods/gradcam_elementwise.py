"""Grad-CAM element-wise (pytorch-grad-cam): ReLU(gradient x activation), summed."""

import torch

from .base import LayerContext


def gradcam_elementwise(acts: torch.Tensor, grads: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    return (grads * acts).clamp_min(0).sum(1)
