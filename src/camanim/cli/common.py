"""Argument helpers shared by the ``camanim`` subcommands."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.images import IMAGENET_MEAN, IMAGENET_STD
from ..errors import CAManimError

NORMS = ("local", "global", "both")
FORMATS = ("mp4", "webm", "gif", "png")


class Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def input_args(p: argparse.ArgumentParser) -> None:
    """What ``explain`` and ``sanity`` share: the images, the model and its
    weights, the target class and names, the input normalization."""
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    model_args(p)
    p.add_argument("--weights", default="none", metavar="DEFAULT|none|NAME",
                   help="torchvision weights: none (random init, the offline default), DEFAULT, "
                        "or a weights name like IMAGENET1K_V2")
    p.add_argument("--checkpoint", type=Path, default=None, metavar="FILE",
                   help="a state dict or Lightning checkpoint to load into the model")
    p.add_argument("--target", default="auto", metavar="auto|INT|NAME",
                   help="class to explain: auto (predicted), an index, or a class name")
    p.add_argument("--classes", default=None, metavar="A,B,...|FILE",
                   help="class names (comma-separated or a file, one per line); default: the "
                        "torchvision weights' categories when the class count matches")
    p.add_argument("--mean", default=",".join(map(str, IMAGENET_MEAN)), metavar="M,M,M",
                   help="input normalization mean (default ImageNet)")
    p.add_argument("--std", default=",".join(map(str, IMAGENET_STD)), metavar="S,S,S",
                   help="input normalization std (default ImageNet)")


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        metavar="NAME|module:callable",
        help="a torchvision model name (resnet50, densenet161, ...) or an importable "
        "'package.module:callable' / 'path/to/file.py:callable' returning an nn.Module",
    )
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        metavar="K",
        help="output classes of a torchvision model (default: 1000; explain: or what "
             "--checkpoint holds)",
    )



def float_list(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CAManimError(f"--{what} must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise CAManimError(f"--{what} is empty")
    return vals


def layer_selector(text: str | None) -> Any:
    if text is None:
        return None
    text = text.strip()
    if text in ("conv", "all", "blocks"):
        return text
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CAManimError("--layers is empty: use conv, all, blocks or layer names")
    return names


def norm_list(text: str) -> list[str]:
    norms = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in norms if n not in NORMS]
    if bad or not norms:
        raise CAManimError(f"--norm {text!r}: use a comma-separated list of {', '.join(NORMS)}")
    return list(dict.fromkeys(norms))


def parse_class_names(text: str | None, default: list[str] | None) -> list[str] | None:
    if text is None:
        return default
    path = Path(text)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CAManimError(f"--classes {text!r} holds no names")
    return names


def target_index(text: str, classes: list[str] | None, n_out: int | None) -> int | None:
    text = text.strip()
    if text.lower() == "auto":
        return None
    if text.lstrip("-").isdigit():
        k = int(text)
        if k < 0 or (n_out is not None and k >= n_out):
            raise CAManimError(
                f"--target {k} is out of range: the model has {n_out} classes "
                f"(0..{(n_out or 1) - 1})"
            )
        return k
    if not classes:
        raise CAManimError(f"--target {text!r}: class names are unknown for this model; pass an "
                           "index, or names with --classes")
    low = [c.lower() for c in classes]
    if text.lower() in low:
        return low.index(text.lower())
    close = difflib.get_close_matches(text.lower(), low, n=4, cutoff=0.5)
    hint = (
        f"; did you mean {', '.join(repr(classes[low.index(c)]) for c in close)}?" if close else ""
    )
    raise CAManimError(f"--target {text!r} is not a class name of this model{hint}")


def torch_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise CAManimError("--device cuda: CUDA is not available here; use --device cpu")
    return torch.device(name)


def stems(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = p.stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return out


def prepare_out(out: Path, flag: str = "--out") -> Path:
    """Create the output folder and check that it can be written, before any
    heavy work; temporary files a killed run left there are removed.

    Raises:
        CAManimError: ``out`` is a file, or cannot be created or written.
    """
    from ..core.files import remove_stale, writable_folder

    out = writable_folder(out, flag)
    remove_stale([out])
    return out

