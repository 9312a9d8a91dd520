"""``camanim report``: the viewer as one HTML file that opens offline.

The page is the TensorBoard tab's (``static/viewer.js`` and ``viewer.css``,
inlined), with the viewer data of the run(s) inlined as base64 (sprite
sheets, backgrounds) in a JSON block. Subsets (epochs, layers, probes, a
smaller panel) keep large runs small; ``max_mib`` refuses a larger file
before anything is written.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..core.files import write_text
from ..errors import CAManimError
from ..viz.render import panel_size
from .data import VIEWER_DIR, background_path, find_runs, read_index, sprite_path

__all__ = ["write_report", "report_data"]

STATIC = Path(__file__).resolve().parent / "static"


def _pick_epochs(index: dict, epochs: Sequence[int] | None) -> list[dict]:
    have = {e["epoch"]: e for e in index["epochs"]}
    if epochs is None:
        return list(have.values())
    missing = [int(e) for e in epochs if int(e) not in have]
    if missing:
        raise CAManimError(f"epochs {missing} are not in the run (it has {sorted(have)})")
    return [have[int(e)] for e in sorted(set(int(e) for e in epochs))]


def _pick_layers(index: dict, layers: Sequence[str | int] | None) -> list[int]:
    names = [lay["name"] for lay in index["layers"]]
    if layers is None:
        return list(range(len(names)))
    out = []
    for sel in layers:
        if isinstance(sel, (int, np.integer)) or str(sel).lstrip("-").isdigit():
            i = int(sel)
            if not -len(names) <= i < len(names):
                raise CAManimError(f"layer number {i} is out of range (the run has "
                                   f"{len(names)} layers, 0..{len(names) - 1})")
            out.append(i % len(names))
        elif sel in names:
            out.append(names.index(sel))
        else:
            raise CAManimError(f"layer {sel!r} is not in the run; its layers are numbers "
                               f"0..{len(names) - 1} or names such as {names[0]!r}")
    return sorted(set(out))


def _pick_probes(index: dict, probes: Sequence[str] | None) -> list[int]:
    names = [p["name"] for p in index["probes"]]
    if probes is None:
        return list(range(len(names)))
    bad = [p for p in probes if p not in names]
    if bad:
        raise CAManimError(f"probes {bad} are not in the run; it has {names}")
    return [names.index(p) for p in dict.fromkeys(probes)]


def _resampler(panel: tuple[int, int], frame_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour rows and columns of the new panel size."""
    ph, pw = panel
    nh, nw = (ph, pw) if frame_size is None else panel_size((ph, pw), int(frame_size))
    nh, nw = min(nh, ph), min(nw, pw)
    rows = ((np.arange(nh) + 0.5) * ph / nh).astype(int)
    return rows, ((np.arange(nw) + 0.5) * pw / nw).astype(int)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _sheet(path: Path, panel: tuple[int, int], n_norm: int, layers: list[int],
           ys: np.ndarray, xs: np.ndarray, n_layers: int) -> bytes:
    """The sprite sheet, re-packed for a subset of layers or a smaller panel."""
    data = path.read_bytes()
    if len(layers) == n_layers and len(ys) == panel[0] and len(xs) == panel[1]:
        return data
    ph, pw = panel
    a = np.asarray(Image.open(io.BytesIO(data)).convert("L")).reshape(n_layers, ph, n_norm, pw)
    a = a[layers][:, ys][:, :, :, xs]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a.reshape(len(layers) * len(ys), n_norm * len(xs))),
                    mode="L").save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def _run_data(vdir: Path, epochs: Sequence[int] | None, layers: Sequence[str | int] | None,
              probes: Sequence[str] | None, frame_size: int | None) -> dict:
    index = read_index(vdir)
    assert index is not None   # strict: a missing or malformed index raised
    kept_e = _pick_epochs(index, epochs)
    kept_l = _pick_layers(index, layers)
    kept_p = _pick_probes(index, probes)
    panel = (int(index["panel"][0]), int(index["panel"][1]))
    ys, xs = _resampler(panel, frame_size)
    names = [index["probes"][k]["name"] for k in kept_p]
    n_layers, n_norm = len(index["layers"]), len(index["norms"])
    sprites, backgrounds = {}, {}
    for new, k in enumerate(kept_p):
        bg = np.frombuffer(background_path(vdir, k).read_bytes(), "<f4").reshape(*panel, 3)
        backgrounds[str(new)] = _b64(np.ascontiguousarray(bg[ys][:, xs]).tobytes())
        for e in kept_e:
            if names[new] in e["probes"]:
                sprites[f"{e['epoch']}_{new}"] = _b64(_sheet(
                    sprite_path(vdir, e["epoch"], k), panel, n_norm, kept_l, ys, xs, n_layers))

    def cut(d: dict | None) -> dict:
        return {p: ([v[i] for i in kept_l] if isinstance(v, list) else v)
                for p, v in (d or {}).items() if p in names}

    out_epochs = [{**e, "probes": [p for p in e["probes"] if p in names],
                   "targets": cut(e.get("targets")), "road": cut(e.get("road")),
                   "chance": cut(e.get("chance")), "change": cut(e.get("change"))}
                  for e in kept_e]
    new_index = {**index, "layers": [index["layers"][i] for i in kept_l],
                 "probes": [index["probes"][k] for k in kept_p], "epochs": out_epochs,
                 "panel": [len(ys), len(xs)]}
    return {"index": new_index, "sprites": sprites, "backgrounds": backgrounds}


