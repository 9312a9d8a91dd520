r"""Grad-CAM element-wise: the ReLU of gradient x activation, summed over
channels (a pytorch-grad-cam variant of HiResCAM).

Gildenblat et al., pytorch-grad-cam (``GradCAMElementWise``), 2021.

.. math::

    L^c = \sum_k \max\!\left(0, \frac{\partial y^c}{\partial A^k} \odot A^k\right)
"""

from __future__ import annotations

import torch

from .base import LayerContext, need_gradients


def gradcam_elementwise(acts: torch.Tensor, grads: torch.Tensor | None,
                        _ctx: LayerContext) -> torch.Tensor:
    """Grad-CAM element-wise of one layer call: ``acts``, ``grads``
    ``(B, C, h, w)`` -> ``(B, h, w)``."""
    return (need_gradients(grads, "gradcamelementwise") * acts).clamp_min(0).sum(1)
