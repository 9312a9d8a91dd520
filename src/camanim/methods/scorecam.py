r"""Score-CAM: each channel, upsampled and min-max scaled, masks the input;
the softmax over channels of the masked inputs' target scores weights it.

Wang et al., "Score-CAM: Score-Weighted Visual Explanations for
Convolutional Neural Networks", CVPR Workshops 2020.

.. math::

    H^k = \operatorname{minmax}(\operatorname{up}(A^k)), \quad
    s_k = y^c(X \odot H^k), \quad
    L^c = \sum_k \operatorname{softmax}_k(s)_k \, A^k

with bilinear ``up`` (``align_corners=True``, as pytorch-grad-cam's
``UpsamplingBilinear2d``) and pytorch-grad-cam's ``eps = 1e-8`` in the
min-max. Masked images ``(n, C, H, W)`` go through the model in batches of
``ctx.batch_size``, in the model's dtype; masks and scores are kept in
float32 for a half-precision model. C extra forwards per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.inputs import score_outputs
from ..core.maps import image_size, minmax
from .base import LayerContext


def scorecam(acts: torch.Tensor, _grads: torch.Tensor | None,
             ctx: LayerContext) -> torch.Tensor:
    """Score-CAM of one layer call: ``acts`` ``(B, C, h, w)`` -> ``(B, h, w)``
    (before the ReLU); ``ctx.stats["n_masks"]`` = C."""
    b, c = acts.shape[:2]
    size = image_size(ctx.images)
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