def report_data(run_dir: str | Path, *, epochs: Sequence[int] | None = None,
                layers: Sequence[str | int] | None = None, probes: Sequence[str] | None = None,
                frame_size: int | None = None) -> dict:
    """The inlined data of a report: ``{"runs": [...], "data": {run: {...}}}``."""
    root = Path(run_dir)
    if not root.is_dir():
        raise CAManimError(f"{root} is not a folder: pass a run's output folder (the "
                           "CAManimCallback's save_dir or TensorBoard log folder)")
    if (root / "index.json").is_file() and root.name == VIEWER_DIR:
        root, runs = root.parent, ["."]
    else:
        runs = find_runs(root)
    if not runs:
        raise CAManimError(f"no viewer data under {root}: it is written by CAManimCallback "
                           "(MediaOptions.viewer, on by default) after each callback epoch")
    label = {r: (root.resolve().name if r == "." else r) for r in runs}
    data = {label[r]: _run_data(root / r / VIEWER_DIR, epochs, layers, probes, frame_size)
            for r in runs}
    return {"runs": [label[r] for r in runs], "data": data}


def _json_for_html(obj: Any) -> str:
    """JSON that cannot end the ``<script>`` block it sits in."""
    return (json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c")
            .replace(">", "\\u003e").replace("&", "\\u0026"))


def write_report(run_dir: str | Path, out: str | Path, *, epochs: Sequence[int] | None = None,
                 layers: Sequence[str | int] | None = None, probes: Sequence[str] | None = None,
                 frame_size: int | None = None, max_mib: float | None = None) -> Path:
    """Write the viewer of ``run_dir`` as one offline HTML file ``out``.

    Args:
        run_dir: a run's output folder (or a folder of runs: each becomes a
            choice of the run selector).
        out: the HTML file to write.
        epochs: epoch numbers to keep (default: all).
        layers: layer names or numbers to keep (default: all).
        probes: probe names to keep (default: all).
        frame_size: long side of the map panels (default: as written, 96).
        max_mib: refuse (`CAManimError`, nothing written) a file over this size.

    Returns:
        The path written.
    """
    data = report_data(run_dir, epochs=epochs, layers=layers, probes=probes,
                       frame_size=frame_size)
    title = "camanim report: " + ", ".join(data["runs"])
    page = "".join([
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>\n<style>",
        (STATIC / "viewer.css").read_text(encoding="utf-8"),
        '</style></head>\n<body><div id="camanim-root"></div>\n'
        '<script type="application/json" id="camanim-data">', _json_for_html(data),
        "</script>\n<script>", (STATIC / "viewer.js").read_text(encoding="utf-8"),
        "</script>\n<script>(function () { const d = JSON.parse(document.getElementById("
        '"camanim-data").textContent); CAManimViewer.start(document.getElementById('
        '"camanim-root"), CAManimViewer.inlineSource(d)); })();</script>\n</body></html>\n'])
    size = len(page.encode("utf-8")) / 2**20
    if max_mib is not None and size > float(max_mib):
        raise CAManimError(
            f"the report would be {size:.1f} MiB, over the limit of {float(max_mib):g} MiB: "
            "keep fewer epochs (--epochs), layers (--layers) or probes (--probes), or "
            "smaller maps (--frame-size, e.g. 64)")
    return write_text(out, page)
