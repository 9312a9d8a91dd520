"""Models, data and trainers shared by the callback tests and their
subprocess scripts: `TinyLitNet` (plain convolutions, no BatchNorm), `Net`
(BatchNorm and Dropout, so RNG use and BatchNorm statistics matter),
`Frozen`, and the helpers that build data, loaders, trainers and a cheap
callback."""

from __future__ import annotations

import csv

import lightning as L
import torch
from torch import nn

from camanim import CAManimCallback, VideoOptions


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


N_LAYERS = 4  # Conv2d layers of Net


class Net(L.LightningModule):
    """Tiny classifier with BatchNorm and Dropout (so RNG use matters)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Dropout(0.3),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, classes))
        self.order: list[tuple[str, int]] = []

    def forward(self, x):
        return self.f(x)

    def training_step(self, batch, _):
        x, y = batch[0], batch[1]
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, _):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.order.append(("val", self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def data(n: int = 24, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    m = x[:, 0] > 0.3
    return x, y, m


def loader(x, y, shuffle=True, bs=8):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs,
                                       shuffle=shuffle, num_workers=0)


def trainer(tmp_path, callbacks=(), max_epochs=3, logger=False, **kw):
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, deterministic=True,
                     logger=logger, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path), log_every_n_steps=1,
                     callbacks=list(callbacks), **kw)


def quick(probes, **kw):
    """A cheap callback: no videos unless asked."""
    kw.setdefault("video", VideoOptions(log=False, save=False))
    return CAManimCallback(probes, **kw)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Frozen(Net):
    """Mixed modes and flags: the first BatchNorm frozen in eval mode, the first
    convolution not trained."""

    def on_train_epoch_start(self):
        self.f[1].eval()

    def configure_optimizers(self):
        self.f[0].requires_grad_(False)
        return super().configure_optimizers()
