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
  settles (the first epoch from which the best layer never changes again);
  from the convergence columns: the share of layers above chance at the
  final epoch, the last and mean Kendall tau of the layer ranking, how many
  layers' maps have settled and the epoch by which all of them had;
* ``settle.csv``: each layer's settle epoch (the first epoch from which its
  map change stays below ``settle_threshold``; empty: not settled) and its
  last change;
* ``epochs.csv``: per epoch the share of layers above the random-map chance,
  the chance ROAD (random map, blob), the Kendall tau of the layer ranking
  against the previous epoch, the share of settled layers and the median
  map change;
* ``convergence_<run>_<probe>.png`` (map change heatmaps) and
  ``chance_tau.png`` (share above chance and ranking tau per epoch); the
  ybROAD heatmaps hatch the cells not above chance.

CSVs written before the convergence columns existed are read as before
(their convergence outputs are empty).

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.files import atomic_path, os_cause, remove_stale
from ..errors import CAManimError
from ..metrics.convergence import DEFAULT_SETTLE_THRESHOLD, kendall_tau, settle_epochs, share_below
from ..viz.convergence import chance_tau_image, convergence_image, not_above_chance
from ..viz.plots import heatmap_image, save_png, trajectories_image
from .history import CSV_COLUMNS, CSV_NAME, group_rows, parse_cell, read_rows, safe_name

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
        change: ``(E, L)`` map change against the previous callback epoch
            (``1 - Spearman``), or ``None`` (an older CSV).
        chance: ``(E, 2)`` ROAD of the random map and of the blob, or ``None``.
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
    change: np.ndarray | None = None
    chance: np.ndarray | None = None

    def best_layers(self) -> np.ndarray:
        """``(E,)`` index of the best-ROAD layer per epoch (-1 if no score)."""
        out = np.full(len(self.epochs), -1, dtype=np.int64)
        for e, row in enumerate(self.road):
            if np.isfinite(row).any():
                out[e] = int(np.nanargmax(row))
        return out

    def above_chance(self) -> np.ndarray:
        """``(E,)`` share of the scored layers whose ROAD beats the random
        map's (NaN without a chance value or scores)."""
        out = np.full(len(self.epochs), math.nan)
        if self.chance is None:
            return out
        below = not_above_chance(self.road, self.chance[:, 0])
        for e, row in enumerate(self.road):
            n = int(np.isfinite(row).sum())
            if n and np.isfinite(self.chance[e, 0]):
                out[e] = 1.0 - below[e].sum() / n
        return out

    def rank_tau(self) -> np.ndarray:
        """``(E,)`` Kendall tau-b of the per-layer ROAD against the previous
        epoch of the series (NaN at the first)."""
        out = np.full(len(self.epochs), math.nan)
        for e in range(1, len(self.epochs)):
            out[e] = kendall_tau(self.road[e - 1], self.road[e])
        return out

    def settle_epochs(self, threshold: float = DEFAULT_SETTLE_THRESHOLD) -> list[int | None]:
        """Each layer's settle epoch (`camanim.metrics.convergence.settle_epochs`);
        ``None`` everywhere without map changes."""
        if self.change is None:
            return [None] * len(self.names)
        return settle_epochs(self.change, self.epochs, threshold)


def _float(s: str | None) -> float:
    v = parse_cell(s)
    return math.nan if v is None else v


