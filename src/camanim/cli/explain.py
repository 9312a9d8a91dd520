"""``camanim explain``: videos, contact sheet, summary and ybROAD for images."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.checkpoint import checkpoint_meta
from ..core.images import load_image, to_model_input
from ..errors import CAManimError
from .common import (
    check_class_count,
    input_settings,
    layer_selector,
    max_layers,
    norm_list,
    prepare_out,
    stems,
    target_index,
    torch_device,
)
from .models import build_model, in_channels, n_outputs


def _out(*parts: Any) -> None:
    """A result line: stdout (``camanim explain ... > log`` keeps it)."""
    print(*parts, flush=True)


@dataclass
class _Run:
    """What every image of one ``explain`` call shares."""

    args: argparse.Namespace
    out: Path
    device: torch.device
    model: torch.nn.Module
    anim: Any
    size: tuple[int, int] | None
    mean: list[float]
    std: list[float]
    channels: int
    classes: list[str] | None
    target: int | None
    n_out: int | None
    norms: list[str]
    label: str

    def class_name(self, k: int | None) -> str | None:
        """The name of class ``k`` when known."""
        c = self.classes
        return c[k] if c and k is not None and 0 <= k < len(c) else None


def _check_options(args: argparse.Namespace) -> None:
    """Every option a run cannot fix later, before any heavy work."""
    if args.fps <= 0:
        raise CAManimError(f"--fps must be > 0, got {args.fps}")
    if not 0 <= args.alpha <= 1:
        raise CAManimError(f"--alpha must be within 0..1, got {args.alpha}")
    if args.hold_last < 0:
        raise CAManimError(f"--hold-last must be >= 0, got {args.hold_last}")
    from ..viz.overlay import colormap_lut

    colormap_lut(args.colormap)


def _setup(args: argparse.Namespace, first_rgb: Any) -> _Run:
    """The output folder, the settings (flags, checkpoint, defaults), the model and its CAManim."""
    from ..engine import CAManim
    from ..methods import get_method

    quiet = args.quiet
    norms = norm_list(args.norm)
    n_layers = max_layers(args.max_layers)
    _check_options(args)
    out: Path = prepare_out(args.out)       # the output folder writable before any work
    device = torch_device(args.device)
    meta = checkpoint_meta(args.checkpoint) if args.checkpoint is not None else None
    size, mean, std, classes = input_settings(args, meta, quiet)
    model, categories = build_model(args.model, args.weights, args.checkpoint, args.num_classes,
                                    quiet, seed=args.seed)
    model = model.to(device)
    channels = in_channels(model)
    n_out = n_outputs(model, to_model_input(first_rgb, size, mean, std, channels).to(device))
    check_class_count(classes, n_out, args.classes is not None)
    classes = classes if classes is not None else categories
    target = target_index(args.target, classes, n_out)
    random_init = (args.weights.lower() == "none" and args.checkpoint is None
                   and ":" not in args.model)
    label = f"{args.model} (random weights)" if random_init else args.model
    # Integrated Grad-CAM's black baseline is (0 - mean) / std: the images' normalization
    ig: dict[str, Any] = (dict(mean=mean, std=std)
                          if get_method(args.method).name == "integrated-gradcam" else {})
    anim = CAManim(model, method=args.method, layers=layer_selector(args.layers),
                   max_layers=n_layers, seed=args.seed, progress=not quiet, **ig)
    return _Run(args=args, out=out, device=device, model=model, anim=anim, size=size, mean=mean,
                std=std, channels=channels, classes=classes, target=target, n_out=n_out,
                norms=norms, label=label)


def cmd_explain(args: argparse.Namespace) -> int:
    """``camanim explain``: see the module docstring."""
    from tqdm.auto import tqdm

    paths = [Path(p) for p in args.images]
    rgbs = [load_image(p) for p in paths]  # every image readable before any work
    run = _setup(args, rgbs[0])
    written: list[Path] = []
    for k, (path, stem, rgb) in enumerate(tqdm(list(zip(paths, stems(paths), rgbs, strict=True)),
                                               desc="images", unit="image",
                                               disable=args.quiet or len(paths) < 2)):
        written += _explain_image(run, path, stem, rgb, first=k == 0)
    if not args.quiet:
        _out(f"\nwrote {len(written)} files to {run.out}/:")
        for p in written:
            _out(f"  {p}")
    return 0


def _road_files(run: _Run, x: torch.Tensor, maps: Any, stem: str) -> tuple[Any, Any, list[Path]]:
    """ybROAD of every layer and the chance line (a seeded random map's ROAD); CSV, plot, JSON."""
    from ..metrics.convergence import chance_road
    from ..metrics.road import ybroad

    args, out = run.args, run.out
    road = ybroad(run.model, x, maps, targets=maps.targets, seed=args.seed,
                  progress=not args.quiet)
    chance = chance_road(run.model, x, maps.targets, seed=args.seed, logits=maps.logits)
    road.to_json(out / f"{stem}_ybroad.json")      # each writer is atomic itself
    files = [road.to_csv(out / f"{stem}_ybroad.csv"),
             road.plot(out / f"{stem}_ybroad.png", title=f"ybROAD · {stem} · {run.label}",
                       chance=chance),
             out / f"{stem}_ybroad.json"]
    return road, chance, files


def _explain_image(run: _Run, path: Path, stem: str, rgb: Any, first: bool) -> list[Path]:
    """Maps, videos, contact sheet, ybROAD and summary of one image; the files written."""
    from ..viz.figures import contact_sheet, plot_params
    from ..viz.video import write_video

    args, out, quiet = run.args, run.out, run.args.quiet
    x = to_model_input(rgb, run.size, run.mean, run.std, run.channels).to(run.device)
    t0 = time.perf_counter()
    maps = run.anim(x, None if run.target is None else [run.target])
    cam_s = time.perf_counter() - t0
    road = chance = None
    written: list[Path] = []
    if args.road:
        road, chance, written = _road_files(run, x, maps, stem)
    ext = "" if args.format == "png" else f".{args.format}"
    render = dict(fps=args.fps, road=road, hold_last=args.hold_last, colormap=args.colormap,
                  alpha=args.alpha, class_names=run.classes, title=run.label,
                  progress=not quiet)
    for norm in run.norms:
        written.append(write_video(out / f"{stem}_{norm}{ext}", rgb, maps,
                                   normalization=norm, **render))  # type: ignore[arg-type]
    sheet_norms = [n for n in ("local", "global") if n in run.norms or "both" in run.norms]
    tgt = int(maps.targets[0]) if maps.targets is not None else None
    target_label = f"{run.class_name(tgt)} ({tgt})" if run.class_name(tgt) else f"class {tgt}"
    written.append(contact_sheet(out / f"{stem}_contact_sheet.png", rgb, maps,
                                 normalization=sheet_norms, road=road,
                                 colormap=args.colormap, alpha=args.alpha,
                                 title=f"{run.label} · {maps.method} · {stem} · target "
                                       f"{target_label}"))
    if first:
        total = sum(p.numel() for p in run.model.parameters())
        written.append(plot_params(out / "layer_params.png", maps,
                                   title=f"{args.model}: parameters of the {len(maps)} drawn "
                                         f"layers (total {total:,} in the model)"))
    if args.save_maps:
        written.append(maps.save(out / f"{stem}_maps.npz"))
    written.append(_summary(run, path, stem, rgb, x, maps, cam_s, road, chance))
    return written


def _summary(run: _Run, path: Path, stem: str, rgb: Any, x: torch.Tensor, maps: Any,
             cam_s: float, road: Any, chance: Any) -> Path:
    """``<stem>_summary.json``; printed (stdout) unless ``--quiet``, with a
    note (stderr) when the model predicts another class than the one explained."""
    from ..viz.figures import format_summary, run_summary, write_summary

    args = run.args
    probs = None
    if run.n_out:
        with torch.no_grad():
            logits = maps.logits if maps.logits is not None else run.model(x)
        probs = torch.softmax(logits.float(), dim=-1)[0]
    pred = int(probs.argmax()) if probs is not None else None
    tgt = int(maps.targets[0]) if maps.targets is not None else None
    if (run.target is not None and pred is not None and probs is not None
            and pred != run.target and not args.quiet):
        def name(k: int) -> str:
            return run.class_name(k) or f"class {k}"

        print(f"note: {path.name}: the model predicts {name(pred)} (p {float(probs[pred]):.2f}); "
              f"the maps explain {name(run.target)} (p {float(probs[run.target]):.2f}), as "
              "--target asks", file=sys.stderr)
    summary: dict[str, Any] = {
        "image": str(path), "model": args.model,
        "weights": args.weights if args.checkpoint is None else str(args.checkpoint),
        "device": str(run.device), "image_size": [int(rgb.shape[0]), int(rgb.shape[1])],
        "target": tgt, "target_name": run.class_name(tgt),
        "predicted": pred, "predicted_prob": float(probs[pred]) if probs is not None else None,
        "layer_selector": args.layers or run.anim.layers, "normalizations": run.norms}
    summary.update(run_summary(maps, run.model, seconds=cam_s))
    summary["layer_table"] = [
        {"index": i, "name": info.name, "type": info.type,
         "output_shape": list(info.output_shape), "params": info.params_total,
         "seconds": maps.seconds[i] if maps.seconds else None}
        for i, info in enumerate(maps.layers)]
    if road is not None:
        summary["ybroad"] = road.summary(chance=chance)[0].to_dict()
    written = write_summary(run.out / f"{stem}_summary.json", summary)
    if not args.quiet:
        _out(f"\n{path}:")
        _out(format_summary({k: v for k, v in summary.items()
                             if not isinstance(v, (list, dict))
                             or k in ("input_size", "image_size")}))
        if road is not None:
            _out(f"ybROAD: {summary['ybroad']['verdict']}")
    return written
