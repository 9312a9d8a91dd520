"""Random-CAM (pytorch-grad-cam's baseline): channel weights ~ U(-1, 1), drawn
from the engine's seeded generator so a seed repeats the maps exactly."""

import torch

from .base import LayerContext


def randomcam(acts: torch.Tensor, grads: "torch.Tensor | None", ctx: LayerContext) -> torch.Tensor:
    b, c = acts.shape[:2]
    u = torch.rand((b, c), generator=ctx.generator, dtype=torch.float64)
    weights = (2 * u - 1).to(acts)[:, :, None, None]
    return (weights * acts).sum(1)
