"""Probe images of `CAManimCallback`: loading and checking them once, at
construction (tensors, lists, or ``(dataset, indices)`` with labels and
object masks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.maps import image_size
from ..errors import CAManimError
from ..runs.history import safe_name

__all__ = ["Probes", "load_probes", "probe_batch"]


@dataclass
class Probes:
    images: torch.Tensor                 # (B, C, H, W) float, CPU
    labels: list[int] | None             # dataset labels, when every item had one
    masks: torch.Tensor | None           # (B, H, W) float32 in [0, 1], CPU
    has_mask: list[bool]
    names: list[str]
    num_classes: int | None              # len(dataset.classes) when known


def _as_image(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise CAManimError(
            f"{what} is a {type(x).__name__}, not a tensor: probes must be (C, H, W) tensors "
            "as fed to the model (add a ToTensor/normalize transform to the dataset)")
    if x.dim() != 3:
        raise CAManimError(f"{what} has shape {tuple(x.shape)}; each probe image must be "
                           "(C, H, W)")
    if not x.is_floating_point():
        raise CAManimError(f"{what} has dtype {x.dtype}; probes must be float images "
                           "normalized as the model expects")
    return x.detach().cpu()


def _as_label(y: Any) -> int | None:
    if isinstance(y, bool):
        return None
    if isinstance(y, (int, np.integer)):
        return int(y)
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(y)
    if isinstance(y, torch.Tensor):
        if y.numel() == 1 and not y.is_floating_point():
            return int(y.reshape(()))
        if y.dim() == 1 and y.numel() > 1:  # one-hot
            return int(y.argmax())
    return None


def _as_mask(m: Any, hw: tuple[int, int], what: str) -> torch.Tensor:
    if isinstance(m, np.ndarray):
        m = torch.from_numpy(np.ascontiguousarray(m))
    if not isinstance(m, torch.Tensor):
        raise CAManimError(f"{what} is a {type(m).__name__}; masks must be (H, W) tensors")
    m = m.detach().cpu()
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise CAManimError(f"{what} has shape {tuple(m.shape)}; a mask must be (H, W) "
                           "(or (1, H, W))")
    if tuple(m.shape) != tuple(hw):
        raise CAManimError(f"{what} is {tuple(m.shape)} but the probe images are {tuple(hw)}: "
                           "resize the mask to the image size (nearest neighbour)")
    if m.dtype == torch.bool:
        return m.float()
    if not m.is_floating_point():
        return (m > 0).float()
    m = m.float()
    if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise CAManimError(f"{what} has values outside [0, 1]; pass a bool mask or floats "
                           "in [0, 1]")
    return m


def _split_item(item: Any, i: int) -> tuple[Any, Any, Any]:
    """(image, label, mask) of a dataset item."""
    if isinstance(item, dict):
        img = next((item[k] for k in ("image", "img", "input", "x") if k in item), None)
        if img is None:
            raise CAManimError(f"dataset item {i} is a dict without an 'image' key "
                               f"(keys: {sorted(item)})")
        lab = next((item[k] for k in ("label", "target", "y") if k in item), None)
        msk = next((item[k] for k in ("mask", "seg", "segmentation") if k in item), None)
        return img, lab, msk
    if isinstance(item, (tuple, list)):
        if not 1 <= len(item) <= 3:
            raise CAManimError(f"dataset item {i} has {len(item)} parts; items must be "
                               "image, (image, label) or (image, label, mask)")
        image, label, mask = (*item, None, None)[:3]
        return image, label, mask
    return item, None, None


def _is_dataset_probes(p: Any) -> bool:
    return (isinstance(p, tuple) and len(p) == 2
            and not isinstance(p[0], (torch.Tensor, np.ndarray))
            and hasattr(p[0], "__getitem__") and hasattr(p[0], "__len__")
            and isinstance(p[1], (Sequence, range, np.ndarray, torch.Tensor))
            and not isinstance(p[1], (str, bytes)))


def load_probes(probes: Any, masks: Any, probe_names: Sequence[str] | None) -> Probes:
    labels: list[int | None] = []
    item_masks: list[Any] = []
    num_classes = None
    default_names: list[str]
    if _is_dataset_probes(probes):
        dataset, idx = probes
        idx = [int(i) for i in (idx.tolist() if hasattr(idx, "tolist") else idx)]
        if not idx:
            raise CAManimError("the probe index list is empty: pass (dataset, [i, j, ...])")
        n = len(dataset)
        bad = [i for i in idx if not -n <= i < n]
        if bad:
            raise CAManimError(f"probe index {bad[0]} is out of range for a dataset of {n} items")
        imgs = []
        for i in idx:
            img, lab, msk = _split_item(dataset[i], i)
            imgs.append(_as_image(img, f"dataset item {i}'s image"))
            labels.append(_as_label(lab))
            item_masks.append(msk)
        classes = getattr(dataset, "classes", None)
        num_classes = len(classes) if isinstance(classes, Sequence) and classes else None
        default_names = [f"sample{i}" for i in idx]
    elif isinstance(probes, torch.Tensor):
        if probes.dim() == 3:
            raise CAManimError(f"probes has shape {tuple(probes.shape)}: pass a batch "
                               "(B, C, H, W), e.g. probes.unsqueeze(0) for one image")
        if probes.dim() != 4 or probes.shape[0] == 0:
            raise CAManimError(f"probes must be a (B, C, H, W) batch with B >= 1, got shape "
                               f"{tuple(probes.shape)}")
        imgs = [_as_image(p, f"probe {k}") for k, p in enumerate(probes)]
        default_names = [f"probe{k}" for k in range(len(imgs))]
    elif isinstance(probes, (list, tuple)) and probes:
        imgs = [_as_image(p, f"probe {k}") for k, p in enumerate(probes)]
        default_names = [f"probe{k}" for k in range(len(imgs))]
    else:
        raise CAManimError(
            f"probes must be a (B, C, H, W) tensor, a list of (C, H, W) tensors or "
            f"(dataset, [indices]); got {type(probes).__name__}"
            + (" (empty)" if isinstance(probes, (list, tuple)) else ""))
    shapes = {tuple(x.shape) for x in imgs}
    if len(shapes) > 1:
        raise CAManimError(f"probe images have different shapes {sorted(shapes)}: resize "
                           "them to one size")
    images = torch.stack(imgs).clone()
    if not torch.isfinite(images).all():
        raise CAManimError("probe images contain NaN or infinite values")
    B, hw = images.shape[0], image_size(images)

    has_mask, mask_t = _load_masks(masks, item_masks, B, hw)

    if probe_names is not None:
        names = [str(n) for n in probe_names]
        if len(names) != B:
            raise CAManimError(f"got {len(names)} probe_names for {B} probe images")
    else:
        names = default_names
    safe = [safe_name(n) for n in names]
    if len(set(safe)) != len(safe):
        raise CAManimError(f"probe names must be unique (after making them file-safe): {safe}")
    known = [x for x in labels if x is not None]
    lab = known if labels and len(known) == len(labels) else None
    return Probes(images=images, labels=lab, masks=mask_t, has_mask=has_mask, names=safe,
                   num_classes=num_classes)


def probe_batch(images: torch.Tensor, model: torch.nn.Module) -> tuple[torch.Tensor, torch.device]:
    """The ``(B, C, H, W)`` probe images on the model's device and in its
    dtype (a normal tensor even inside ``inference_mode``), and the device."""
    from ..core.inputs import model_device_dtype

    dev, dtype = model_device_dtype(model)
    with torch.inference_mode(False):
        x = images.to(device=dev, dtype=dtype)
    return x, dev


def _load_masks(masks: Any, item_masks: list[Any], b: int, hw: tuple[int, int]
                ) -> tuple[list[bool], torch.Tensor | None]:
    """``(which probes have a mask, (B, H, W) masks or None)``: the
    ``masks=`` argument wins over the dataset items' masks."""
    mask_list: list[Any]
    if masks is not None:
        if isinstance(masks, (torch.Tensor, np.ndarray)):
            mt = torch.as_tensor(masks)
            if mt.dim() == 4 and mt.shape[1] == 1:
                mt = mt[:, 0]
            if mt.dim() != 3:
                raise CAManimError(f"masks must be (B, H, W), got shape {tuple(mt.shape)}")
            mask_list = list(mt)
        elif isinstance(masks, (list, tuple)):
            mask_list = list(masks)
        else:
            raise CAManimError(f"masks must be a (B, H, W) tensor or a list of (H, W) "
                               f"tensors / None, got {type(masks).__name__}")
        if len(mask_list) != b:
            raise CAManimError(f"got {len(mask_list)} masks for {b} probe images; pass one "
                               "per probe (None for a probe without one)")
    else:
        mask_list = item_masks if item_masks else [None] * b
    has_mask = [m is not None for m in mask_list]
    if not any(has_mask):
        return has_mask, None
    return has_mask, torch.stack([_as_mask(m, hw, f"mask {k}") if m is not None
                                  else torch.zeros(hw) for k, m in enumerate(mask_list)])
