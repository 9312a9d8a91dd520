"""The viewer's data: what the callback writes each epoch for the CAManim tab
and the report, and the checks that read it back (docs/VIEWER.md).

Under a run's output folder, ``viewer/`` holds:

* ``index.json``: method, colour table (pre-scaled by alpha), panel size,
  normalizations, layers, probes and one entry per callback epoch (step,
  targets, ROAD per layer, chance ROAD, map change per layer). Rewritten
  atomically after the epoch's other files, so what it names exists.
* ``bg_<k>.f32``: probe ``k``'s image at panel size as the frames show it,
  ``(H, W, 3)`` float32 little-endian, pre-scaled by ``255 * (1 - alpha)``
  (written once per fit).
* ``maps/e<epoch>_<k>.png``: probe ``k``'s colour-index maps of one epoch,
  a greyscale sprite sheet: one row of panels per layer (``H`` pixels), one
  panel per normalization (``W`` pixels) side by side.

A page draws panel (epoch, layer, normalization) as
``uint8(bg + lut[index] + 0.5)`` in float32: the same numbers
`camanim.viz.overlay.blend` gives the callback's frames, so a clicked map is
the callback's frame panel pixel for pixel (at the viewer's panel size).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..core.files import write_bytes, write_text
from ..core.maps import LayerMaps
from ..errors import CAManimError
from ..viz.overlay import iter_maps
from ..viz.render import FrameRenderer, shape_text

__all__ = ["VIEWER_DIR", "FORMAT", "DEFAULT_PANEL", "write_viewer_epoch", "read_index",
           "sprite_path", "background_path", "find_runs"]

VIEWER_DIR = "viewer"
FORMAT = "camanim-viewer/1"
#: long side of a viewer panel (pixels): 4 probes x 53 layers x 2 maps stay < 3 MiB an epoch
DEFAULT_PANEL = 96
_MAX_DEPTH = 8          # folders below a logdir searched for runs


def sprite_path(vdir: Path, epoch: int, k: int) -> Path:
    """The sprite sheet of probe number ``k`` at ``epoch``."""
    return vdir / "maps" / f"e{int(epoch):05d}_{int(k)}.png"


def background_path(vdir: Path, k: int) -> Path:
    """Probe number ``k``'s pre-scaled background (float32)."""
    return vdir / f"bg_{int(k)}.f32"


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _layers(maps: LayerMaps) -> list[dict]:
    return [{"name": info.name, "type": info.type, "shape": shape_text(info)}
            for info in maps.layers]


def _sprite(maps: LayerMaps, norms: Sequence[str], size: tuple[int, int]) -> list[bytes]:
    """One greyscale PNG per image of the batch: layers down, norms across."""
    ph, pw = size
    sheets = np.zeros((maps.batch_size, len(maps) * ph, len(norms) * pw), np.uint8)
    for j, norm in enumerate(norms):
        for i, idx in enumerate(iter_maps(maps, norm, size, quantize=True)):
            sheets[:, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw] = idx
    out = []
    for sheet in sheets:
        buf = io.BytesIO()
        Image.fromarray(sheet, mode="L").save(buf, format="PNG", compress_level=6)
        out.append(buf.getvalue())
    return out


def _start_index(old: dict | None, head: dict) -> dict:
    """The index to extend: the old one when it describes the same layers,
    normalizations and panel size (a resumed or continued fit), else new."""
    keep = ("layers", "norms", "panel", "method", "lut")
    if old is not None and all(old.get(k) == head[k] for k in keep):
        names = [p["name"] for p in old["probes"]]
        probes = old["probes"] + [p for p in head["probes"] if p["name"] not in names]
        return {**old, "probes": probes}
    return {**head, "epochs": []}


