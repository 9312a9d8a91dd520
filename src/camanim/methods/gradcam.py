"""Grad-CAM (Selvaraju et al. 2017): channel weights = spatial mean gradient."""

import torch

from .base import LayerContext


def gradcam(acts: torch.Tensor, grads: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    weights = grads.mean(dim=(2, 3), keepdim=True)          # (B, C, 1, 1)
    return (weights * acts).sum(1)
