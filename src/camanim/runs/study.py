"""Epoch-wise ybROAD studies: compare runs, models and CAM methods.

`CAManimCallback` appends every layer's ROAD score of every probe image at
every monitored epoch to ``ybroad.csv`` (tidy long form, one row per epoch,
probe and layer; see `CSV_COLUMNS`). This module reads those files back,
from one or many runs, and writes what a study needs::

    camanim study runs/resnet50_gradcam runs/resnet50_layercam --out study/

* ``heatmap_<run>_<probe>.png``: ROAD of every layer (rows, forward order)
  at every epoch (columns), the best layer of each epoch circled; one more
  per run for the mean over its probes (``<probe>`` = ``mean``);
* ``best_layer.png``: the best layer of each epoch, one line per run and
  probe (relative depth when the runs have different layer counts);
* ``study.csv`` (also printed): per run, method and probe the final epoch's
  mean and max ybROAD, the best layer, the final layer's score, the EBPG at
  the best layer when masks were given, and the epoch where the best layer
  settles (the first epoch from which the best layer never changes again).

The heatmap is `camanim.viz.plots.heatmap_image`, the one the callback logs,
so TensorBoard and the study show the same pictures.

Entry point: `study` (Python); the command is `camanim.cli.study`.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import CAManimError
from ..viz.plots import heatmap_image, save_png, trajectories_image
from ..core.files import atomic_path, os_cause, remove_stale
from .history import CSV_COLUMNS, CSV_NAME, read_rows, safe_name

__all__ = ["CSV_COLUMNS", "CSV_NAME", "ProbeSeries", "read_ybroad_csv", "find_csvs",
           "settle_epoch", "study"]

# ------------------------------------------------------------------ reading

@dataclass
class ProbeSeries:
    """Every epoch of one probe of one run (one CAM method).

    Attributes:
        run: label of the run (from its folder).
        method: CAM method name.
        probe: probe name (``"mean"`` for the mean over a run's probes).
        epochs: E epoch numbers (0-based, as Lightning counts), increasing.
        names: L layer names, forward order.
        road: ``(E, L)`` ROAD scores (NaN where missing).
        ebpg: ``(E, L)`` energy-based pointing game, or ``None``.
        targets: E target classes (``None`` where unknown).
        path: the CSV file it came from.
    """

    run: str
    method: str
    probe: str
    epochs: list[int]
    names: list[str]
    road: np.ndarray
    ebpg: np.ndarray | None = None
    targets: list[int | None] = field(default_factory=list)
    path: Path | None = None

    def best_layers(self) -> np.ndarray:
        """``(E,)`` index of the best-ROAD layer per epoch (-1 if no score)."""
        out = np.full(len(self.epochs), -1, dtype=np.int64)
        for e, row in enumerate(self.road):
            if np.isfinite(row).any():
                out[e] = int(np.nanargmax(row))
        return out


def _float(s: str) -> float:
    return float(s) if s not in ("", "nan", "NaN", None) else math.nan


def read_ybroad_csv(path: str | Path, run: str | None = None) -> list[ProbeSeries]:
    """Read one ``ybroad.csv`` into one `ProbeSeries` per (method, probe).

    A row repeated for the same (epoch, probe, method, layer) keeps its last
    value. Epochs whose layer names differ from the latest epoch's (the layer
    selection changed mid-run) are dropped with a note on stderr. Malformed
    rows (a torn last line, a wrong field count, values that do not parse:
    appends cut short by a crash or a full disk) are skipped and counted on
    stderr, never read as numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise CAManimError(f"no ybROAD CSV at {path}")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise CAManimError(f"cannot read {path}: {os_cause(e)}") from None
    torn = 0
    if text and not text.endswith(("\n", "\r")):
        # a last line without its newline is an append cut short: never data
        text, torn = text[:text.rfind("\n") + 1], 1
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in ("epoch", "probe", "layer_index", "layer_name", "road")
               if c not in (reader.fieldnames or [])]
    if missing:
        raise CAManimError(f"{path} is not a camanim ybroad.csv (columns {missing} "
                           f"missing); it is written by camanim.CAManimCallback")
    rows, bad = read_rows(reader)
    if bad + torn:
        print(f"camanim study: {path}: skipped {bad + torn} malformed row(s)"
              + (" (a torn last line)" if torn else "")
              + " (an append cut short by a crash or a full disk)", file=sys.stderr)
    # (method, probe) -> epoch -> layer_index -> row
    groups: dict[tuple[str, str], dict[int, dict[int, dict]]] = {}
    for row in rows:
        key = (row.get("method") or "", row["probe"])
        by_epoch = groups.setdefault(key, {}).setdefault(int(row["epoch"]), {})
        by_epoch[int(row["layer_index"])] = row
    label = run if run is not None else path.parent.name
    out = []
    for (method, probe), by_epoch in sorted(groups.items()):
        epochs = sorted(by_epoch)
        lists = {e: [by_epoch[e][i]["layer_name"] for i in sorted(by_epoch[e])] for e in epochs}
        whole = {e for e in epochs if sorted(by_epoch[e]) == list(range(len(by_epoch[e])))}

        def cut_short(e: int) -> bool:  # a strict prefix of another epoch's layer list
            n = len(lists[e])
            return e not in whole or any(len(lists[o]) > n and lists[o][:n] == lists[e]
                                         for o in epochs)

        ref = [e for e in epochs if not cut_short(e)]
        if not ref:
            print(f"camanim study: {path}: {probe}: no complete epoch; left out", file=sys.stderr)
            continue
        names = lists[ref[-1]]
        keep = [e for e in epochs if lists[e] == names and e in whole]
        short = sum(1 for e in epochs if cut_short(e))
        if short:
            print(f"camanim study: {path}: {probe}: {short} incomplete epoch(s) (rows missing) "
                  "were left out", file=sys.stderr)
        if len(keep) + short < len(epochs):
            print(f"camanim study: {path}: {probe}: {len(epochs) - len(keep) - short} epoch(s) "
                  "with another layer list were left out", file=sys.stderr)
        road = np.array([[_float(by_epoch[e][i]["road"]) for i in range(len(names))]
                         for e in keep], dtype=np.float64).reshape(len(keep), len(names))
        ebpg = np.array([[_float(by_epoch[e][i].get("ebpg", "")) for i in range(len(names))]
                         for e in keep], dtype=np.float64).reshape(len(keep), len(names))
        targets = []
        for e in keep:
            t = by_epoch[e][0].get("target", "")
            targets.append(int(t) if t not in ("", None) else None)
        out.append(ProbeSeries(run=label, method=method, probe=probe, epochs=keep, names=names,
                               road=road, ebpg=ebpg if np.isfinite(ebpg).any() else None,
                               targets=targets, path=path))
    return out


