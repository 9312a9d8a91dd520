"""HiResCAM (Draelos & Carin 2020): element-wise gradient x activation, summed."""

import torch

from .base import LayerContext


def hirescam(acts: torch.Tensor, grads: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    return (grads * acts).sum(1)
