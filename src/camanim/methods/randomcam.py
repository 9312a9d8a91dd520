r"""Random-CAM: a baseline with random channel weights (pytorch-grad-cam's
``RandomCAM``), drawn from the engine's seeded generator so that a seed
repeats the maps exactly.

.. math::

    L = \sum_k u_k A^k, \qquad u_k \sim \mathcal{U}(-1, 1)

One ``u`` per image and channel, drawn in float64 then cast.
"""

from __future__ import annotations

import torch

from .base import LayerContext


def randomcam(acts: torch.Tensor, _grads: torch.Tensor | None,
              ctx: LayerContext) -> torch.Tensor:
    """Random-CAM of one layer call: ``acts`` ``(B, C, h, w)`` -> ``(B, h, w)``
    (before the ReLU), weights from ``ctx.generator``."""
    b, c = acts.shape[:2]
    u = torch.rand((b, c), generator=ctx.generator, dtype=torch.float64)
    weights = (2 * u - 1).to(acts)[:, :, None, None]
    return (weights * acts).sum(1)
