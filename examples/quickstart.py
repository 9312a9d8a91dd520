"""Quick start: every layer's Grad-CAM of a random-init ResNet-18, one pass.

Prints the per-layer table and saves the maps (``LayerMaps.save``). Runs
offline: no weights are downloaded (random init), the image is synthetic.

    python examples/quickstart.py --out out/quickstart
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision

import camanim


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--arch", default="resnet18", help="torchvision model name")
    ap.add_argument(
        "--method", default="gradcam", help=f"one of {', '.join(camanim.method_names())}"
    )
    ap.add_argument("--layers", default="conv", help="conv, all or blocks")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--out", default="out/quickstart")
    args = ap.parse_args()

    print(f"note: {args.arch} with random weights (offline quick start)")
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.arch, weights=None).eval()
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, args.size), torch.linspace(-1, 1, args.size), indexing="ij"
    )
    blob = torch.exp(-((xx - 0.3) ** 2 + (yy + 0.2) ** 2) / 0.1)
    image = torch.stack([blob, 1 - blob, blob * 0.5])[None]

    maps = camanim.CAManim(model, args.method, args.layers)(image)
    print(f"{len(maps)} layers, target class {int(maps.targets[0])}")
    print(f"{'#':>3}  {'layer':<28} {'type':<12} {'map':>9} {'params':>9} {'peak':>10} {'ms':>7}")
    for i, (info, raw, sec) in enumerate(zip(maps.layers, maps.raw, maps.seconds, strict=False)):
        h, w = raw.shape[1:]
        print(f"{i:>3}  {info.name:<28} {info.type:<12} {f'{h}x{w}':>9} {info.params:>9} "
              f"{float(raw.max()):>10.3g} {1000 * sec:>7.2f}")
    path = maps.save(Path(args.out) / "maps.npz")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
