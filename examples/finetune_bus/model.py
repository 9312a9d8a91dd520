"""The classifier: a torchvision ResNet with a new head, as a LightningModule.

``--weights imagenet`` loads torchvision's ImageNet-1k weights (as in the
paper's BC-ResNet50).  They are read from torch's cache
(``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch``) and downloaded
only when missing; with no network the run stops and says how to get them.
``--weights none`` (the offline default) starts from random weights.
``--weights /path/to/file.pth`` loads a torchvision state dict you copied.
``--arch timm:NAME`` (e.g. ``timm:convnext_tiny``) fine-tunes a timm model
instead, from random weights (``pretrained=False``: nothing is downloaded).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
import torchvision
from torch import nn

ARCHS = ("resnet50", "resnet18", "resnet34", "resnet101")
# IMAGENET1K_V1 is the classic torchvision weight set ("pretrained=True"),
# the one fine-tuned in the paper's era.
_WEIGHTS = {
    "resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights", "resnet101": "ResNet101_Weights",
}


class WeightsUnavailable(RuntimeError):
    """ImageNet weights are neither cached nor downloadable."""


def imagenet_weights(arch: str):
    """The torchvision weights enum entry used for ``--weights imagenet``."""
    return getattr(torchvision.models, _WEIGHTS[arch]).IMAGENET1K_V1


def weights_cache_path(arch: str) -> Path:
    """Where torch.hub caches (and looks for) the ImageNet weights file."""
    url = imagenet_weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _how_to_get(arch: str) -> str:
    w = imagenet_weights(arch)
    path = weights_cache_path(arch)
    return (
        f"ImageNet weights for {arch} are not in torch's cache ({path}) and could not be "
        f"downloaded (no network?).\n"
        f"  - On a machine with network access run:\n"
        f"      python -c \"import torchvision; "
        f"torchvision.models.{arch}(weights='IMAGENET1K_V1')\"\n"
        f"    then copy {path.name} into {path.parent}/ here (or set TORCH_HOME to a folder whose\n"
        f"    hub/checkpoints/ holds it), or pass the file itself: --weights /path/to/{path.name}\n"
        f"    (URL: {w.url})\n"
        f"  - or train from random weights: --weights none")


def check_arch(arch: str) -> str:
    """``arch`` if it names a supported network (argparse ``type=``)."""
    if arch not in ARCHS and not (arch.startswith("timm:") and len(arch) > len("timm:")):
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)} or timm:NAME, got {arch!r}")
    return arch


def build_backbone(arch: str = "resnet50", num_classes: int = 2, weights: str = "none",
                   download_timeout: float = 30.0) -> nn.Module:
    """A torchvision ResNet whose ``fc`` is replaced by ``Linear(in, num_classes)``,
    or a timm model (``arch="timm:NAME"``, random weights) with ``num_classes`` outputs.

    ``weights``: ``"none"`` (random), ``"imagenet"`` (cached torchvision
    weights, downloaded if missing) or a path to a state-dict file of the
    ImageNet model (its ``fc`` is replaced after loading); timm models take
    ``"none"`` only."""
    check_arch(arch)
    if arch.startswith("timm:"):
        if weights not in (None, "none"):
            raise ValueError(f"--weights {weights}: timm models start from random weights here "
                             "(--weights none); ImageNet weights are for the torchvision ResNets")
        from camanim.cli.models import timm_model

        return timm_model(arch[len("timm:"):], num_classes)
    net = getattr(torchvision.models, arch)(weights=None)
    if weights == "imagenet":
        cached = weights_cache_path(arch)
        if cached.is_file():
            state = torch.load(cached, map_location="cpu", weights_only=True)
        else:
            old = socket.getdefaulttimeout()
            socket.setdefaulttimeout(download_timeout)
            try:
                state = imagenet_weights(arch).get_state_dict(progress=True, check_hash=True)
            except Exception as e:  # noqa: BLE001 - any failure: re-raised as WeightsUnavailable
                # URLError, timeout, hash mismatch, ...
                raise WeightsUnavailable(_how_to_get(arch)
                                         + f"\n  (error: {type(e).__name__}: {e})") from None
            finally:
                socket.setdefaulttimeout(old)
        net.load_state_dict(state)
    elif weights not in (None, "none"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(f"--weights {weights}: no such file (use 'imagenet', 'none' "
                                     f"or a .pth state dict of torchvision's {arch})")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint
            state = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if set(missing) - {"fc.weight", "fc.bias"} or unexpected:
            raise ValueError(f"--weights {path}: not a {arch} state dict "
                             f"(missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]})")
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


class BUSClassifier(L.LightningModule):
    """ResNet (or timm) classifier for breast ultrasound.

    ``forward(images) -> logits``; the network is ``self.model`` (layer names
    as in torchvision, prefixed ``model.``, e.g. ``model.layer4.2.conv3``).
    Logs ``train_loss``/``train_acc`` and ``val_``/``test_`` ``loss``, ``acc``,
    ``auroc`` (and for two classes ``sensitivity``/``specificity`` of the
    positive class, malignant). ``image_size``, ``mean``, ``std`` and
    ``class_names`` are only stored (in every checkpoint's
    ``hyper_parameters``), for ``camanim explain`` and ``camanim sanity``."""

    def __init__(self, arch: str = "resnet50", num_classes: int = 2, weights: str = "none",
                 lr: float = 1e-3,  # noqa: ARG002 - stored by save_hyperparameters, read as hparams
                 weight_decay: float = 1e-4,  # noqa: ARG002 - the same
                 max_epochs: int = 10,  # noqa: ARG002 - the same
                 class_names: Sequence[str] | None = None,
                 image_size: int | None = None,  # noqa: ARG002 - stored by save_hyperparameters
                 mean: Sequence[float] | None = None,  # noqa: ARG002 - the same
                 std: Sequence[float] | None = None):  # noqa: ARG002 - the same
        super().__init__()
        # every checkpoint carries these (hyper_parameters): image_size, mean, std and
        # class_names are what `camanim explain` / `sanity` read (camanim.core.checkpoint)
        self.save_hyperparameters()
        self.model = build_backbone(arch, num_classes, weights)
        self.class_names = list(class_names or range(num_classes))
        task = "binary" if num_classes == 2 else "multiclass"
        kw = {"task": task} if task == "binary" else {"task": task, "num_classes": num_classes}
        self.train_acc = torchmetrics.Accuracy(**kw)
        self.metrics = nn.ModuleDict()
        for stage in ("val", "test"):
            m = {"acc": torchmetrics.Accuracy(**kw), "auroc": torchmetrics.AUROC(**kw)}
            if task == "binary":
                m["sensitivity"] = torchmetrics.Recall(task="binary")
                m["specificity"] = torchmetrics.Specificity(task="binary")
            self.metrics[stage] = nn.ModuleDict(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Probability of the positive class (binary) or all class probabilities."""
        p = logits.softmax(-1)
        return p[:, 1] if self.hparams.num_classes == 2 else p

    def training_step(self, batch, _batch_idx):
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        self.train_acc(self._scores(logits.detach()), batch["label"])
        bs = batch["label"].shape[0]
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=bs)
        return loss

    def _eval_step(self, batch, stage: str):
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        bs = batch["label"].shape[0]
        self.log(f"{stage}_loss", loss, on_epoch=True, prog_bar=stage == "val", batch_size=bs)
        scores = self._scores(logits)
        for metric in self.metrics[stage].values():
            metric.update(scores, batch["label"])
        return loss

    def _eval_epoch_end(self, stage: str):
        for name, metric in self.metrics[stage].items():
            self.log(f"{stage}_{name}", metric.compute(),
                     prog_bar=stage == "val" and name in ("acc", "auroc"))
            metric.reset()

    def validation_step(self, batch, _batch_idx):
        return self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def test_step(self, batch, _batch_idx):
        return self._eval_step(batch, "test")

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt,
                                                           T_max=max(1, self.hparams.max_epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
