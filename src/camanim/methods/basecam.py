"""Adapter: any pytorch-grad-cam ``BaseCAM`` subclass (a user's own too) as a
camanim method. Its ``get_cam_image`` is fed the activations and gradients
captured in camanim's single pass, so the subclass's own math runs once per
layer without its own forward, backward or hooks."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .base import CamFn, LayerContext


def adapt_basecam(cls: type) -> CamFn:
    def fn(acts: torch.Tensor, grads: torch.Tensor | None, ctx: LayerContext) -> torch.Tensor:
        module = dict(ctx.model.named_modules())[ctx.layer.module_name]
        cam = cls(ctx.model, [module])
        cam.activations_and_grads.release()          # its hooks are not needed
        wide = torch.float64 if acts.dtype == torch.float64 else torch.float32  # numpy has no bf16
        a = acts.detach().to(wide).cpu().numpy()
        g = grads.detach().to(wide).cpu().numpy() if grads is not None else np.zeros_like(a)
        out = cam.get_cam_image(ctx.images, module, list(ctx.targets), a, g, False)
        return torch.as_tensor(np.asarray(out), dtype=acts.dtype, device=acts.device)

    fn.__name__ = cls.__name__
    return fn


def is_basecam_class(obj: object) -> bool:
    try:
        from pytorch_grad_cam.base_cam import BaseCAM
    except ImportError:  # pragma: no cover - grad-cam is a dependency
        return False
    return isinstance(obj, type) and issubclass(obj, BaseCAM)


__all__ = ["adapt_basecam", "is_basecam_class", "nn"]
