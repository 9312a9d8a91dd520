r"""Ablation-CAM: the weight of channel k is the relative drop of the target
score when channel k of this layer call is ablated.

Desai & Ramaswamy, "Ablation-CAM: Visual Explanations for Deep
Convolutional Network via Gradient-free Localization", WACV 2020.

.. math::

    w_k^c = \frac{y^c - y^c_k}{y^c}, \qquad L^c = \sum_k w_k^c A^k

where ``y^c_k`` is the score with channel k replaced by the ablated value.
Shapes: ``(B, C, h, w)`` -> ``(B, h, w)``; C extra forwards per image, in
batches of ``ctx.batch_size``.

Ablated value: 0 when the layer's smallest activation (for that image) is 0,
else that minimum - 1e7, as pytorch-grad-cam does. (pytorch-grad-cam applies
the 1e7 offset cumulatively across a batch of ablations when activations are
negative, so the value depends on the batch position there; we use one
value for every channel.)"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..core.capture import Hooks
from ..core.inputs import score_outputs
from ..core.layout import NHWC, TOKENS
from ..errors import CAManimError
from .base import LayerContext


def ablationcam(acts: torch.Tensor, _grads: torch.Tensor | None,
                ctx: LayerContext) -> torch.Tensor:
    """Ablation-CAM of one layer call: ``acts`` ``(B, C, h, w)`` -> ``(B, h, w)``
    (before the ReLU); ``ctx.stats["n_masks"]`` = C."""
    layer = ctx.layer
    if layer.layout == TOKENS:
        raise CAManimError(f"ablationcam cannot ablate token layer {layer.name!r}: its "
                           "reshape_transform has no inverse; use a gradient method")
    b, c = acts.shape[:2]
    new = torch.empty((b, c), dtype=acts.dtype, device=acts.device)
    bar = tqdm(total=b * c, desc=f"Ablation-CAM {layer.name}", unit="channel",
               disable=not ctx.progress, leave=False)
    with torch.no_grad():
        orig = score_outputs(ctx.targets, ctx.model(ctx.images)).to(acts)         # (B,)
        for i in range(b):
            a = acts[i]
            value = 0.0 if a.min() == 0 else float(a.min()) - 1e7
            for s in range(0, c, ctx.batch_size):
                n = min(ctx.batch_size, c - s)
                ablated = a[None].repeat(n, 1, 1, 1)
                ablated[torch.arange(n), s + torch.arange(n)] = value
                if layer.layout == NHWC:
                    ablated = ablated.permute(0, 2, 3, 1)
                with Hooks(ctx.model, [layer], replace={layer.name: _constant(ablated)},
                           record=False):
                    out = ctx.model(ctx.images[i][None].expand(n, -1, -1, -1))
                new[i, s:s + n] = score_outputs([ctx.targets[i]] * n, out).to(new)
                bar.update(n)
    bar.close()
    ctx.stats["n_masks"] = c
    weights = ((orig[:, None] - new) / orig[:, None])[:, :, None, None]
    return (weights * acts).sum(1)


def _constant(t: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A layer output replacement: ``t`` in the dtype and device of the output."""
    return lambda out: t.to(out)