def _cut_short(e: int, lists: dict[int, list[str]], whole: set[int]) -> bool:
    """Epoch ``e`` lacks rows, or its layer list is a strict prefix of
    another epoch's (rows missing at the end)."""
    n = len(lists[e])
    return e not in whole or any(len(o) > n and o[:n] == lists[e] for o in lists.values())


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
    groups = group_rows(rows)
    label = run if run is not None else path.parent.name
    out = []
    for (method, probe), by_epoch in sorted(groups.items()):
        epochs = sorted(by_epoch)
        lists = {e: [by_epoch[e][i]["layer_name"] for i in sorted(by_epoch[e])] for e in epochs}
        whole = {e for e in epochs if sorted(by_epoch[e]) == list(range(len(by_epoch[e])))}

        short_of = {e: _cut_short(e, lists, whole) for e in epochs}
        ref = [e for e in epochs if not short_of[e]]
        if not ref:
            print(f"camanim study: {path}: {probe}: no complete epoch; left out", file=sys.stderr)
            continue
        names = lists[ref[-1]]
        keep = [e for e in epochs if lists[e] == names and e in whole]
        short = sum(1 for e in epochs if short_of[e])
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
        change = np.array([[_float(by_epoch[e][i].get("map_change", "")) for i in range(len(names))]
                           for e in keep], dtype=np.float64).reshape(len(keep), len(names))
        chance = np.array(
            [
                [_float(by_epoch[e][0].get(f"road_chance_{k}", "")) for k in ("random", "blob")]
                for e in keep
            ],
            dtype=np.float64,
        ).reshape(len(keep), 2)
        targets = []
        for ep in keep:
            t = by_epoch[ep][0].get("target", "")
            targets.append(int(t) if t not in ("", None) else None)
        out.append(ProbeSeries(run=label, method=method, probe=probe, epochs=keep, names=names,
                               road=road, ebpg=ebpg if np.isfinite(ebpg).any() else None,
                               targets=targets, path=path,
                               change=change if np.isfinite(change).any() else None,
                               chance=chance if np.isfinite(chance).any() else None))
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
    def stack(attr: str) -> np.ndarray | None:
        parts = [getattr(s, attr)[[s.epochs.index(e) for e in common]] for s in same
                 if getattr(s, attr) is not None]
        return np.nanmean(np.stack(parts), axis=0) if parts else None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        road, ebpg, change, chance = (stack(a) for a in ("road", "ebpg", "change", "chance"))
    assert road is not None  # every series has its ROAD matrix
    return ProbeSeries(run=same[0].run, method=same[0].method, probe="mean", epochs=common,
                       names=names, road=road, ebpg=ebpg, targets=[None] * len(common),
                       path=same[0].path, change=change, chance=chance)


def summarize(s: ProbeSeries, threshold: float = DEFAULT_SETTLE_THRESHOLD) -> dict:
    """One table row for a series: the final epoch, the best layer, settling,
    chance and ranking stability."""
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
    tau = s.rank_tau()
    settle = s.settle_epochs(threshold)
    done = [e for e in settle if e is not None]
    row.update({
        "above_chance": float(s.above_chance()[-1]),
        "rank_tau_last": float(tau[-1]),
        "rank_tau_mean": float(np.nanmean(tau)) if np.isfinite(tau).any() else math.nan,
        "layers_settled": len(done) if s.change is not None else None,
        "all_settled_epoch": max(done) if s.change is not None and len(done) == len(settle)
        and done else None,
    })
    return row


TABLE_COLUMNS = ("run", "method", "probe", "layers", "epochs", "final_epoch", "final_mean",
                 "final_max", "best_layer", "best_index", "final_layer_road", "settle_epoch",
                 "ebpg_best", "above_chance", "rank_tau_last", "rank_tau_mean", "layers_settled",
                 "all_settled_epoch")
SETTLE_COLUMNS = ("run", "method", "probe", "layer_index", "layer_name", "settle_epoch",
                  "final_change")
EPOCH_COLUMNS = ("run", "method", "probe", "epoch", "above_chance", "chance_random",
                 "chance_blob", "rank_tau", "share_settled", "median_change")


def settle_rows(s: ProbeSeries, threshold: float = DEFAULT_SETTLE_THRESHOLD) -> list[dict]:
    """`SETTLE_COLUMNS` rows: each layer's settle epoch and last map change."""
    if s.change is None:
        return []
    last = s.change[-1]
    return [{"run": s.run, "method": s.method, "probe": s.probe, "layer_index": i,
             "layer_name": n, "settle_epoch": e, "final_change": float(last[i])}
            for i, (n, e) in enumerate(zip(s.names, s.settle_epochs(threshold), strict=False))]


