"""Integrated Grad-CAM (Sattarzadeh et al., ICASSP 2021).

Grad-CAM's channel weights integrated along a straight path from a
baseline ``x'`` to the image ``x``: path images
``x_j = a_j * x + (1 - a_j) * x'``, and for every step

    w_k(j) = spatial mean of dS_c(x_j) / dA_k(x_j)      (S_c: class logit)
    M_j    = ReLU(sum_k w_k(j) * (A_k(x_j) - A_k(x')))

and the map is ``sum_j M_j`` (ReLU per step, before the sum).

Path (``path``):
    ``"paper"`` (default, the paper's figure): ``a_j = j / m`` for
    ``j = 1..m``, ``A(x')`` from one forward of the baseline, and the black
    image as baseline.
    ``"authors"``: what the authors' code does, function
    ``integrated_gradcam`` in ``utils.py`` of github.com/smstrzd/IntegratedGradCAM
    (built on TorchRay's Grad-CAM): ``baseline = input * 0``, i.e. zeros in
    the model's *normalized* input space (the tensor the model is fed, not
    a black image); path images ``baseline + (input - baseline) * i / m``
    for ``i = 0..m-1``; ``A(x') = 0`` (the baseline its Grad-CAM step
    subtracts from the activations is a zero tensor); per step the ReLU of the
    GAP-gradient-weighted sum of activations, with the gradient of the class
    logit (TorchRay backpropagates a one-hot vector from the output); the
    steps summed. Reproduced exactly, per layer, before the resize: their
    final ``cv2.resize`` is our ``upsample("none")`` up to the interpolation.
    ``subtract_baseline=True/False`` overrides the ``A(x')`` part of either
    path (``steps=1, subtract_baseline=False`` with ``"paper"`` is Grad-CAM).

Baseline (``baseline``):
    ``None`` (default): the path's own, ``"black"`` for ``"paper"`` and
    ``"zeros"`` for ``"authors"``.
    ``"black"``: a black image in pixel space, mapped into the model's
    normalized input space as ``(0 - mean) / std`` per channel with the
    ``mean`` / ``std`` options (default ImageNet's).
    ``"zeros"``: zeros in the model's input space (the mean colour for an
    ImageNet-normalized model).
    Or a tensor already in the model's input space, broadcastable to
    ``(C, H, W)``, or one per image ``(B, C, H, W)``.

All selected layers come from the same ``m`` passes: the ``B * m`` path
images go through the model in chunks of ``batch_size``, one forward and one
backward per chunk for every layer at once, so the whole network costs about
``m`` Grad-CAMs. Path images are formed in float32 at least and fed to the
model in its dtype; maps accumulate in float32 for a half-precision model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.capture import capture
from ..core.images import IMAGENET_MEAN, IMAGENET_STD
from ..core.inputs import check_images
from ..core.layers import LayerInfo, Selector, list_layers
from ..core.maps import LayerMaps, image_size, wide
from ..errors import CAManimError
from .seed_common import ExplanationMaps, clean_targets

PATHS = ("paper", "authors")
BASELINES = ("black", "zeros")
IG_OPTIONS = ("steps", "baseline", "mean", "std", "path", "subtract_baseline")


@dataclass(frozen=True)
class IGOptions:
    """Validated Integrated Grad-CAM options (see module docstring)."""

    steps: int = 50
    baseline: Any = None
    mean: Any = IMAGENET_MEAN
    std: Any = IMAGENET_STD
    path: str = "paper"
    subtract_baseline: bool | None = None

    @property
    def subtract(self) -> bool:
        return self.path == "paper" if self.subtract_baseline is None else self.subtract_baseline

    @property
    def base(self) -> Any:
        """The baseline in use: ``baseline``, or the path's own when ``None``."""
        if self.baseline is None:
            return "black" if self.path == "paper" else "zeros"
        return self.baseline


def ig_options(options: dict[str, Any]) -> IGOptions:
    """Check ``CAManim(..., **options)`` for Integrated Grad-CAM."""
    valid = set(IG_OPTIONS)
    unknown = sorted(set(options) - valid)
    if unknown:
        raise CAManimError(f"unknown integrated-gradcam option(s) {unknown}; valid options: "
                           f"{', '.join(sorted(valid))}")
    o = IGOptions(**options)
    if isinstance(o.steps, bool) or not isinstance(o.steps, int) or o.steps < 1:
        raise CAManimError(f"steps must be an int >= 1, got {o.steps!r}")
    if o.path not in PATHS:
        raise CAManimError(f"path must be 'paper' (a_j = j/m, j = 1..m, minus A(x')) or "
                           f"'authors' (j = 0..m-1, A(x') = 0), got {o.path!r}")
    if o.subtract_baseline not in (None, True, False):
        raise CAManimError(f"subtract_baseline must be None, True or False, got "
                           f"{o.subtract_baseline!r}")
    if not (o.baseline is None or isinstance(o.baseline, torch.Tensor) or
            (isinstance(o.baseline, str) and o.baseline in BASELINES)):
        raise CAManimError(f"baseline must be None (the path's own), 'black', 'zeros' or a "
                           f"tensor in the model's input space, got {o.baseline!r}")
    return o


