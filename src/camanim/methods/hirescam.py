r"""HiResCAM: the element-wise product of gradient and activation, summed
over channels (no spatial averaging of the gradient).

Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations
of convolutional neural networks", arXiv:2011.08891, 2020.

.. math::

    L^c = \sum_k \frac{\partial y^c}{\partial A^k} \odot A^k

Equals pytorch-grad-cam's ``HiResCAM``.
"""

from __future__ import annotations

import torch

from .base import LayerContext, need_gradients


def hirescam(acts: torch.Tensor, grads: torch.Tensor | None, _ctx: LayerContext) -> torch.Tensor:
    """HiResCAM of one layer call: ``acts``, ``grads`` ``(B, C, h, w)`` ->
    ``(B, h, w)`` (before the ReLU)."""
    return (need_gradients(grads, "hirescam") * acts).sum(1)
