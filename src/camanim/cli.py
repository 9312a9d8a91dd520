"""The ``camanim`` command.

``camanim explain IMAGE... --model NAME`` writes, for every image, a CAManim
video per normalization, a contact sheet of every 10th-percentile layer, a
run summary (JSON) and with ``--road`` the ybROAD CSV, plot and summary.
``camanim layers --model NAME`` lists the layers a CAM can be drawn for.

Bad arguments, unreadable images, unknown models and every `CAManimError`
end with exit status 2 and a one-line message (no traceback).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .errors import CAManimError
from .images import IMAGENET_MEAN, IMAGENET_STD, load_image, parse_size, to_model_input

NORMS = ("local", "global", "both")
FORMATS = ("mp4", "webm", "gif", "png")


# ------------------------------------------------------------------ parser

class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="NAME|module:callable",
                   help="a torchvision model name (resnet50, densenet161, ...) or an importable "
                        "'package.module:callable' / 'path/to/file.py:callable' returning an nn.Module")
    p.add_argument("--num-classes", type=int, default=None, metavar="K",
                   help="output classes of a torchvision model (default: 1000; explain: or what --checkpoint holds)")


def build_parser() -> argparse.ArgumentParser:
    """The ``camanim`` argument parser (subcommands ``explain`` and ``layers``)."""
    parser = _Parser(prog="camanim", description="Class activation maps through every layer "
                     "of a CNN (CAManim), scored with ROAD (ybROAD).")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"camanim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{explain,layers,study}")

    ex = sub.add_parser("explain", help="CAManim videos, contact sheet and summary for images",
                        description="Write a CAManim video per image and normalization, a "
                        "contact sheet of every 10th-percentile layer, a run summary (JSON) and "
                        "with --road the ybROAD CSV, plot and summary.")
    ex.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    _model_args(ex)
    ex.add_argument("--weights", default="none", metavar="DEFAULT|none|NAME",
                    help="torchvision weights: none (random init, the offline default), DEFAULT, "
                         "or a weights name like IMAGENET1K_V2")
    ex.add_argument("--checkpoint", type=Path, default=None, metavar="FILE",
                    help="a state dict or Lightning checkpoint to load into the model")
    ex.add_argument("--method", default="gradcam", help="CAM method (default gradcam)")
    ex.add_argument("--layers", default=None, metavar="SEL",
                    help="conv, all, blocks, or comma-separated layer names (default: the "
                         "method's own, conv; blocks for sise and ada-sise)")
    ex.add_argument("--max-layers", type=int, default=None, metavar="N",
                    help="keep at most N evenly spaced layers")
    ex.add_argument("--target", default="auto", metavar="auto|INT|NAME",
                    help="class to explain: auto (predicted), an index, or a class name")
    ex.add_argument("--classes", default=None, metavar="A,B,...|FILE",
                    help="class names (comma-separated or a file, one per line); default: the "
                         "torchvision weights' categories when the class count matches")
    ex.add_argument("--norm", default="local,global", metavar="local,global,both",
                    help="normalizations, one video each; 'both' = side by side (default local,global)")
    ex.add_argument("--size", default="224", metavar="224|HxW|none",
                    help="model input size; none keeps the original resolution (default 224)")
    ex.add_argument("--mean", default=",".join(map(str, IMAGENET_MEAN)), metavar="M,M,M",
                    help="input normalization mean (default ImageNet)")
    ex.add_argument("--std", default=",".join(map(str, IMAGENET_STD)), metavar="S,S,S",
                    help="input normalization std (default ImageNet)")
    ex.add_argument("--out", type=Path, default=Path("camanim_out"), metavar="DIR",
                    help="output folder (default camanim_out)")
    ex.add_argument("--format", default="mp4", choices=FORMATS,
                    help="video format: mp4 (default), webm, gif, or png (a folder of frames)")
    ex.add_argument("--fps", type=float, default=8.0, help="frames (layers) per second (default 8)")
    ex.add_argument("--hold-last", type=int, default=0, metavar="N",
                    help="show the last layer N frames longer (default 0)")
    ex.add_argument("--colormap", default="jet", help="matplotlib colormap (default jet)")
    ex.add_argument("--alpha", type=float, default=0.5, help="heatmap weight (default 0.5)")
    ex.add_argument("--road", action="store_true", help="also score every layer with ROAD (ybROAD)")
    ex.add_argument("--save-maps", action="store_true",
                    help="also save the raw maps (LayerMaps .npz) for re-rendering")
    ex.add_argument("--seed", type=int, default=0,
                    help="seed of random init (--weights none), random CAM methods and ROAD noise")
    ex.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default cpu")
    ex.add_argument("--quiet", "-q", action="store_true", help="no progress bars or notes")
    ex.set_defaults(func=cmd_explain)

    ly = sub.add_parser("layers", help="list the layers of a model a CAM can be drawn for",
                        description="Table of the layers a selector picks (index, name, type, "
                        "output shape, parameters, layout) and those it skips, with the reason.")
    _model_args(ly)
    ly.add_argument("--layers", default="all", metavar="SEL",
                    help="conv, all (default), blocks, or comma-separated layer names")
    ly.add_argument("--size", default="224", metavar="224|HxW", help="example input size (default 224)")
    ly.set_defaults(func=cmd_layers)
    from .study import add_study_parser
    add_study_parser(sub)
    return parser


# ------------------------------------------------------------------ models

def _import_callable(spec: str) -> Any:
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise CAManimError(f"bad model {spec!r}: use a torchvision name or 'module:callable'")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.exists():
                raise CAManimError(f"no Python file at {path} (from --model {spec})")
            name = f"_camanim_user_{abs(hash(str(path.resolve())))}"
            loader = importlib.util.spec_from_file_location(name, path)
            if loader is None or loader.loader is None:
                raise CAManimError(f"cannot import {path}")
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module
            loader.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # like `python -m`: local modules import
            module = importlib.import_module(mod_name)
    except CAManimError:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise CAManimError(f"cannot import {mod_name!r} (from --model {spec}): "
                           f"{type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise CAManimError(f"module {mod_name!r} has no {attr!r} (from --model {spec})")
    return fn


def _torchvision_weights(name: str, weights: str) -> Any:
    """The torchvision weights enum member, or ``None`` for ``none``."""
    from torchvision.models import get_model_weights

    if weights.lower() == "none":
        return None
    try:
        enum = get_model_weights(name)
    except ValueError:
        return None
    try:
        return enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        names = ", ".join(["DEFAULT"] + [w.name for w in enum])
        raise CAManimError(f"no weights {weights!r} for {name}; choose one of {names} or none") from None


def build_model(spec: str, weights: str = "none", checkpoint: Path | None = None,
                num_classes: int | None = None, quiet: bool = False,
                seed: int = 0) -> tuple[nn.Module, list[str] | None]:
    """The model named by ``spec`` and the class names known for it.

    Args:
        spec: torchvision model name or ``module:callable`` / ``file.py:callable``.
        weights: ``none`` (random init), ``DEFAULT`` or a torchvision weights name.
        checkpoint: a state dict or Lightning checkpoint to load.
        num_classes: output classes (torchvision models; passed to a callable).
        quiet: no notes on stderr.
        seed: random init is drawn from this seed (the global RNG is left
            as it was), so runs are reproducible.

    Returns:
        (model in eval mode, class names or ``None``).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_model(spec, weights, checkpoint, num_classes, quiet)


