r"""LayerCAM: positive gradients as pixel-wise weights of the activations.

Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for
Localization", IEEE TIP 30, 2021.

.. math::

    L^c = \sum_k \max\!\left(0, \frac{\partial y^c}{\partial A^k}\right) \odot A^k

Equals pytorch-grad-cam's ``LayerCAM``.
"""

from __future__ import annotations

import torch

from .base import LayerContext, need_gradients


def layercam(acts: torch.Tensor, grads: torch.Tensor | None, _ctx: LayerContext) -> torch.Tensor:
    """LayerCAM of one layer call: ``acts``, ``grads`` ``(B, C, h, w)`` ->
    ``(B, h, w)`` (before the ReLU)."""
    return (need_gradients(grads, "layercam").clamp_min(0) * acts).sum(1)