def find_csvs(paths: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """``(run label, csv path)`` for every ``ybroad.csv`` under ``paths``
    (searched recursively; a path may also be a CSV file itself)."""
    found: list[tuple[str, Path]] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append((p.parent.name or str(p.parent), p))
            continue
        if not p.is_dir():
            raise CAManimError(f"{p} does not exist: pass run folders (searched recursively "
                               f"for {CSV_NAME}) or CSV files")
        hits = sorted(p.rglob(CSV_NAME))
        if not hits:
            raise CAManimError(f"no {CSV_NAME} under {p}: it is written by "
                               "camanim.CAManimCallback into its save_dir (by default the "
                               "TensorBoard logger's log_dir)")
        base = p.resolve().name or str(p)
        for h in hits:
            rel = h.parent.relative_to(p)
            found.append((base if str(rel) == "." else f"{base}/{rel.as_posix()}", h))
    # unique labels
    seen: dict[str, int] = {}
    out = []
    for label, h in found:
        n = seen.get(label, 0)
        seen[label] = n + 1
        out.append((label if n == 0 else f"{label}#{n + 1}", h))
    return out


# ------------------------------------------------------------------ analysis

def settle_epoch(epochs: Sequence[int], best: Sequence[int]) -> int | None:
    """The first epoch from which the best layer never changes again.

    ``best[i]`` is the best layer at ``epochs[i]``; ``None`` without epochs.
    E.g. best layers 3, 5, 5, 4, 4 at epochs 0..4 settle at epoch 3.
    """
    if len(epochs) == 0:
        return None
    k = len(best) - 1
    while k > 0 and best[k - 1] == best[-1]:
        k -= 1
    return int(epochs[k])


def mean_series(series: Sequence[ProbeSeries]) -> ProbeSeries | None:
    """The mean over the probes of one run and method (common epochs only)."""
    if len(series) < 2:
        return None
    names = series[0].names
    same = [s for s in series if s.names == names]
    common = sorted(set.intersection(*(set(s.epochs) for s in same)))
    if not common or len(same) < 2:
        return None
    rows = [s.road[[s.epochs.index(e) for e in common]] for s in same]
    eb = [s.ebpg[[s.epochs.index(e) for e in common]] for s in same if s.ebpg is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        road = np.nanmean(np.stack(rows), axis=0)
        ebpg = np.nanmean(np.stack(eb), axis=0) if eb else None
    return ProbeSeries(run=same[0].run, method=same[0].method, probe="mean", epochs=common,
                       names=names, road=road, ebpg=ebpg, targets=[None] * len(common),
                       path=same[0].path)


def summarize(s: ProbeSeries) -> dict:
    """One table row for a series: the final epoch, the best layer, settling."""
    best = s.best_layers()
    last = s.road[-1]
    finite = np.isfinite(last)
    b = int(best[-1])
    row = {
        "run": s.run, "method": s.method, "probe": s.probe, "layers": len(s.names),
        "epochs": len(s.epochs), "final_epoch": s.epochs[-1],
        "final_mean": float(np.nanmean(last)) if finite.any() else math.nan,
        "final_max": float(np.nanmax(last)) if finite.any() else math.nan,
        "best_layer": s.names[b] if b >= 0 else "",
        "best_index": b,
        "final_layer_road": float(last[-1]),
        "settle_epoch": settle_epoch(s.epochs, list(best)) if b >= 0 else None,
        "ebpg_best": (float(s.ebpg[-1, b]) if s.ebpg is not None and b >= 0 else math.nan),
    }
    return row


TABLE_COLUMNS = ("run", "method", "probe", "layers", "epochs", "final_epoch", "final_mean",
                 "final_max", "best_layer", "best_index", "final_layer_road", "settle_epoch",
                 "ebpg_best")


# ------------------------------------------------------------------ study

def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """Rows as an aligned plain-text table."""
    cells = [[c for c in columns]] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def study(run_dirs: Sequence[str | Path], out: str | Path = "camanim_study",
          probes: Iterable[str] | None = None, plots: bool = True,
          verbose: bool = True) -> list[dict]:
    """Compare the ybROAD histories of runs.

    Args:
        run_dirs: run folders (searched recursively for ``ybroad.csv``) or
            CSV files.
        out: output folder (created).
        probes: only these probe names (the per-run ``mean`` is added when
            a run has several probes).
        plots: write the PNG heatmaps and the trajectory plot.
        verbose: print the table.

    Returns:
        The table rows (dicts with `TABLE_COLUMNS`), also in ``out/study.csv``.
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise CAManimError("pass at least one run folder or ybroad.csv file")
    out = Path(out)
    wanted = set(probes) if probes is not None else None
    all_series: list[ProbeSeries] = []
    for label, path in find_csvs(run_dirs):
        series = read_ybroad_csv(path, run=label)
        if wanted is not None:
            series = [s for s in series if s.probe in wanted]
        by_method: dict[str, list[ProbeSeries]] = {}
        for s in series:
            by_method.setdefault(s.method, []).append(s)
        for group in by_method.values():
            all_series.extend(group)
            m = mean_series(group)
            if m is not None:
                all_series.append(m)
    if not all_series:
        raise CAManimError("no probe matched: check --probe against the probe names in the CSVs")
    rows = [summarize(s) for s in all_series]
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale([out])
        with atomic_path(out / "study.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(TABLE_COLUMNS))
            w.writeheader()
            for r in rows:
                w.writerow({k: _fmt(v) for k, v in r.items()})
    except OSError as e:
        raise CAManimError(f"cannot write to --out {out} ({os_cause(e)}); pass a writable "
                           "folder") from None
    try:
        if plots:
            methods = {s.method for s in all_series}
            for s in all_series:
                tag = safe_name(s.run.replace("/", "__"))
                meth = f"_{safe_name(s.method)}" if len(methods) > 1 else ""
                save_png(out / f"heatmap_{tag}{meth}_{safe_name(s.probe)}.png",
                          heatmap_image(s.road, s.epochs, s.names,
                                        title=f"{s.run} · {s.method} · {s.probe}: ybROAD"))
            save_png(out / "best_layer.png", trajectories_image(all_series))
    except OSError as e:
        raise CAManimError(f"cannot write the plots to --out {out} ({os_cause(e)})") from None
    if verbose:
        print(format_table(rows))
        print(f"\nwrote {out / 'study.csv'}" + (" and plots" if plots else ""))
    return rows
