r"""Eigen-CAM and Eigen-Grad-CAM: each pixel's channel vector projected on
the first principal component of the layer's (centred) channel vectors.

Muhammad & Yeasin, "Eigen-CAM: Class Activation Map using Principal
Components", IJCNN 2020; Eigen-Grad-CAM is pytorch-grad-cam's variant on
gradient x activation.

.. math::

    M = \operatorname{reshape}(A)^{\top} \in \mathbb{R}^{hw \times C}, \quad
    \bar M = M - \operatorname{mean}_{\text{pixels}}(M), \quad
    L = \bar M v_1

where ``v_1`` is the first right singular vector of ``M̄`` (Eigen-Grad-CAM:
``A`` replaced by ``dy^c/dA ⊙ A``). Shapes: ``(B, C, h, w)`` -> ``(B, h, w)``.
"""

from __future__ import annotations

import torch

from .base import LayerContext, need_gradients


def first_component(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h, w)``: each pixel's C-vector, centred over
    pixels, projected on the first right singular vector (batched SVD).

    The sign of a singular vector is arbitrary; LAPACK builds may differ
    from numpy's in sign, and pytorch-grad-cam does not fix it either."""
    b, c, h, w = x.shape
    m = torch.nan_to_num(x, nan=0.0).reshape(b, c, h * w).transpose(1, 2)   # (B, hw, C)
    m = m - m.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(m, full_matrices=False)                     # (B, k, C)
    out: torch.Tensor = (m @ vh[:, 0, :, None]).reshape(b, h, w)
    return out


def eigencam(acts: torch.Tensor, _grads: torch.Tensor | None,
             _ctx: LayerContext) -> torch.Tensor:
    """Eigen-CAM of one layer call: ``acts`` ``(B, C, h, w)`` -> ``(B, h, w)``."""
    return first_component(acts)


def eigengradcam(acts: torch.Tensor, grads: torch.Tensor | None,
                 _ctx: LayerContext) -> torch.Tensor:
    """Eigen-Grad-CAM: `first_component` of gradient x activation."""
    return first_component(need_gradients(grads, "eigengradcam") * acts)
