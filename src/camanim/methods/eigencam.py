"""Eigen-CAM (Muhammad & Yeasin 2020) and Eigen-Grad-CAM: projection on the
first principal component of the (centred) channel vectors at each pixel."""

import torch

from .base import LayerContext


def first_component(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h, w)``: each pixel's C-vector, centred over
    pixels, projected on the first right singular vector (batched SVD).

    The sign of a singular vector is arbitrary; LAPACK builds may differ
    from numpy's in sign, and pytorch-grad-cam does not fix it either."""
    b, c, h, w = x.shape
    m = torch.nan_to_num(x, nan=0.0).reshape(b, c, h * w).transpose(1, 2)   # (B, hw, C)
    m = m - m.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(m, full_matrices=False)                     # (B, k, C)
    return (m @ vh[:, 0, :, None]).reshape(b, h, w)


def eigencam(acts: torch.Tensor, grads: "torch.Tensor | None", ctx: LayerContext) -> torch.Tensor:
    return first_component(acts)


def eigengradcam(acts: torch.Tensor, grads: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    return first_component(grads * acts)