def epoch_rows(s: ProbeSeries, threshold: float = DEFAULT_SETTLE_THRESHOLD) -> list[dict]:
    """`EPOCH_COLUMNS` rows: chance, ranking and convergence per epoch."""
    above, tau = s.above_chance(), s.rank_tau()
    rows = []
    for k, e in enumerate(s.epochs):
        ch = s.change[k] if s.change is not None else np.full(len(s.names), math.nan)
        rows.append({"run": s.run, "method": s.method, "probe": s.probe, "epoch": e,
                     "above_chance": float(above[k]),
                     "chance_random": float(s.chance[k, 0]) if s.chance is not None else math.nan,
                     "chance_blob": float(s.chance[k, 1]) if s.chance is not None else math.nan,
                     "rank_tau": float(tau[k]), "share_settled": share_below(ch, threshold),
                     "median_change": float(np.nanmedian(ch)) if np.isfinite(ch).any()
                     else math.nan})
    return rows


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
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(v) for k, v in r.items()})


def study(run_dirs: Sequence[str | Path], out: str | Path = "camanim_study",
          probes: Iterable[str] | None = None, plots: bool = True,
          verbose: bool = True, settle_threshold: float = DEFAULT_SETTLE_THRESHOLD) -> list[dict]:
    """Compare the ybROAD histories of runs.

    Args:
        run_dirs: run folders (searched recursively for ``ybroad.csv``) or
            CSV files.
        out: output folder (created).
        probes: only these probe names (the per-run ``mean`` is added when
            a run has several probes).
        plots: write the PNG heatmaps and the trajectory plot.
        verbose: print the table.
        settle_threshold: map change below which a layer counts as settled.

    Returns:
        The table rows (dicts with `TABLE_COLUMNS`), also in ``out/study.csv``;
        ``settle.csv`` and ``epochs.csv`` hold the per-layer and per-epoch
        convergence tables.
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise CAManimError("pass at least one run folder or ybroad.csv file")
    out = Path(out)
    all_series = _read_series(run_dirs, probes)
    if not all_series:
        raise CAManimError("no probe matched: check --probe against the probe names in the CSVs")
    thr = settle_threshold
    rows = [summarize(s, thr) for s in all_series]
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale([out])
        _write_csv(out / "study.csv", TABLE_COLUMNS, rows)
        _write_csv(out / "settle.csv", SETTLE_COLUMNS,
                   [r for s in all_series for r in settle_rows(s, thr)])
        _write_csv(out / "epochs.csv", EPOCH_COLUMNS,
                   [r for s in all_series for r in epoch_rows(s, thr)])
    except OSError as e:
        raise CAManimError(f"cannot write to --out {out} ({os_cause(e)}); pass a writable "
                           "folder") from None
    if plots:
        _write_plots(out, all_series)
    if verbose:
        print(format_table(rows))
        print(
            f"\nwrote {out / 'study.csv'}, settle.csv, epochs.csv" + (" and plots" if plots else "")
        )
    return rows


def _read_series(run_dirs: Sequence[str | Path],
                 probes: Iterable[str] | None) -> list[ProbeSeries]:
    """Every run's probe series (only ``probes`` when given), each method's
    followed by its mean over probes."""
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
    return all_series


def _write_plots(out: Path, all_series: Sequence[ProbeSeries]) -> None:
    """The heatmaps, the best-layer trajectories and the chance / tau plot."""
    try:
        methods = {s.method for s in all_series}
        for s in all_series:
            tag = safe_name(s.run.replace("/", "__"))
            meth = f"_{safe_name(s.method)}" if len(methods) > 1 else ""
            label = f"{s.run} · {s.method} · {s.probe}"
            mask = None if s.chance is None else not_above_chance(s.road, s.chance[:, 0])
            save_png(out / f"heatmap_{tag}{meth}_{safe_name(s.probe)}.png",
                     heatmap_image(s.road, s.epochs, s.names, mask=mask,
                                   title=f"{label}: ybROAD"
                                   + ("; hatched: <= chance" if mask is not None else "")))
            if s.change is not None:
                save_png(out / f"convergence_{tag}{meth}_{safe_name(s.probe)}.png",
                         convergence_image(s.change, s.epochs, s.names,
                                           title=f"{label}: map change (1 - Spearman)"))
        save_png(out / "best_layer.png", trajectories_image(all_series))
        lines = [(f"{s.run} · {s.method} · {s.probe}", s.epochs, s.above_chance(),
                  s.rank_tau()) for s in all_series
                 if s.chance is not None or s.change is not None]
        if lines:
            save_png(out / "chance_tau.png", chance_tau_image(lines))
    except OSError as e:
        raise CAManimError(f"cannot write the plots to --out {out} ({os_cause(e)})") from None
