"""Argument helpers shared by the ``camanim`` subcommands."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CAManimError

if TYPE_CHECKING:  # torch is imported when a command runs, not for --help
    import torch

    from ..core.checkpoint import CheckpointMeta

NORMS = ("local", "global", "both")
FORMATS = ("mp4", "webm", "gif", "png")
DEVICES = ("cpu", "cuda", "mps")


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
                   help="class names (comma-separated or a file, one per line), one per output "
                        "of the model; default: the checkpoint's class_names, else the "
                        "torchvision weights' categories when the class count matches")
    p.add_argument("--mean", default=None, metavar="M,M,M",
                   help="input normalization mean (default: the checkpoint's, else ImageNet)")
    p.add_argument("--std", default=None, metavar="S,S,S",
                   help="input normalization std (default: the checkpoint's, else ImageNet)")


def model_args(p: argparse.ArgumentParser) -> None:
    """The model's name and class count (every subcommand that builds a model)."""
    p.add_argument("--model", required=True, metavar="NAME|timm:NAME|module:callable",
                   help="a torchvision model name (resnet50, densenet161, ...), a timm model "
                        "(timm:convnext_tiny; random weights, load yours with --checkpoint) or an "
                        "importable "
                        "'package.module:callable' / 'path/to/file.py:callable' returning an "
                        "nn.Module")
    p.add_argument("--num-classes", type=int, default=None, metavar="K",
                   help="output classes of a torchvision model (default: 1000; explain: or what "
                        "--checkpoint holds)")



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
            raise CAManimError(f"--target {k} is out of range: the model has {n_out} classes "
                               f"(0..{(n_out or 1) - 1})")
        return k
    if not classes:
        raise CAManimError(f"--target {text!r}: class names are unknown for this model; pass an "
                           "index, or names with --classes")
    low = [c.lower() for c in classes]
    if text.lower() in low:
        return low.index(text.lower())
    close = difflib.get_close_matches(text.lower(), low, n=4, cutoff=0.5)
    hint = (f"; did you mean {', '.join(repr(classes[low.index(c)]) for c in close)}?"
            if close else "")
    raise CAManimError(f"--target {text!r} is not a class name of this model{hint}")


def torch_device(name: str) -> torch.device:
    """The ``--device`` as a torch device, or one line saying why it can't be used."""
    import torch

    if name not in DEVICES:
        raise CAManimError(f"--device {name}: use one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise CAManimError("--device cuda: CUDA is not available here; use --device cpu")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            why = ("this PyTorch was built without MPS" if mps is None or not mps.is_built()
                   else "no Apple GPU (MPS) is available here")
            raise CAManimError(f"--device mps: {why}; use --device cpu")
    return torch.device(name)


def max_layers(n: int | None) -> int | None:
    """``--max-layers``: ``None`` or 0 keep every layer (as the example's
    ``--cam-max-layers 0``); a negative count is an error."""
    if n is not None and n < 0:
        raise CAManimError(f"--max-layers must be >= 0 (0: all layers), got {n}")
    return n or None


def check_class_count(classes: list[str] | None, n_out: int | None, flag_given: bool) -> None:
    """``--classes`` must name every output of the model, no more, no fewer."""
    if classes is None or n_out is None or len(classes) == n_out:
        return
    where = "--classes" if flag_given else "the checkpoint's class_names"
    raise CAManimError(f"{where} holds {len(classes)} names ({', '.join(classes[:4])}"
                       f"{', ...' if len(classes) > 4 else ''}) but the model has {n_out} "
                       f"outputs: give one name per output")


def input_settings(args: argparse.Namespace, meta: CheckpointMeta | None, quiet: bool
                   ) -> tuple[tuple[int, int] | None, list[float], list[float], list[str] | None]:
    """Input size, mean, std and class names of ``explain`` and ``sanity``:
    a flag wins, then the checkpoint's metadata (`camanim.core.checkpoint`),
    then the defaults (224, ImageNet). Says where each came from in one
    stderr line (unless ``quiet``) and warns when ``--size`` is not the
    training size the checkpoint names.

    Returns:
        ``(size or None for the original resolution, mean, std, class names
        from --classes or the checkpoint, or None)``.
    """
    from ..core.images import IMAGENET_MEAN, IMAGENET_STD, parse_size

    src = f"from {Path(args.checkpoint).name}" if args.checkpoint is not None else ""
    has = meta is not None
    if args.size is not None:
        size, size_from = parse_size(args.size), "--size"
        trained = meta.image_size if meta is not None else None
        if trained is not None and size != trained:
            shown = "none (original resolution)" if size is None else f"{size[0]}x{size[1]}"
            print(f"warning: --size {shown} differs from the training size "
                  f"{trained[0]}x{trained[1]} stored in {args.checkpoint}; predictions and maps "
                  "at another size can differ (omit --size to use the training size)",
                  file=sys.stderr)
    elif meta is not None and meta.image_size is not None:
        size, size_from = meta.image_size, src
    else:
        size, size_from = (224, 224), "default"
    mean_std = []
    for flag, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        text = getattr(args, flag)
        stored = getattr(meta, flag) if has else None
        if text is not None:
            mean_std.append((float_list(text, flag), f"--{flag}"))
        elif stored is not None:
            mean_std.append((list(stored), src))
        else:
            mean_std.append((list(default), "ImageNet default"))
    (mean, mean_from), (std, std_from) = mean_std
    classes = parse_class_names(args.classes, None)
    classes_from = "--classes" if classes is not None else ""
    if classes is None and meta is not None and meta.class_names is not None:
        classes, classes_from = list(meta.class_names), src
    if not quiet:
        size_text = "original resolution" if size is None else f"{size[0]}x{size[1]}"
        same = mean_from == std_from
        norm = (f"mean/std {_nums(mean)} / {_nums(std)} ({mean_from})" if same else
                f"mean {_nums(mean)} ({mean_from}), std {_nums(std)} ({std_from})")
        names = (f", classes {','.join(classes)} ({classes_from})" if classes is not None
                 else "")
        print(f"settings: size {size_text} ({size_from}), {norm}{names}", file=sys.stderr)
    return size, mean, std, classes


def _nums(vals: Sequence[float]) -> str:
    return ",".join(f"{v:.4g}" for v in vals)


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

