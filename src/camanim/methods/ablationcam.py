"""Ablation-CAM (Desai & Ramaswamy 2020): weight of channel k = relative drop
of the target score when channel k of this layer call is ablated.

Ablated value: 0 when the layer's smallest activation (for that image) is 0,
else that minimum - 1e7, as pytorch-grad-cam does. (pytorch-grad-cam applies
the 1e7 offset cumulatively across a batch of ablations when activations are
negative, so the value depends on the batch position there; we use one
value for every channel.)"""

import torch
from tqdm.auto import tqdm

from ..core.capture import Hooks
from ..errors import CAManimError
from ..core.inputs import score_outputs
from ..core.layers import NHWC, TOKENS
from .base import LayerContext


def ablationcam(acts: torch.Tensor, grads: "torch.Tensor | None", ctx: LayerContext) -> torch.Tensor:
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
                with Hooks(ctx.model, [layer], replace={layer.name: lambda o, t=ablated: t.to(o)},
                           record=False):
                    out = ctx.model(ctx.images[i][None].expand(n, -1, -1, -1))
                new[i, s:s + n] = score_outputs([ctx.targets[i]] * n, out).to(new)
                bar.update(n)
    bar.close()
    ctx.stats["n_masks"] = c
    weights = ((orig[:, None] - new) / orig[:, None])[:, :, None, None]
    return (weights * acts).sum(1)
