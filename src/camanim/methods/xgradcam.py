"""XGrad-CAM (Fu et al. 2020): gradients weighted by normalized activations."""

import torch

from .base import LayerContext


def xgradcam(acts: torch.Tensor, grads: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    sum_acts = acts.sum(dim=(2, 3), keepdim=True)
    weights = (grads * acts / (sum_acts + 1e-7)).sum(dim=(2, 3), keepdim=True)
    return (weights * acts).sum(1)
