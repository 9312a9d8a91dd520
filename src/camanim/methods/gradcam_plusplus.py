r"""Grad-CAM++: channel weights from positive gradients with second- and
third-order terms, as pytorch-grad-cam computes them (eq. 19 of the paper
with the exponential of the score folded in).

Chattopadhay et al., "Grad-CAM++: Generalized Gradient-based Visual
Explanations for Deep Convolutional Networks", WACV 2018.

.. math::

    \alpha_{ij}^{kc} = \frac{g_{ij}^2}{2 g_{ij}^2 + \sum_{a,b} A^k_{ab} \, g_{ij}^3
                       + 10^{-6}}, \qquad
    w_k^c = \sum_{i,j} \alpha_{ij}^{kc} \max(0, g_{ij}), \qquad
    L^c = \sum_k w_k^c A^k

with ``g = dy^c / dA^k`` (``alpha = 0`` where ``g = 0``).
"""

from __future__ import annotations

import torch

from .base import LayerContext, need_gradients


def gradcam_plusplus(acts: torch.Tensor, grads: torch.Tensor | None,
                     _ctx: LayerContext) -> torch.Tensor:
    """Grad-CAM++ of one layer call: ``acts``, ``grads`` ``(B, C, h, w)`` ->
    ``(B, h, w)`` (before the ReLU)."""
    g = need_gradients(grads, "gradcam++")
    g2 = g ** 2
    g3 = g2 * g
    sum_acts = acts.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + sum_acts * g3 + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    weights = (g.clamp_min(0) * alpha).sum(dim=(2, 3), keepdim=True)      # (B, C, 1, 1)
    return (weights * acts).sum(1)
