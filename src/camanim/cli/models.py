"""Building the model a ``camanim`` subcommand explains: torchvision names,
``timm:NAME`` (random weights, nothing downloaded) or ``module:callable``,
torchvision weights, checkpoints (Lightning or plain state dicts, read
without pickle)."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CAManimError


def import_callable(spec: str) -> Any:
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
        raise CAManimError(
            f"no weights {weights!r} for {name}; choose one of {names} or none"
        ) from None


def build_model(spec: str, weights: str = "none", checkpoint: Path | None = None,
                num_classes: int | None = None, quiet: bool = False,
                seed: int = 0) -> tuple[nn.Module, list[str] | None]:
    """The model named by ``spec`` and the class names known for it.

    Args:
        spec: torchvision model name, ``timm:NAME`` or ``module:callable`` /
            ``file.py:callable``.
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


def timm_model(name: str, num_classes: int | None = None) -> nn.Module:
    """A timm model with random weights (``pretrained=False``: nothing is
    downloaded), built for any input size where the architecture allows it
    (``dynamic_img_size=True``; the same parameters either way)."""
    try:
        import timm
    except ImportError:
        raise CAManimError(f"--model timm:{name} needs timm: pip install 'camanim[timm]'") from None
    available = timm.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise CAManimError(f"unknown timm model {name!r}{hint} (timm.list_models() lists them)")
    kw: dict[str, Any] = {} if num_classes is None else {"num_classes": int(num_classes)}
    try:
        return timm.create_model(name, pretrained=False, dynamic_img_size=True, **kw)
    except TypeError:  # an architecture without a dynamic input size
        pass
    try:
        return timm.create_model(name, pretrained=False, **kw)
    except Exception as e:  # noqa: BLE001 - timm's constructor failed: say which and why
        raise CAManimError(f"timm could not build {name}: {type(e).__name__}: {e}") from None


def _build_model(spec: str, weights: str, checkpoint: Path | None, num_classes: int | None,
                 quiet: bool) -> tuple[nn.Module, list[str] | None]:
    import torchvision

    categories: list[str] | None = None
    if spec.startswith("timm:"):
        if weights.lower() != "none":
            raise CAManimError("--weights applies to torchvision models; timm models are built "
                               "with random weights (nothing is downloaded): load trained "
                               "weights with --checkpoint FILE")
        model = timm_model(spec[len("timm:"):], num_classes)
        if checkpoint is None and not quiet:
            print(f"note: {spec} has random weights: the maps show an untrained network. "
                  "Pass --checkpoint FILE for a trained one.", file=sys.stderr)
    elif ":" in spec:
        if weights.lower() != "none":
            raise CAManimError("--weights applies to torchvision models; load a "
                               "module:callable model's weights with --checkpoint")
        fn = import_callable(spec)
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
        if (
            w is not None
            and num_classes is not None
            and num_classes != len(w.meta.get("categories", []))
        ):
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


def n_outputs(model: nn.Module, x: torch.Tensor) -> int | None:
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
    if path.is_dir():
        raise CAManimError(f"--checkpoint {path} is a folder; pass the checkpoint file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own advice does not apply here
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # tensors only: camanim never runs pickled code from a checkpoint
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" (e.g. a {found.group(1)})" if found else ""
        raise CAManimError(
            f"{path} holds Python objects besides tensors{what}, which camanim does not load "
            "(that would run code from the file); save the weights alone, e.g. "
            "torch.save(model.state_dict(), 'weights.pt')") from None
    except Exception:  # noqa: BLE001 - a damaged or foreign file fails in many ways
        raise CAManimError(
            f"{path} is not a PyTorch checkpoint (empty, cut short, or another format); pass "
            "a file written by torch.save(model.state_dict(), ...) or a Lightning .ckpt") from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
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


def load_checkpoint(
    model: nn.Module, path: Path, spec: str = "", num_classes: int | None = None
) -> nn.Module:
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
            key = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {key}: checkpoint "
                         f"{tuple(sd[key].shape)} vs model {tuple(own[key].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise CAManimError(f"{path} does not fit --model {spec}: {'; '.join(parts)}. "
                           "Check --model (and --num-classes) match the trained network")
    model.load_state_dict(sd)
    return model


def in_channels(model: nn.Module) -> int:
    from ..core.inputs import expected_channels

    return expected_channels(model) or 3