def write_viewer_epoch(out_dir: str | Path, *, epoch: int, step: int, images: Any,
                       maps: LayerMaps, probes: Sequence[str], method: str,
                       road: np.ndarray | None = None, chance: dict | None = None,
                       change: dict | None = None, render: dict | None = None,
                       norms: Sequence[str] = ("local", "global"),
                       panel: int = DEFAULT_PANEL) -> Path:
    """Write one epoch's viewer data under ``out_dir/viewer`` (see the module
    docstring); returns the ``index.json`` path.

    Args:
        out_dir: the run's output folder.
        epoch: the callback epoch.
        step: the trainer's global step.
        images: the probes' input images ``(B, C, H, W)``.
        maps: their `LayerMaps` this epoch.
        probes: the probe names, one per image.
        method: the CAM method's name.
        road: ``(L, B)`` ROAD scores or None.
        chance: probe -> the random map's ROAD this epoch.
        change: probe -> ``(L,)`` map change since the previous callback epoch.
        render: the callback's ``mean``, ``std``, ``class_names``, colormap, alpha.
        norms: the normalizations drawn (local, global, none).
        panel: long side of a map panel in pixels.
    """
    render = dict(render or {})
    norms = [n for n in norms if n in ("local", "global", "none")] or ["local", "global"]
    r = FrameRenderer(images, maps, normalization=norms[0], size=panel,
                      mean=render.get("mean"), std=render.get("std"),
                      colormap=render.get("colormap", "jet"), alpha=render.get("alpha", 0.5))
    size = (r.layout.ph, r.layout.pw)
    vdir = Path(out_dir) / VIEWER_DIR
    classes = render.get("class_names")
    head = {"format": FORMAT, "method": method, "layers": _layers(maps), "norms": list(norms),
            "panel": list(size), "lut": [[float(v) for v in row] for row in r.lut],
            "class_names": list(classes) if classes is not None else None,
            "probes": [{"name": str(p)} for p in probes]}
    old = read_index(vdir, strict=False)
    index = _start_index(old, head)
    kept = old is not None and bool(index["epochs"])
    number = {p["name"]: k for k, p in enumerate(index["probes"])}
    for b, sheet in enumerate(_sprite(maps, norms, size)):
        write_bytes(sprite_path(vdir, epoch, number[str(probes[b])]), sheet)
    for b, p in enumerate(probes):
        bg = background_path(vdir, number[str(p)])
        if not kept or not bg.exists():   # once per run (the probes never change)
            write_bytes(bg, np.ascontiguousarray(r.backgrounds[b], "<f4").tobytes())
    targets = None if maps.targets is None else maps.targets.reshape(-1).tolist()
    entry = {"epoch": int(epoch), "step": int(step), "probes": [str(p) for p in probes],
             "targets": {str(p): None if targets is None else int(targets[b])
                         for b, p in enumerate(probes)},
             "road": {str(p): [_finite(v) for v in road[:, b]] for b, p in enumerate(probes)}
             if road is not None else {},
             "chance": {str(p): _finite(v) for p, v in (chance or {}).items()},
             "change": {str(p): [_finite(v) for v in np.asarray(c).reshape(-1)]
                        for p, c in (change or {}).items() if c is not None}}
    index["epochs"] = sorted([e for e in index["epochs"] if e["epoch"] != int(epoch)] + [entry],
                             key=lambda e: e["epoch"])
    path = vdir / "index.json"
    write_text(path, json.dumps(index, separators=(",", ":")))   # compact: polled by the tab
    return path


def find_runs(logdir: str | Path) -> list[str]:
    """Runs under ``logdir``: the folders holding a ``viewer/`` folder,
    relative to ``logdir`` with ``/`` separators (``"."``: the logdir itself)."""
    root = Path(logdir)
    runs = []
    for here, dirs, _ in os.walk(root):       # does not descend into symlinked folders
        rel = Path(here).relative_to(root)
        if VIEWER_DIR in dirs:
            runs.append(rel.as_posix())
        if len(rel.parts) >= _MAX_DEPTH:
            dirs[:] = []
        dirs[:] = sorted(d for d in dirs if d != VIEWER_DIR and not d.startswith("."))
    return sorted(runs)


def read_index(vdir: str | Path, strict: bool = True) -> dict | None:
    """The checked ``index.json`` of a viewer folder.

    ``strict``: a missing or malformed index raises `CAManimError` naming
    the problem; otherwise it gives None.
    """
    path = Path(vdir) / "index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        problem = check_index(index)
    except FileNotFoundError:
        problem = "it has no index.json yet (no callback epoch has finished)"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problem = f"its index.json is unreadable ({type(e).__name__}: {e})"
    if problem is None:
        return index
    if strict:
        raise CAManimError(f"viewer data in {Path(vdir)}: {problem}")
    return None


def check_index(index: Any) -> str | None:
    """What is wrong with a parsed ``index.json``, or None."""
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        return f"its index.json is not {FORMAT} data"
    for key, kind in (("layers", list), ("probes", list), ("epochs", list), ("norms", list),
                      ("panel", list), ("lut", list)):
        if not isinstance(index.get(key), kind):
            return f"its index.json has no valid {key!r}"
    if len(index["lut"]) != 256 or len(index["panel"]) != 2:
        return "its index.json has a malformed colour table or panel size"
    if not all(isinstance(e, dict) and isinstance(e.get("epoch"), int) for e in index["epochs"]):
        return "its index.json has a malformed epoch entry"
    return None
