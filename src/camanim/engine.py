"""`CAManim`: class activation maps of every chosen layer in one pass."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .core.capture import capture
from .core.guard import eval_mode
from .core.inputs import check_images
from .core.layers import LayerInfo, LayerTable, Selector, discover, select
from .core.maps import LayerMaps, image_size, wide
from .errors import CAManimError
from .methods import LayerContext, Method, check_method_options, get_method


class CAManim:
    """Class activation maps for every chosen layer of a CNN.

    Gradient methods (``gradcam``, ``hirescam``, ``gradcamelementwise``,
    ``gradcam++``, ``xgradcam``, ``layercam``, ``eigengradcam``) and
    ``eigencam`` / ``randomcam`` come from ONE forward and ONE backward
    pass for all layers; ``scorecam`` and ``ablationcam`` add batched
    forwards per layer. Each layer's ``upsample("local")`` map equals
    pytorch-grad-cam's output for that single layer.

    A float16 / bfloat16 model runs in its own dtype; its activations and
    gradients are turned into maps in float32 (the maps are float32).

    Args:
        model: a classifier ``(B, C, H, W) -> (B, K)``. Left exactly as it was:
            train/eval mode of every submodule, ``requires_grad``, ``.grad``,
            hooks.
        method: a method name (see `camanim.methods.method_names`) or a
            pytorch-grad-cam ``BaseCAM`` subclass (a user's own too).
        layers: ``None`` (default: the method's own, ``"conv"``, or
            ``"blocks"`` for SISE / Ada-SISE), ``"conv"``, ``"all"``,
            ``"blocks"``, a list of names or a callable ``(name, module) ->
            bool`` (see `camanim.list_layers`). ``"conv"`` with SISE /
            Ada-SISE is replaced by ``"blocks"`` with a warning (their rule).
        reshape_transform: turns token outputs ``(B, N, C)`` into
            ``(B, C, h, w)`` (ViT-like models); without it a square patch
            grid, with or without one class token, is found by itself.
        max_layers: keep at most this many evenly spaced layers.
        batch_size: images per extra forward (Score-CAM, Ablation-CAM).
        seed: seed of the generator random methods draw from.
        progress: show progress bars on long work.
        **options: method options (e.g. Integrated Grad-CAM ``steps``); an
            option the method does not take is a `CAManimError`.
    """

    def __init__(self, model: nn.Module, method: Any = "gradcam", layers: Selector | None = None,
                 reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                 max_layers: int | None = None, batch_size: int = 32, seed: int = 0,
                 progress: bool = True, **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise CAManimError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if int(batch_size) < 1:
            raise CAManimError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.method: Method = get_method(method)
        check_method_options(self.method, options)
        if layers is None:
            layers = self.method.default_layers
        elif (isinstance(layers, str) and layers == "conv"
              and self.method.default_layers == "blocks"):
            warnings.warn(f"camanim: method {self.method.name!r} explains from its block layers: "
                          "layers='conv' was replaced by 'blocks'. Pass layers=None for no "
                          "warning, or 'all', names or a callable to use other layers.",
                          UserWarning, stacklevel=2)
            layers = "blocks"
        self.layers = layers
        self.reshape_transform = reshape_transform
        self.max_layers = max_layers
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.progress = progress
        self.options = options
        self._tables: dict[tuple[int, ...], LayerTable] = {}

    # ---------------------------------------------------------------- layers
    def layer_table(self, images: torch.Tensor) -> LayerTable:
        """Discover and select layers for images of this shape (cached)."""
        key = tuple(images.shape[1:])
        if key not in self._tables:
            calls = discover(self.model, images[:1])
            self._tables[key] = select(calls, self.layers, model=self.model,
                                       reshape_transform=self.reshape_transform,
                                       max_layers=self.max_layers)
        return self._tables[key]

    # ------------------------------------------------------------------ maps
    def __call__(self, images: torch.Tensor, targets: Any = None) -> LayerMaps:
        """Maps of every selected layer.

        Args:
            images: ``(B, C, H, W)`` float batch, normalized as the model expects.
            targets: ``None`` (predicted class), an int or B ints, or B
                pytorch-grad-cam target callables.

        Returns:
            `LayerMaps` with L raw ``(B, h_l, w_l)`` maps.
        """
        x = check_images(images, self.model)
        table = self.layer_table(x)
        if self.method.runner is not None:
            return self.method.runner(self, x, table.selected, targets)
        return self._one_pass(x, table.selected, targets)

    def _one_pass(self, x: torch.Tensor, layers: list[LayerInfo], targets: Any) -> LayerMaps:
        t0 = time.perf_counter()
        cap = capture(self.model, x, layers, targets, gradients=self.method.uses_gradients,
                      reshape_transform=self.reshape_transform)
        shared = (time.perf_counter() - t0) / max(len(layers), 1)
        gen = torch.Generator().manual_seed(self.seed)
        raw: list[torch.Tensor] = []
        seconds: list[float] = []
        stats: dict[str, list[object]] = {}
        bar = tqdm(layers, desc=f"{self.method.name}", unit="layer", leave=False,
                   disable=not (self.progress and self.method.extra_forwards))
        with eval_mode(self.model):
            for i, info in enumerate(bar):
                t1 = time.perf_counter()
                ctx = LayerContext(model=self.model, images=x, layer=info, targets=cap.targets,
                                   batch_size=self.batch_size, generator=gen,
                                   progress=self.progress,
                                   reshape_transform=self.reshape_transform)
                grads = wide(cap.gradients[i]) if cap.gradients is not None else None
                assert self.method.fn is not None  # a method without fn has a runner
                with torch.no_grad():
                    cam = self.method.fn(wide(cap.activations[i]), grads, ctx).clamp_min(0)
                raw.append(cam.detach())
                for k, v in ctx.stats.items():
                    stats.setdefault(k, [None] * len(layers))[i] = v
                seconds.append(shared + time.perf_counter() - t1)
                cap.activations[i] = None  # type: ignore[call-overload]  # free as we go
                if cap.gradients is not None:
                    cap.gradients[i] = None  # type: ignore[call-overload]  # freed as we go
        bad = [
            info.name for info, r in zip(layers, raw, strict=False) if not torch.isfinite(r).all()
        ]
        if bad:
            raise CAManimError(
                f"non-finite values in the {self.method.name} map of layer(s) {bad[:5]}: "
                "the model's activations or gradients overflow there; try float32/float64 "
                "instead of half precision, or exclude those layers")
        return LayerMaps(names=[i.name for i in layers], raw=raw,
                         input_size=image_size(x), layers=list(layers),
                         targets=cap.target_idx, method=self.method.name,
                         seconds=seconds, extra=stats, logits=cap.logits.detach())

    def __repr__(self) -> str:
        return (f"CAManim(method={self.method.name!r}, layers={self.layers!r}, "
                f"model={type(self.model).__name__})")