def path_alphas(steps: int, path: str = "paper") -> torch.Tensor:
    """``(m,)`` float64 path positions: ``j/m`` for ``j = 1..m`` ("paper") or
    ``j = 0..m-1`` ("authors")."""
    j = torch.arange(1, steps + 1) if path == "paper" else torch.arange(steps)
    return j.double() / steps


def baseline_images(x: torch.Tensor, opts: IGOptions) -> torch.Tensor:
    """The baseline ``x'``: ``(1, C, H, W)`` shared, or ``(B, C, H, W)`` per image."""
    b, c = x.shape[:2]
    if isinstance(opts.base, str) and opts.base == "zeros":
        return torch.zeros((1,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    if isinstance(opts.base, torch.Tensor):
        base = opts.base.detach().to(device=x.device, dtype=x.dtype)
        per_image = base.dim() == 4 and base.shape[0] == b and b > 1
        shape = tuple(x.shape) if per_image else (1,) + tuple(x.shape[1:])
        try:
            return torch.broadcast_to(base, shape).clone()
        except RuntimeError:
            raise CAManimError(f"baseline of shape {tuple(base.shape)} does not fit images of "
                               f"shape {tuple(x.shape)}; pass (C, H, W), (1, C, H, W) or "
                               "(B, C, H, W) in the model's input space") from None
    mean, std = (torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in (opts.mean, opts.std))
    for name, v in (("mean", mean), ("std", std)):
        if v.numel() not in (1, c):
            raise CAManimError(f"{name} has {v.numel()} values but the images have {c} channels: "
                               f"pass {name}= with {c} values (the model's normalization) or "
                               "baseline= a tensor in the model's input space")
    if not bool((std > 0).all()):
        raise CAManimError(f"std must be positive, got {std.tolist()}")
    black = (-mean / std).expand(c).to(device=x.device, dtype=x.dtype)
    return black.view(1, c, 1, 1).expand(1, c, *x.shape[-2:]).clone()


def step_maps(acts: torch.Tensor, grads: torch.Tensor,
              base_acts: torch.Tensor | None) -> torch.Tensor:
    """``M_j = ReLU(sum_k mean_xy(grad_k) * (A_k - A_k(x')))``: ``(n, C, h, w)`` -> ``(n, h, w)``.

    ``base_acts``: ``(n or 1, C, h, w)`` or ``None`` for ``A(x') = 0``.
    Half-precision inputs are computed in float32.
    """
    acts, grads = wide(acts), wide(grads)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    diff = acts if base_acts is None else acts - wide(base_acts)
    return (weights * diff).sum(1).clamp_min(0)


def integrated_gradcam_maps(model: nn.Module, x: torch.Tensor, layers: Sequence[LayerInfo],
                            targets: Any, opts: IGOptions, batch_size: int = 32,
                            reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                            progress: bool = False) -> ExplanationMaps:
    """Integrated Grad-CAM of checked images ``x`` ``(B, C, H, W)`` for every layer.

    Returns:
        `ExplanationMaps` with one raw ``(B, h_l, w_l)`` map per layer
        (``sum_j M_j``); ``extra["steps"]`` = m per layer.
    """
    with torch.inference_mode(False):  # path images need autograd, even in inference mode
        return _ig_maps(model, x, layers, targets, opts, batch_size, reshape_transform, progress)


def _ig_maps(model: nn.Module, x: torch.Tensor, layers: Sequence[LayerInfo], targets: Any,
             opts: IGOptions, batch_size: int, reshape_transform: Any,
             progress: bool) -> ExplanationMaps:
    t0 = time.perf_counter()
    b = x.shape[0]
    callables, idx = clean_targets(model, x, targets)
    base = baseline_images(x, opts)
    per_image = base.shape[0] == b and b > 1
    base_acts = None
    if opts.subtract:
        base_tg = callables if per_image else callables[:1]
        base_acts = capture(model, base, layers, base_tg, gradients=False,
                            reshape_transform=reshape_transform).activations

    alphas = path_alphas(opts.steps, opts.path).to(device=x.device, dtype=wide(x).dtype)
    img = torch.arange(b, device=x.device).repeat_interleave(opts.steps)   # (B*m,)
    alpha = alphas.repeat(b)
    acc: list[torch.Tensor | None] = [None] * len(layers)
    bar = tqdm(total=len(img), desc="Integrated Grad-CAM", unit="image", leave=False,
               disable=not progress)
    for s in range(0, len(img), batch_size):
        ii, a = img[s:s + batch_size], alpha[s:s + batch_size].view(-1, 1, 1, 1)
        ref_img = base[ii] if per_image else base
        xs = (a * wide(x[ii]) + (1 - a) * wide(ref_img)).to(x.dtype)
        cap = capture(model, xs, layers, [callables[i] for i in ii.tolist()],
                      gradients=True, reshape_transform=reshape_transform)
        assert cap.gradients is not None
        with torch.no_grad():
            for k in range(len(layers)):
                ref = None
                if base_acts is not None:
                    ref = base_acts[k][ii] if per_image else base_acts[k]
                m = step_maps(cap.activations[k], cap.gradients[k], ref)
                total = acc[k]
                if total is None:
                    total = acc[k] = torch.zeros((b, *m.shape[1:]), dtype=m.dtype,
                                                 device=m.device)
                total.index_add_(0, ii, m)
        bar.update(len(ii))
    bar.close()
    raw = [r.detach() for r in acc if r is not None]
    bad = [i.name for i, r in zip(layers, raw, strict=False) if not torch.isfinite(r).all()]
    if bad:
        raise CAManimError(f"non-finite values in the integrated-gradcam map of layer(s) "
                           f"{bad[:5]}; try float32/float64 instead of half precision")
    spent = (time.perf_counter() - t0) / max(len(layers), 1)
    return ExplanationMaps(names=[i.name for i in layers], raw=raw,
                           input_size=image_size(x), layers=list(layers), targets=idx,
                           method="integrated-gradcam", seconds=[spent] * len(layers),
                           extra={"steps": [opts.steps] * len(layers)})


def run_integrated_gradcam(anim: Any, x: torch.Tensor, layers: list[LayerInfo],
                           targets: Any) -> LayerMaps:
    """`CAManim` runner for ``method="integrated-gradcam"``."""
    return integrated_gradcam_maps(anim.model, x, layers, targets, ig_options(anim.options),
                                   anim.batch_size, anim.reshape_transform, anim.progress)


def integrated_gradcam(model: nn.Module, images: torch.Tensor, targets: Any = None,
                       layers: Selector | None = None, *, steps: int = 50,
                       baseline: Any = None, mean: Any = IMAGENET_MEAN,
                       std: Any = IMAGENET_STD, path: str = "paper",
                       subtract_baseline: bool | None = None, batch_size: int = 32,
                       reshape_transform: Any = None, progress: bool = False) -> ExplanationMaps:
    """Integrated Grad-CAM of ``images`` ``(B, C, H, W)`` (normalized as the model expects).

    Args:
        layers: any camanim selector; ``None`` (default) = the deepest block
            layer (ResNet: ``layer4``), the usual Grad-CAM layer.
        steps, baseline, mean, std, path, subtract_baseline: see the module
            docstring.
        batch_size: path images per forward/backward.

    Returns:
        `ExplanationMaps`; ``.final`` is the last layer's map at input size,
        min-max scaled, ``(B, H, W)``.
    """
    if not isinstance(model, nn.Module):
        raise CAManimError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if int(batch_size) < 1:
        raise CAManimError(f"batch_size must be >= 1, got {batch_size}")
    opts = ig_options(dict(steps=steps, baseline=baseline, mean=mean, std=std, path=path,
                           subtract_baseline=subtract_baseline))
    x = check_images(images, model)
    chosen = list_layers(model, x, "blocks" if layers is None else layers,
                         reshape_transform=reshape_transform).selected
    if layers is None:
        chosen = chosen[-1:]
    return integrated_gradcam_maps(model, x, chosen, targets, opts, int(batch_size),
                                   reshape_transform, progress)


__all__ = ["IGOptions", "IG_OPTIONS", "IMAGENET_MEAN", "IMAGENET_STD", "integrated_gradcam",
           "integrated_gradcam_maps", "ig_options", "path_alphas", "baseline_images",
           "step_maps", "run_integrated_gradcam"]
