"""Score-CAM (Wang et al. 2020): each channel, upsampled and min-max scaled,
masks the input; the softmax over channels of the masked scores weights it.
Masked images go through the model in batches of ``ctx.batch_size``, in the
model's dtype; masks and scores are kept in float32 for a half-precision
model."""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.inputs import score_outputs
from ..core.maps import minmax
from .base import LayerContext


def scorecam(acts: torch.Tensor, grads: "torch.Tensor | None", ctx: LayerContext) -> torch.Tensor:
    b, c = acts.shape[:2]
    size = tuple(ctx.images.shape[-2:])
    scores = torch.empty((b, c), dtype=acts.dtype, device=acts.device)
    dtype = ctx.images.dtype
    bar = tqdm(total=b * c, desc=f"Score-CAM {ctx.layer.name}", unit="mask",
               disable=not ctx.progress, leave=False)
    with torch.no_grad():
        for i in range(b):
            for s in range(0, c, ctx.batch_size):
                # pytorch-grad-cam upsamples with UpsamplingBilinear2d, i.e.
                # align_corners=True
                m = F.interpolate(acts[i:i + 1, s:s + ctx.batch_size], size=size,
                                  mode="bilinear", align_corners=True)[0]      # (n, H, W)
                m = minmax(m, eps=1e-8)                     # ScoreCAM's epsilon
                out = ctx.model((ctx.images[i][None] * m[:, None]).to(dtype))
                scores[i, s:s + len(m)] = score_outputs([ctx.targets[i]] * len(m), out).to(scores)
                bar.update(len(m))
    bar.close()
    ctx.stats["n_masks"] = c
    weights = torch.softmax(scores, dim=-1)[:, :, None, None]
    return (weights * acts).sum(1)
