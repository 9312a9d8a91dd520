"""A CAM that ignores the model, for the randomization sanity check tests."""

import numpy as np
import torch
from pytorch_grad_cam.base_cam import BaseCAM


class EdgeCAM(BaseCAM):
    """The input's gradient magnitude, pooled to the layer's resolution: a
    map that looks plausible but never looks at the model's weights."""

    def get_cam_image(self, input_tensor, target_layer, targets, activations, grads,
                      eigen_smooth=False):
        x = input_tensor.detach().double().mean(1)
        gx = torch.zeros_like(x)
        gy = torch.zeros_like(x)
        gx[:, :, 1:] = x[:, :, 1:] - x[:, :, :-1]
        gy[:, 1:] = x[:, 1:] - x[:, :-1]
        edges = torch.sqrt(gx ** 2 + gy ** 2)[:, None]
        pooled = torch.nn.functional.adaptive_avg_pool2d(edges, activations.shape[-2:])[:, 0]
        return np.asarray(pooled.cpu().numpy())
