"""Grad-CAM++ (Chattopadhay et al. 2018), eq. 19 with exp(score) folded in, as
pytorch-grad-cam computes it."""

import torch

from .base import LayerContext


def gradcam_plusplus(acts: torch.Tensor, grads: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    g2 = grads ** 2
    g3 = g2 * grads
    sum_acts = acts.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + sum_acts * g3 + 1e-6)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    weights = (grads.clamp_min(0) * alpha).sum(dim=(2, 3), keepdim=True)
    return (weights * acts).sum(1)
