r"""XGrad-CAM: gradients weighted by the activations normalized per channel.

Fu et al., "Axiom-based Grad-CAM: Towards Accurate Visualization and
Explanation of CNNs", BMVC 2020.

.. math::

    L^c = \sum_k \alpha_k^c A^k, \qquad
    \alpha_k^c = \sum_{i,j} \frac{A^k_{ij}}{\sum_{i,j} A^k_{ij} + \epsilon}
                 \frac{\partial y^c}{\partial A^k_{ij}}

with pytorch-grad-cam's ``epsilon = 1e-7``.
"""

from __future__ import annotations

import torch

from .base import LayerContext, need_gradients


def xgradcam(acts: torch.Tensor, grads: torch.Tensor | None, _ctx: LayerContext) -> torch.Tensor:
    """XGrad-CAM of one layer call: ``acts``, ``grads`` ``(B, C, h, w)`` ->
    ``(B, h, w)`` (before the ReLU)."""
    g = need_gradients(grads, "xgradcam")
    sum_acts = acts.sum(dim=(2, 3), keepdim=True)                          # (B, C, 1, 1)
    weights = (g * acts / (sum_acts + 1e-7)).sum(dim=(2, 3), keepdim=True)
    return (weights * acts).sum(1)
