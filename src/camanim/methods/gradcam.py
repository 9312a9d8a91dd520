r"""Grad-CAM: each channel weighted by its spatially averaged gradient.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017.

.. math::

    L^c = \sum_k \alpha_k^c A^k, \qquad
    \alpha_k^c = \frac{1}{hw} \sum_{i,j} \frac{\partial y^c}{\partial A^k_{ij}}

(the engine applies the ReLU). Equals pytorch-grad-cam's ``GradCAM``.
"""

from __future__ import annotations

import torch

from .base import LayerContext, need_gradients


def gradcam(acts: torch.Tensor, grads: torch.Tensor | None, _ctx: LayerContext) -> torch.Tensor:
    """Grad-CAM of one layer call.

    Args:
        acts: ``(B, C, h, w)`` activations ``A``.
        grads: ``(B, C, h, w)`` gradients of the target score.
        _ctx: unused.

    Returns:
        ``(B, h, w)`` map before the ReLU.

    Example:
        >>> gradcam(torch.ones(1, 2, 3, 3), torch.ones(1, 2, 3, 3), None).shape
        torch.Size([1, 3, 3])
    """
    weights = need_gradients(grads, "gradcam").mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    return (weights * acts).sum(1)
