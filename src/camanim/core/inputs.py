"""Checks of user input: images and targets, with errors that name the fix."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CAManimError

Target = Callable[[torch.Tensor], torch.Tensor]

# What a target class's score is: its softmax probability or its raw logit
# (ROAD and SISE score masked images with one of these).
SCORES = ("softmax", "logit")


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter or buffer."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def expected_channels(model: nn.Module) -> int | None:
    """``in_channels`` of the model's first ``nn.Conv2d`` (``None`` if it has none)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    return None


def check_images(images: Any, model: nn.Module) -> torch.Tensor:
    """Validate a ``(B, C, H, W)`` float batch; return it on the model's device
    and dtype (a new tensor usable with autograd, also if ``images`` was made
    under ``torch.inference_mode``)."""
    if not isinstance(images, torch.Tensor):
        raise CAManimError(
            f"images must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}; "
            "convert with torch.as_tensor(...) (and stack a list of images with torch.stack)")
    if images.dim() == 3:
        raise CAManimError(
            f"images has shape {tuple(images.shape)}: a single image needs a batch "
            "dimension, pass images.unsqueeze(0) for shape (1, C, H, W)")
    if images.dim() != 4:
        raise CAManimError(
            f"images must have 4 dimensions (B, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise CAManimError("images is an empty batch (B = 0): pass at least one image")
    if not images.is_floating_point():
        raise CAManimError(
            f"images has dtype {images.dtype}; pass float images normalized as the model "
            "expects, e.g. images.float() / 255 followed by the model's normalization")
    want = expected_channels(model)
    if want is not None and images.shape[1] != want:
        hint = (" (a grayscale image: repeat it, images.expand(-1, 3, -1, -1))"
                if images.shape[1] == 1 and want == 3 else "")
        raise CAManimError(
            f"images has {images.shape[1]} channels but the model's first convolution "
            f"expects {want}{hint}; images must be (B, C, H, W) with C = {want}")
    if not torch.isfinite(images).all():
        raise CAManimError("images contains NaN or infinite values")
    device, dtype = model_device_dtype(model)
    with torch.inference_mode(False):
        return images.detach().to(device=device, dtype=dtype).clone()


def logit_target(category: int) -> Target:
    """Score = logit of ``category`` (pytorch-grad-cam's ClassifierOutputTarget)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    target: Target = ClassifierOutputTarget(int(category))
    return target


def resolve_targets(
    targets: Any, batch: int, logits: torch.Tensor
) -> tuple[list[Target], torch.Tensor | None]:
    """Turn ``targets`` into one score callable per image.

    Args:
        targets: ``None`` (predicted class), an int for all images, a sequence
            or tensor of B ints, or B callables ``(output_row) -> score``.
        batch: B.
        logits: ``(B, K)`` model output of the clean images.

    Returns:
        (callables, class indices ``(B,)`` or ``None`` for callables).
    """
    if logits.dim() != 2:
        if targets is None or _all_int(targets):
            raise CAManimError(
                f"the model output has shape {tuple(logits.shape)}, not (B, classes): "
                "class-index targets need a classifier; pass target callables instead")
    n_classes = logits.shape[-1]
    if isinstance(targets, np.ndarray):
        if not np.issubdtype(targets.dtype, np.integer):
            raise CAManimError(
                f"targets must be integer class indices, got a {targets.dtype} array"
            )
        targets = torch.as_tensor(targets)
    if isinstance(targets, np.integer):
        targets = int(targets)
    if targets is None:
        idx = logits.argmax(-1).detach().cpu()
    elif isinstance(targets, torch.Tensor) and not targets.is_floating_point():
        idx = targets.detach().cpu().reshape(-1)
        if idx.numel() == 1 and batch > 1:
            idx = idx.expand(batch).clone()
    elif isinstance(targets, int):
        idx = torch.full((batch,), int(targets))
    elif isinstance(targets, Sequence) and len(targets) > 0 and _all_int(targets):
        idx = torch.tensor([int(t) for t in targets])
    elif isinstance(targets, Sequence) and len(targets) > 0 and all(callable(t) for t in targets):
        if len(targets) != batch:
            raise CAManimError(f"got {len(targets)} target callables for {batch} images; "
                               "pass one per image")
        cls = [getattr(t, "category", None) for t in targets]
        ints = [int(c) for c in cls if isinstance(c, (int, np.integer))]
        ok = len(ints) == len(cls) and all(0 <= c < n_classes for c in ints)
        return list(targets), torch.tensor(ints) if ok else None
    else:
        raise CAManimError(
            f"targets must be None, an int, a sequence of {batch} ints, or {batch} callables; "
            f"got {type(targets).__name__}")
    if idx.numel() != batch:
        raise CAManimError(f"got {idx.numel()} targets for {batch} images; pass one per image")
    bad = [int(t) for t in idx if not 0 <= int(t) < n_classes]
    if bad:
        raise CAManimError(f"target class {bad[0]} is out of range: the model has "
                           f"{n_classes} classes (0..{n_classes - 1})")
    idx = idx.long()
    return [logit_target(int(t)) for t in idx], idx


def _all_int(xs: Any) -> bool:
    try:
        return all(
            isinstance(x, (int, np.integer))
            or (isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_floating_point())
            for x in xs
        )
    except TypeError:
        return False


def score_outputs(targets: Sequence[Target], outputs: torch.Tensor) -> torch.Tensor:
    """``(B,)`` scores: ``targets[i](outputs[i])``, as pytorch-grad-cam calls them."""
    return torch.stack([t(o).reshape(()) for t, o in zip(targets, outputs, strict=False)])
