"""LayerCAM (Jiang et al. 2021): positive gradients as pixel-wise weights."""

import torch

from .base import LayerContext


def layercam(acts: torch.Tensor, grads: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    return (grads.clamp_min(0) * acts).sum(1)
