"""What a checkpoint says about the inputs its model was trained on.

A Lightning checkpoint keeps the LightningModule's
``save_hyperparameters()`` under ``"hyper_parameters"``. When those hold
any of the fields below, ``camanim explain``, ``camanim sanity`` and
`checkpoint_meta` use them instead of the defaults (a flag given on the
command line still wins):

==============  ===========================================================
field           meaning
==============  ===========================================================
``image_size``  the model's input size in training: an int (square) or
                ``[H, W]``
``mean``        per-channel input normalization mean, e.g. ImageNet's
                ``[0.485, 0.456, 0.406]``
``std``         per-channel input normalization std
``class_names`` one name per output of the model, in output order
==============  ===========================================================

A plain ``torch.save`` file can carry the same fields: save
``{"state_dict": model.state_dict(), "hyper_parameters": {...}}``.
The file is read with ``weights_only=True`` (no code from the file runs).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from ..errors import CAManimError

__all__ = ["FIELDS", "CheckpointMeta", "checkpoint_meta", "meta_from_hparams"]

#: The ``hyper_parameters`` keys camanim reads (see the module docstring).
FIELDS = ("image_size", "mean", "std", "class_names")


@dataclass(frozen=True)
class CheckpointMeta:
    """Input settings stored with a checkpoint; ``None`` where it has none.

    Attributes:
        image_size: ``(H, W)`` the model was trained at.
        mean, std: per-channel input normalization.
        class_names: one name per model output.
        path: the checkpoint file.
    """

    image_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    path: str = ""

    @property
    def empty(self) -> bool:
        """The checkpoint holds none of `FIELDS`."""
        return all(getattr(self, f) is None for f in FIELDS)

    def to_dict(self) -> dict[str, Any]:
        """The stored fields (``None`` left out), JSON-ready."""
        return {f: list(v) for f in FIELDS if (v := getattr(self, f)) is not None}


def _bad(path: str, key: str, what: str, value: Any) -> CAManimError:
    return CAManimError(f"{path}: hyper_parameters[{key!r}] must be {what}, got {value!r}; "
                        "fix or remove it (see camanim.core.checkpoint for the fields)")


def meta_from_hparams(hparams: Mapping[str, Any], path: str = "") -> CheckpointMeta:
    """`CheckpointMeta` from a ``hyper_parameters`` mapping.

    Raises:
        CAManimError: a field is present but not of the documented form.
    """
    size = hparams.get("image_size")
    if size is not None:
        parts = [size] if isinstance(size, Integral) else size
        if (isinstance(size, bool) or not isinstance(parts, (list, tuple))
                or len(parts) not in (1, 2)
                or not all(isinstance(v, Integral) and not isinstance(v, bool) and int(v) > 0
                           for v in parts)):
            raise _bad(path, "image_size", "a positive int or [H, W]", size)
        size = (int(parts[0]), int(parts[-1]))
    norm: dict[str, tuple[float, ...] | None] = {}
    for key in ("mean", "std"):
        v = hparams.get(key)
        if v is not None:
            if (not isinstance(v, (list, tuple)) or not v
                    or not all(isinstance(x, Real) and not isinstance(x, bool) for x in v)):
                raise _bad(path, key, "a list of numbers, one per channel", v)
            v = tuple(float(x) for x in v)
            if key == "std" and min(v) <= 0:
                raise _bad(path, key, "positive numbers", list(v))
        norm[key] = v
    names = hparams.get("class_names")
    if names is not None:
        if (not isinstance(names, (list, tuple)) or not names
                or not all(isinstance(n, str) for n in names)):
            raise _bad(path, "class_names", "a list of strings, one per output", names)
        names = tuple(names)
    return CheckpointMeta(image_size=size, mean=norm["mean"], std=norm["std"],
                          class_names=names, path=path)


def checkpoint_meta(path: str | Path) -> CheckpointMeta:
    """The input settings a checkpoint file stores (see the module docstring).

    A file without ``hyper_parameters`` (a plain state dict) gives an empty
    `CheckpointMeta`; so does a file that cannot be read: loading its
    weights reports that problem.

    Raises:
        CAManimError: a stored field is not of the documented form.
    """
    import torch

    path = Path(path)
    obj: Any = None
    for mmap in (True, False):               # mmap: the tensors are not read
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception:  # noqa: BLE001 - a damaged or foreign file fails in many ways
            # (weights_only's unpickler raises KeyError, AssertionError, ...); a legacy
            # non-zip file cannot be mapped. Loading the weights reports the problem.
            continue
    hp = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    if not isinstance(hp, Mapping):
        return CheckpointMeta(path=str(path))
    return meta_from_hparams(hp, str(path))
