"""A tiny LightningModule shared by the callback tests and their subprocess
scripts: plain convolutions (no BatchNorm), a linear head, SGD."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn


class TinyLitNet(L.LightningModule):
    """``n_conv`` 3x3 convolutions (the second with stride 2) with ReLUs,
    global pooling and a 3-class linear head, trained with SGD at ``lr``."""

    def __init__(self, n_conv: int = 3, lr: float = 0.05) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n_conv):
            layers += [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1, stride=2 if i == 1 else 1),
                       nn.ReLU()]
        self.f = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        self.lr = lr

    def forward(self, x):
        return self.f(x)

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)