def _build_model(spec: str, weights: str, checkpoint: Path | None, num_classes: int | None,
                 quiet: bool) -> tuple[nn.Module, list[str] | None]:
    import torchvision

    categories: list[str] | None = None
    if ":" in spec:
        if weights.lower() != "none":
            raise CAManimError("--weights applies to torchvision models; load a "
                               "module:callable model's weights with --checkpoint")
        fn = _import_callable(spec)
        try:
            model = fn(num_classes=num_classes) if num_classes is not None else fn()
        except Exception as e:  # noqa: BLE001 - the user's constructor failed
            raise CAManimError(f"{spec}() failed: {type(e).__name__}: {e}") from None
        if not isinstance(model, nn.Module):
            raise CAManimError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    else:
        available = torchvision.models.list_models()
        if spec not in available:
            close = difflib.get_close_matches(spec, available, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CAManimError(f"unknown model {spec!r}{hint} (any torchvision.models name, "
                               "or module:callable)")
        w = _torchvision_weights(spec, weights)
        kwargs: dict[str, Any] = {}
        if num_classes is not None:
            kwargs["num_classes"] = int(num_classes)
        if w is not None and num_classes is not None and num_classes != len(w.meta.get("categories", [])):
            raise CAManimError(f"--weights {weights} has {len(w.meta['categories'])} classes, not "
                               f"--num-classes {num_classes}; use --weights none with --checkpoint")
        try:
            model = torchvision.models.get_model(spec, weights=w, **kwargs)
        except OSError as e:  # URLError is an OSError: no network, no cache
            from torch.hub import get_dir

            raise CAManimError(
                f"could not fetch the {w} weights for {spec} ({e}); this machine may be offline. "
                f"Put the file in {get_dir()}/checkpoints, or pass a local file with "
                f"--checkpoint FILE (and --weights none)") from None
        if w is None and checkpoint is None and not quiet:
            print(f"note: {spec} has random weights (--weights none): the maps show an untrained "
                  "network. Pass --weights DEFAULT or --checkpoint FILE for a trained one.",
                  file=sys.stderr)
        meta = (w or _torchvision_weights(spec, "DEFAULT"))
        categories = list(meta.meta.get("categories") or []) if meta is not None else None
    if checkpoint is not None:
        model = load_checkpoint(model, checkpoint, spec=spec, num_classes=num_classes)
    n_out = _last_linear(model)
    if categories is not None and n_out is not None and n_out != len(categories):
        categories = None
    return model.eval(), categories


def _last_linear(model: nn.Module) -> int | None:
    """``out_features`` of the last ``nn.Linear`` (the usual classifier head)."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = int(m.out_features)
    return last


def _n_outputs(model: nn.Module, x: torch.Tensor) -> int | None:
    """Classes of a classifier ``(B, C, H, W) -> (B, K)``, from one forward."""
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # noqa: BLE001 - report the model's failure plainly
        raise CAManimError(f"the model failed on an input of shape {tuple(x.shape)}: "
                           f"{type(e).__name__}: {e}. Check --size and the model") from None
    return int(out.shape[-1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CAManimError(f"no checkpoint file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CAManimError(
            f"cannot load {path} safely (torch.load weights_only=True): {first[:200]}. "
            "Save the weights alone, e.g. torch.save(model.state_dict(), 'weights.pt')") from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CAManimError(f"{path} holds no state dict (a dict of tensors, optionally under "
                           "'state_dict' as in Lightning checkpoints)")
    return obj


def _strip_prefix(sd: dict[str, torch.Tensor], want: set[str]) -> dict[str, torch.Tensor]:
    """Drop the prefix (``model.``, ``module.``, ...) that makes most keys match."""
    best, best_hits = sd, len(want & set(sd))
    prefixes = {k.split(".", 1)[0] + "." for k in sd if "." in k}
    for p in sorted(prefixes):
        cand = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
        hits = len(want & set(cand))
        if hits > best_hits:
            best, best_hits = cand, hits
    return best


def load_checkpoint(model: nn.Module, path: Path, spec: str = "", num_classes: int | None = None) -> nn.Module:
    """Load a state dict or Lightning checkpoint into ``model``.

    A torchvision model whose only mismatch is the classifier's class count
    is rebuilt with the checkpoint's count (a fine-tuned head).
    """
    sd = _strip_prefix(_read_state_dict(Path(path)), set(model.state_dict()))
    own = model.state_dict()
    wrong = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    if wrong and ":" not in spec and num_classes is None:
        heads = [k for k in wrong if own[k].dim() in (1, 2) and sd[k].shape[1:] == own[k].shape[1:]]
        if heads == wrong and len({int(sd[k].shape[0]) for k in wrong}) == 1:
            import torchvision

            k = int(sd[wrong[0]].shape[0])
            model = torchvision.models.get_model(spec, weights=None, num_classes=k)
            own = model.state_dict()
            wrong = []
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if wrong or missing or unexpected:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k}: checkpoint "
                         f"{tuple(sd[k].shape)} vs model {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise CAManimError(f"{path} does not fit --model {spec}: {'; '.join(parts)}. "
                           "Check --model (and --num-classes) match the trained network")
    model.load_state_dict(sd)
    return model


def _in_channels(model: nn.Module) -> int:
    from .inputs import expected_channels

    return expected_channels(model) or 3


# ------------------------------------------------------------------ parsing

def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CAManimError(f"--{what} must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise CAManimError(f"--{what} is empty")
    return vals


def _layer_selector(text: str | None) -> Any:
    if text is None:
        return None
    text = text.strip()
    if text in ("conv", "all", "blocks"):
        return text
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CAManimError("--layers is empty: use conv, all, blocks or layer names")
    return names


def _norms(text: str) -> list[str]:
    norms = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in norms if n not in NORMS]
    if bad or not norms:
        raise CAManimError(f"--norm {text!r}: use a comma-separated list of {', '.join(NORMS)}")
    return list(dict.fromkeys(norms))


def _class_names(text: str | None, default: list[str] | None) -> list[str] | None:
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


def _target(text: str, classes: list[str] | None, n_out: int | None) -> int | None:
    text = text.strip()
    if text.lower() == "auto":
        return None
    if text.lstrip("-").isdigit():
        k = int(text)
        if k < 0 or (n_out is not None and k >= n_out):
            raise CAManimError(f"--target {k} is out of range: the model has {n_out} classes (0..{(n_out or 1) - 1})")
        return k
    if not classes:
        raise CAManimError(f"--target {text!r}: class names are unknown for this model; pass an "
                           "index, or names with --classes")
    low = [c.lower() for c in classes]
    if text.lower() in low:
        return low.index(text.lower())
    close = difflib.get_close_matches(text.lower(), low, n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(classes[low.index(c)]) for c in close)}?" if close else ""
    raise CAManimError(f"--target {text!r} is not a class name of this model{hint}")


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise CAManimError("--device cuda: CUDA is not available here; use --device cpu")
    return torch.device(name)


def _stems(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = p.stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return out


# ------------------------------------------------------------------ commands

def cmd_explain(args: argparse.Namespace) -> int:
    """``camanim explain``: see the module docstring."""
    from .cam import CAManim
    from .figures import contact_sheet, format_summary, plot_params, run_summary, write_summary
    from .video import write_video

    quiet = args.quiet
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    norms = _norms(args.norm)
    size = parse_size(args.size)
    mean, std = _floats(args.mean, "mean"), _floats(args.std, "std")
    if args.fps <= 0:
        raise CAManimError(f"--fps must be > 0, got {args.fps}")
    if args.max_layers is not None and args.max_layers < 1:
        raise CAManimError(f"--max-layers must be >= 1, got {args.max_layers}")
    if not 0 <= args.alpha <= 1:
        raise CAManimError(f"--alpha must be within 0..1, got {args.alpha}")
    if args.hold_last < 0:
        raise CAManimError(f"--hold-last must be >= 0, got {args.hold_last}")
    from .render import colormap_lut

    colormap_lut(args.colormap)  # fail before the heavy work
    paths = [Path(p) for p in args.images]
    rgbs = [load_image(p) for p in paths]  # every image readable before any work
    device = _device(args.device)

    model, categories = build_model(args.model, args.weights, args.checkpoint, args.num_classes,
                                    quiet, seed=args.seed)
    model = model.to(device)
    classes = _class_names(args.classes, categories)
    channels = _in_channels(model)
    n_out = _n_outputs(model, to_model_input(rgbs[0], size, mean, std, channels).to(device))
    target = _target(args.target, classes, n_out)
    road_fn = None
    if args.road:
        try:
            from .road import ybroad as road_fn
        except ImportError:
            raise CAManimError("--road: ybROAD is not available in this installation") from None

    random_init = args.weights.lower() == "none" and args.checkpoint is None and ":" not in args.model
    label = f"{args.model} (random weights)" if random_init else args.model
    from .methods import get_method
    # Integrated Grad-CAM's black baseline is (0 - mean) / std: the images' normalization
    ig = dict(mean=mean, std=std) if get_method(args.method).name == "integrated-gradcam" else {}
    anim = CAManim(model, method=args.method, layers=_layer_selector(args.layers),
                   max_layers=args.max_layers, seed=args.seed, progress=not quiet, **ig)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ext = "" if args.format == "png" else f".{args.format}"
    written: list[Path] = []
    params_done = False
    from tqdm.auto import tqdm

    for path, stem, rgb in tqdm(list(zip(paths, _stems(paths), rgbs)), desc="images",
                                unit="image", disable=quiet or len(paths) < 2):
        x = to_model_input(rgb, size, mean, std, channels).to(device)
        t0 = time.perf_counter()
        maps = anim(x, None if target is None else [target])
        cam_s = time.perf_counter() - t0
        with torch.no_grad():
            probs = torch.softmax(model(x).float(), dim=-1)[0] if n_out else None
        road = None
        if road_fn is not None:
            road = road_fn(model, x, maps, targets=maps.targets, seed=args.seed, progress=not quiet)
            written += [road.to_csv(out / f"{stem}_ybroad.csv"),
                        road.plot(out / f"{stem}_ybroad.png", title=f"ybROAD · {stem} · {label}")]
            road.to_json(out / f"{stem}_ybroad.json")
            written.append(out / f"{stem}_ybroad.json")
        render = dict(fps=args.fps, road=road, hold_last=args.hold_last, colormap=args.colormap,
                      alpha=args.alpha, class_names=classes, title=label, progress=not quiet)
        for norm in norms:
            written.append(write_video(out / f"{stem}_{norm}{ext}", rgb, maps,
                                       normalization=norm, **render))  # type: ignore[arg-type]
        sheet_norms = [n for n in ("local", "global") if n in norms or "both" in norms]
        tgt = int(maps.targets[0]) if maps.targets is not None else None
        target_label = (f"{classes[tgt]} ({tgt})" if classes and tgt is not None and tgt < len(classes)
                        else f"class {tgt}")
        written.append(contact_sheet(out / f"{stem}_contact_sheet.png", rgb, maps,
                                     normalization=sheet_norms, road=road,
                                     colormap=args.colormap, alpha=args.alpha,
                                     title=f"{label} · {maps.method} · {stem} · target {target_label}"))
        if not params_done:
            written.append(plot_params(out / "layer_params.png", maps,
                                       title=f"{args.model}: parameters of the {len(maps)} drawn layers "
                                             f"(total {sum(p.numel() for p in model.parameters()):,} in the model)"))
            params_done = True
        if args.save_maps:
            written.append(maps.save(out / f"{stem}_maps.npz"))
        pred = int(probs.argmax()) if probs is not None else None
        summary: dict[str, Any] = {
            "image": str(path), "model": args.model,
            "weights": args.weights if args.checkpoint is None else str(args.checkpoint),
            "device": str(device), "image_size": [int(rgb.shape[0]), int(rgb.shape[1])],
            "target": tgt,
            "target_name": classes[tgt] if classes and tgt is not None and tgt < len(classes) else None,
            "predicted": pred, "predicted_prob": float(probs[pred]) if probs is not None else None,
            "layer_selector": args.layers or anim.layers, "normalizations": norms}
        summary.update(run_summary(maps, model, seconds=cam_s))
        summary["layer_table"] = [
            {"index": i, "name": info.name, "type": info.type, "output_shape": list(info.output_shape),
             "params": info.params_total, "seconds": maps.seconds[i] if maps.seconds else None}
            for i, info in enumerate(maps.layers)]
        if road is not None:
            summary["ybroad"] = road.summary()[0].to_dict()
        written.append(write_summary(out / f"{stem}_summary.json", summary))
        if not quiet:
            say(f"\n{path}:")
            say(format_summary({k: v for k, v in summary.items()
                                if not isinstance(v, (list, dict)) or k in ("input_size", "image_size")}))
    if not quiet:
        say(f"\nwrote {len(written)} files to {out}/:")
        for p in written:
            say(f"  {p}")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    """``camanim layers``: print the layer table."""
    from .layers import list_layers

    size = parse_size(args.size)
    if size is None:
        raise CAManimError("camanim layers needs an example size, e.g. --size 224")
    model, _ = build_model(args.model, "none", None, args.num_classes, quiet=True)
    x = torch.zeros(1, _in_channels(model), *size)
    table = list_layers(model, x, layers=_layer_selector(args.layers))
    rows = [(str(i), info.name, info.type, _shape(info.output_shape), f"{info.params_total:,}",
             info.layout) for i, info in enumerate(table.selected)]
    print(_table(("#", "name", "type", "output shape", "params", "layout"), rows))
    print("(output shape per image, as the layout stores it: CxHxW for nchw, HxWxC for nhwc)")
    print(f"\n{len(table.selected)} layers selected by --layers {args.layers} "
          f"({len(table.calls)} module calls in one forward at {size[0]}x{size[1]})")
    if table.skipped:
        print(f"\nskipped ({len(table.skipped)}):")
        rows = [(s.name, s.type, _shape(s.output_shape), s.skipped or "") for s in table.skipped]
        print(_table(("name", "type", "output shape", "reason"), rows))
    return 0


def _shape(shape: Sequence[int]) -> str:
    """Per-image output shape (the batch dimension dropped): ``64x56x56``."""
    return "x".join(str(s) for s in shape[1:]) if len(shape) > 1 else "-"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    right = {"#", "params"}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if h in right else c.ljust(w)
                         for c, w, h in zip(cells, widths, head)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


# ------------------------------------------------------------------ entry

def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``camanim`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed)
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return int(args.func(args) or 0)
    except CAManimError as e:
        print(f"camanim {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("camanim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
