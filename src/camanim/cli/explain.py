"""``camanim explain``: videos, contact sheet, summary and ybROAD for images."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core.images import load_image, parse_size, to_model_input
from ..errors import CAManimError
from .common import (
    float_list,
    layer_selector,
    norm_list,
    parse_class_names,
    prepare_out,
    stems,
    target_index,
    torch_device,
)
from .models import build_model, in_channels, n_outputs


def cmd_explain(args: argparse.Namespace) -> int:
    """``camanim explain``: see the module docstring."""
    from ..engine import CAManim
    from ..viz.figures import contact_sheet, format_summary, plot_params, run_summary, write_summary
    from ..viz.video import write_video

    quiet = args.quiet
    say = (lambda *_: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    norms = norm_list(args.norm)
    size = parse_size(args.size)
    mean, std = float_list(args.mean, "mean"), float_list(args.std, "std")
    if args.fps <= 0:
        raise CAManimError(f"--fps must be > 0, got {args.fps}")
    if args.max_layers is not None and args.max_layers < 1:
        raise CAManimError(f"--max-layers must be >= 1, got {args.max_layers}")
    if not 0 <= args.alpha <= 1:
        raise CAManimError(f"--alpha must be within 0..1, got {args.alpha}")
    if args.hold_last < 0:
        raise CAManimError(f"--hold-last must be >= 0, got {args.hold_last}")
    from ..viz.overlay import colormap_lut

    colormap_lut(args.colormap)  # fail before the heavy work
    paths = [Path(p) for p in args.images]
    rgbs = [load_image(p) for p in paths]  # every image readable before any work
    out: Path = prepare_out(args.out)       # and the output folder writable
    device = torch_device(args.device)

    model, categories = build_model(args.model, args.weights, args.checkpoint, args.num_classes,
                                    quiet, seed=args.seed)
    model = model.to(device)
    classes = parse_class_names(args.classes, categories)
    channels = in_channels(model)
    n_out = n_outputs(model, to_model_input(rgbs[0], size, mean, std, channels).to(device))
    target = target_index(args.target, classes, n_out)
    road_fn: Callable[..., Any] | None = None
    if args.road:
        try:
            from ..metrics.road import ybroad
        except ImportError:
            raise CAManimError("--road: ybROAD is not available in this installation") from None
        road_fn = ybroad

    random_init = (
        args.weights.lower() == "none" and args.checkpoint is None and ":" not in args.model
    )
    label = f"{args.model} (random weights)" if random_init else args.model
    from ..methods import get_method
    # Integrated Grad-CAM's black baseline is (0 - mean) / std: the images' normalization
    ig: dict[str, Any] = {}
    if get_method(args.method).name == "integrated-gradcam":
        ig = dict(mean=mean, std=std)
    anim = CAManim(model, method=args.method, layers=layer_selector(args.layers),
                   max_layers=args.max_layers, seed=args.seed, progress=not quiet, **ig)
    ext = "" if args.format == "png" else f".{args.format}"
    written: list[Path] = []
    params_done = False
    from tqdm.auto import tqdm

    for path, stem, rgb in tqdm(list(zip(paths, stems(paths), rgbs, strict=False)), desc="images",
                                unit="image", disable=quiet or len(paths) < 2):
        x = to_model_input(rgb, size, mean, std, channels).to(device)
        t0 = time.perf_counter()
        maps = anim(x, None if target is None else [target])
        cam_s = time.perf_counter() - t0
        if n_out:
            with torch.no_grad():
                logits = maps.logits if maps.logits is not None else model(x)
            probs = torch.softmax(logits.float(), dim=-1)[0]
        else:
            probs = None
        road = None
        if road_fn is not None:
            road = road_fn(model, x, maps, targets=maps.targets, seed=args.seed, progress=not quiet)
            # each writer is atomic itself (temporary name, then rename)
            road.to_json(out / f"{stem}_ybroad.json")
            written += [road.to_csv(out / f"{stem}_ybroad.csv"),
                        road.plot(out / f"{stem}_ybroad.png", title=f"ybROAD · {stem} · {label}"),
                        out / f"{stem}_ybroad.json"]
        render = dict(fps=args.fps, road=road, hold_last=args.hold_last, colormap=args.colormap,
                      alpha=args.alpha, class_names=classes, title=label, progress=not quiet)
        for norm in norms:
            written.append(write_video(out / f"{stem}_{norm}{ext}", rgb, maps,
                                       normalization=norm, **render))  # type: ignore[arg-type]
        sheet_norms = [n for n in ("local", "global") if n in norms or "both" in norms]
        tgt = int(maps.targets[0]) if maps.targets is not None else None
        target_label = (
            f"{classes[tgt]} ({tgt})"
            if classes and tgt is not None and tgt < len(classes)
            else f"class {tgt}"
        )
        written.append(
            contact_sheet(
                out / f"{stem}_contact_sheet.png",
                rgb,
                maps,
                normalization=sheet_norms,
                road=road,
                colormap=args.colormap,
                alpha=args.alpha,
                title=f"{label} · {maps.method} · {stem} · target {target_label}",
            )
        )
        if not params_done:
            written.append(
                plot_params(
                    out / "layer_params.png",
                    maps,
                    title=f"{args.model}: parameters of the {len(maps)} drawn layers "
                    f"(total {sum(p.numel() for p in model.parameters()):,} in the model)",
                )
            )
            params_done = True
        if args.save_maps:
            written.append(maps.save(out / f"{stem}_maps.npz"))
        pred = int(probs.argmax()) if probs is not None else None
        summary: dict[str, Any] = {
            "image": str(path),
            "model": args.model,
            "weights": args.weights if args.checkpoint is None else str(args.checkpoint),
            "device": str(device),
            "image_size": [int(rgb.shape[0]), int(rgb.shape[1])],
            "target": tgt,
            "target_name": classes[tgt]
            if classes and tgt is not None and tgt < len(classes)
            else None,
            "predicted": pred,
            "predicted_prob": float(probs[pred]) if probs is not None else None,
            "layer_selector": args.layers or anim.layers,
            "normalizations": norms,
        }
        summary.update(run_summary(maps, model, seconds=cam_s))
        summary["layer_table"] = [
            {
                "index": i,
                "name": info.name,
                "type": info.type,
                "output_shape": list(info.output_shape),
                "params": info.params_total,
                "seconds": maps.seconds[i] if maps.seconds else None,
            }
            for i, info in enumerate(maps.layers)
        ]
        if road is not None:
            summary["ybroad"] = road.summary()[0].to_dict()
        written.append(write_summary(out / f"{stem}_summary.json", summary))
        if not quiet:
            say(f"\n{path}:")
            say(
                format_summary(
                    {
                        k: v
                        for k, v in summary.items()
                        if not isinstance(v, (list, dict)) or k in ("input_size", "image_size")
                    }
                )
            )
    if not quiet:
        say(f"\nwrote {len(written)} files to {out}/:")
        for p in written:
            say(f"  {p}")
    return 0



