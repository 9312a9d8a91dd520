"""The callback's per-epoch history: one `EpochRecord` per monitored epoch,
their ``ybroad.csv`` (tidy long form, one row per epoch, probe and layer)
and the ``state_dict`` that carries them through checkpoints."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..core.files import os_cause
from ..errors import CAManimError

__all__ = [
    "EpochRecord",
    "Scores",
    "CSV_NAME",
    "CSV_COLUMNS",
    "CSV_COLUMNS_V1",
    "History",
    "safe_name",
    "floats",
    "append_all",
    "repair_csv",
    "read_rows",
]

CSV_NAME = "ybroad.csv"
#: Columns of ``ybroad.csv``, one row per (epoch, probe, layer). ``road_mean``
#: and ``road_max`` repeat that epoch's mean and max over the probe's layers;
#: ``road`` / ``ebpg`` are empty when not computed (no ROAD, no mask).
#: ``map_change`` is ``1 - Spearman`` of the layer's map against the previous
#: callback epoch's (empty at the first epoch); ``road_chance_random`` /
#: ``road_chance_blob`` repeat the epoch's ROAD of a seeded random map and of
#: a centred Gaussian blob (the chance line). Files written before these
#: three columns existed have the first 11 columns only (`CSV_COLUMNS_V1`);
#: they are read, and appended to, with their own header.
CSV_COLUMNS = ("epoch", "global_step", "probe", "target", "method", "layer_index",
               "layer_name", "road", "road_mean", "road_max", "ebpg",
               "map_change", "road_chance_random", "road_chance_blob")
CSV_COLUMNS_V1 = CSV_COLUMNS[:11]



#: probe name -> one value per layer (None: missing, not computed or not finite)
Scores = dict[str, list[float | None]]


@dataclass
class EpochRecord:
    """What the callback measured at one monitored epoch, for every probe.

    A dict only in the checkpoint state (`to_dict` / `from_dict`) and as the
    rows of ``ybroad.csv`` (`csv_rows`). L is the number of layers; a probe
    whose logits were not finite has ``None`` for its target and scores.

    Attributes:
        global_step: the trainer's step when the epoch's work ran.
        names: the L layer names, in forward order.
        method: the CAM method's name.
        targets: probe -> class index explained (None: missing or a callable).
        road: probe -> L ybROAD scores; None when ROAD is off.
        ebpg: probe with a mask -> L pointing-game scores; None without masks.
        change: probe -> L map changes (``1 - Spearman``) against callback
            epoch ``change_from`` (`camanim.lightning.convergence`); None
            when not measured.
        change_from: the epoch ``change`` compares with (None: none yet).
        chance: ``"random"`` / ``"blob"`` -> probe -> ROAD of a seeded random
            map / a centred blob (the chance line); None when off.
        rank_tau: probe -> Kendall tau of the layers' ybROAD against callback
            epoch ``rank_tau_from``; None when there is none.
        rank_tau_from: the epoch ``rank_tau`` compares with.
        seconds: time the epoch's work took on the training thread.
    """

    global_step: int
    names: list[str]
    method: str
    targets: dict[str, int | None]
    road: Scores | None = None
    ebpg: Scores | None = None
    change: Scores | None = None
    change_from: int | None = None
    chance: dict[str, dict[str, float | None]] | None = None
    rank_tau: dict[str, float | None] | None = None
    rank_tau_from: int | None = None
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain Python (the checkpoint state)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochRecord:
        """The record of a `to_dict` (unknown keys of other versions are left out)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def scores(self, key: str) -> Scores | None:
        """``road``, ``ebpg`` or ``change`` by name."""
        if key not in ("road", "ebpg", "change"):
            raise KeyError(key)
        out: Scores | None = getattr(self, key)
        return out

    def chance_of(self, probe: str, kind: str = "random") -> float | None:
        """The chance ROAD of ``probe`` (``kind``: "random" or "blob"), or None."""
        return (self.chance or {}).get(kind, {}).get(probe)

    def above_chance(self, probe: str) -> tuple[int, int, float] | None:
        """``(layers whose ybROAD beats the random map's, layers with a
        score, that chance ROAD)``, or None without both."""
        from ..viz.convergence import not_above_chance  # the one "above chance" rule

        chance = self.chance_of(probe)
        if chance is None or self.road is None:
            return None
        s = np.array([math.nan if v is None else v for v in self.road[probe]], dtype=np.float64)
        scored = np.isfinite(s)
        below = not_above_chance(s[None], np.array([chance], dtype=np.float64))[0]
        return int((scored & ~below).sum()), int(scored.sum()), float(chance)


def safe_name(s: str) -> str:
    """A file-name- and tag-safe version of ``s``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s)).strip("_") or "x"


class History:
    """Records of the monitored epochs of one run, keyed by epoch.

    Args:
        probes: the (file-safe) probe names, in order.
    """

    def __init__(self, probes: Sequence[str]) -> None:
        self.probes = list(probes)
        self.records: dict[int, EpochRecord] = {}
        self._csv_keys: set[tuple[int, str, str]] | None = None
        self._csv_rows: dict[tuple[int, str, str], set[int]] = {}
        self._csv_columns: tuple[str, ...] = CSV_COLUMNS
        self._warned = False

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, epoch: int) -> bool:
        return epoch in self.records

    def __getitem__(self, epoch: int) -> EpochRecord:
        return self.records[epoch]

    def __setitem__(self, epoch: int, record: EpochRecord) -> None:
        self.records[epoch] = record

    @property
    def epochs(self) -> list[int]:
        return sorted(self.records)

    def recover(self, out_dir: Path, method: str) -> None:
        """Take back now the epochs that ``out_dir``'s CSV holds and the
        history lacks (otherwise done at the first `write_csv`)."""
        if self._csv_keys is None:
            self._read_csv_keys(out_dir / CSV_NAME, method)

    def forget_csv(self) -> None:
        """Read the CSV again before the next write (a new fit may write elsewhere)."""
        self._csv_keys = None

    def state_dict(self) -> list[dict[str, Any]]:
        """The records as plain dicts, each with its ``epoch``."""
        return [dict(epoch=e, **rec.to_dict()) for e, rec in sorted(self.records.items())]

    def load_state_dict(self, rows: Sequence[dict[str, Any]]) -> None:
        """Take back the records of a `state_dict`."""
        self.records = {}
        for row in rows:
            rec = dict(row)
            self.records[int(rec.pop("epoch"))] = EpochRecord.from_dict(rec)

    def matrix(self, probe: str | int, key: str) -> tuple[list[int], list[str], np.ndarray]:
        """``(epochs, layer names, (E, L) values)`` of ``key`` ("road",
        "ebpg" or "change") for one probe, over the epochs with the latest
        layer list."""
        name = self.probes[probe] if isinstance(probe, int) else str(probe)
        if name not in self.probes:
            raise CAManimError(f"no probe {probe!r}; probes are {self.probes}")
        if not self.records:
            return [], [], np.zeros((0, 0))
        names = self.records[max(self.records)].names
        found = {e: self.records[e].scores(key) for e in sorted(self.records)
                 if self.records[e].names == names}
        rows = {e: v[name] for e, v in found.items() if v is not None and name in v}
        epochs = list(rows)
        mat = np.array([[math.nan if v is None else v for v in rows[e]] for e in epochs],
                       dtype=np.float64).reshape(len(epochs), len(names))
        return epochs, list(names), mat


    def _read_csv_keys(self, path: Path, method: str) -> None:
        """Which (epoch, probe, method) the CSV already holds completely;
        epochs there but missing from the restored history (a checkpoint
        written before that epoch's work) are taken back into the history.
        A torn last line (a crash or a full disk mid-append) is cut off
        first; malformed rows are left out with a warning."""
        self._csv_keys = set()
        self._csv_rows = {}
        self._csv_columns = CSV_COLUMNS
        if not path.exists() or path.stat().st_size == 0:
            return
        repair_csv(path)
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = tuple(reader.fieldnames or ())
            # an older file (a prefix of today's columns) is appended to with its own header
            if len(cols) < len(CSV_COLUMNS_V1) or cols != CSV_COLUMNS[:len(cols)]:
                raise CAManimError(f"{path} exists with other columns ({reader.fieldnames}); "
                                   "pass another save_dir")
            self._csv_columns = cols
            if len(cols) < len(CSV_COLUMNS):
                warnings.warn(f"CAManimCallback: {path} was written by an older camanim; new rows "
                              f"are appended without its missing columns "
                              f"({', '.join(CSV_COLUMNS[len(cols):])}): pass another save_dir "
                              "to keep them", stacklevel=2)
            rows, bad = read_rows(reader)
        if bad:
            warnings.warn(f"CAManimCallback: {path}: {bad} malformed row(s) left out (lines "
                          "written by a crashed or older run)", stacklevel=2)
        groups = group_rows(rows)
        for (m, p), by_epoch in groups.items():
            for e, by_layer in by_epoch.items():
                self._csv_rows[(e, p, m)] = set(by_layer)
        mine = [groups.get((method, p), {}) for p in self.probes]
        for e in sorted(set.intersection(*(set(g) for g in mine)) if mine else ()):
            if e not in self.records:
                rec = record_from_rows({p: g[e] for p, g in zip(self.probes, mine, strict=True)},
                                       method)
                if rec is not None:
                    self.records[e] = rec

    def _in_csv(self, key: tuple[int, str, str], n_layers: int) -> bool:
        assert self._csv_keys is not None
        if key in self._csv_keys:
            return True
        # an epoch is in the file only when every layer's row is
        if self._csv_rows.get(key) == set(range(n_layers)):
            self._csv_keys.add(key)
            return True
        return False

    def write_csv(self, out_dir: Path, epoch: int | None, method: str) -> None:
        """Append the rows of every record the CSV lacks (this epoch, epochs
        whose append failed before, restored epochs a new folder lacks).
        ``epoch``: the epoch just done (a resumed run that finds it already
        written is told so once); ``None`` for a retry of earlier ones.

        All or nothing: the rows go out in one write and are synced; a
        failed write is cut back off and raises, and its epochs count as not
        written, so the next call writes them again.

        Raises:
            CAManimError: naming the file and the cause (e.g. a full disk).
        """
        path = out_dir / CSV_NAME
        if self._csv_keys is None:
            self._read_csv_keys(path, method)
        assert self._csv_keys is not None
        rows: list[list[Any]] = []
        keys: list[tuple[int, str, str]] = []
        skipped = False
        for e in sorted(self.records):
            rec = self.records[e]
            for p in self.probes:
                key = (e, p, rec.method)
                if self._in_csv(key, len(rec.names)):
                    skipped = skipped or e == epoch
                    continue
                # a group cut short (a torn line cut off) gets only its missing rows
                have = self._csv_rows.get(key, set())
                rows.extend(r for r in csv_rows(e, p, rec) if r[5] not in have)
                keys.append(key)
        if skipped and not self._warned:
            self._warned = True
            warnings.warn(f"CAManimCallback: {path} already holds epoch {epoch} (a resumed "
                           "run); rows already there are not written again", stacklevel=2)
        if not rows:
            return
        buf = io.StringIO()
        w = csv.writer(buf)
        new = not path.exists() or path.stat().st_size == 0
        if new:
            w.writerow(CSV_COLUMNS)
        n = len(CSV_COLUMNS) if new else len(self._csv_columns)
        w.writerows(row[:n] for row in rows)
        try:
            append_all(path, buf.getvalue().encode("utf-8"))
        except OSError as e:
            self._csv_keys = None  # read (and repair) the file again before the next try
            epochs = sorted({k[0] for k in keys})
            raise CAManimError(f"could not append epoch(s) {epochs} to {path} "
                               f"({os_cause(e)}); they are written again at the next "
                               "monitored epoch") from None
        self._csv_keys.update(keys)


#: (method, probe) -> epoch -> layer index -> row, as `group_rows` makes it
RowGroups = dict[tuple[str, str], dict[int, dict[int, dict[str, str]]]]


def group_rows(rows: Iterable[dict[str, str]]) -> RowGroups:
    """``ybroad.csv`` rows (`read_rows`) by (method, probe), epoch and layer
    index; a row repeated for the same keys keeps its last value."""
    groups: RowGroups = {}
    for row in rows:
        key = (row.get("method") or "", row["probe"])
        by_epoch = groups.setdefault(key, {}).setdefault(int(row["epoch"]), {})
        by_epoch[int(row["layer_index"])] = row
    return groups


def record_from_rows(by_probe: dict[str, dict[int, dict[str, str]]],
                     method: str) -> EpochRecord | None:
    """The `EpochRecord` of one epoch's rows (probe -> layer index -> row),
    or None when a probe's rows are incomplete or name other layers."""
    first = next(iter(by_probe.values()))
    names = [first[i]["layer_name"] for i in sorted(first)]
    road: Scores = {}
    ebpg: Scores = {}
    change: Scores = {}
    targets: dict[str, int | None] = {}
    chance: dict[str, dict[str, float | None]] = {"random": {}, "blob": {}}
    for p, rows_p in by_probe.items():
        ordered = [rows_p[i] for i in sorted(rows_p)]
        if [r["layer_name"] for r in ordered] != names or \
                sorted(rows_p) != list(range(len(names))):
            return None
        road[p] = [parse_cell(r["road"]) for r in ordered]
        eb = [parse_cell(r["ebpg"]) for r in ordered]
        if any(v is not None for v in eb):
            ebpg[p] = eb
        change[p] = [parse_cell(r.get("map_change") or "") for r in ordered]
        for k in chance:
            chance[k][p] = parse_cell(ordered[0].get(f"road_chance_{k}") or "")
        t = ordered[0]["target"]
        targets[p] = int(t) if t != "" else None
    return EpochRecord(
        global_step=int(first[min(first)]["global_step"]), names=names, method=method,
        targets=targets,
        road=road if any(any(v is not None for v in r) for r in road.values()) else None,
        ebpg=ebpg or None, change=change,
        chance=chance if any(v is not None for v in chance["random"].values()) else None)


def append_all(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` in full, synced, or not at all: a write
    that fails part-way is cut back to the old size (a new file is removed)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    start = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        if start == 0:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    finally:
        os.close(fd)


def repair_csv(path: Path) -> int:
    """Cut a torn last line (no final newline: an append cut short by a
    crash or a full disk) off ``path``, with a warning; returns the bytes
    removed. A file that cannot be cut is left as it is (its torn line is
    then left out as malformed when read)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        pos, keep = size, 0
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            k = f.read(step).rfind(b"\n")
            if k >= 0:
                keep = pos + k + 1
                break
    try:
        with open(path, "rb+") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        warnings.warn(f"camanim: {path} ends in a torn line that could not be cut off "
                      f"({os_cause(e)}); it is left out when read", stacklevel=2)
        return 0
    warnings.warn(f"camanim: {path} ended in a torn line ({size - keep} bytes, from an "
                  "append cut short by a crash or a full disk); it was cut off", stacklevel=2)
    return size - keep


def read_rows(reader: Any) -> tuple[list[dict], int]:
    """``(good rows, number of malformed rows)`` of a ``csv.DictReader`` of
    ``ybroad.csv``: a row is malformed when its field count is wrong or its
    epoch, step, layer index or scores do not parse (e.g. a torn line that a
    later row was glued onto)."""
    good, bad = [], 0
    for row in reader:
        if None in row or any(v is None for v in row.values()):
            bad += 1
            continue
        try:
            int(row["epoch"]), int(row["layer_index"])
            if row.get("global_step") not in (None, ""):
                int(row["global_step"])
            for k in ("road", "road_mean", "road_max", "ebpg", "map_change", "road_chance_random",
                      "road_chance_blob"):
                if k in row:
                    parse_cell(row[k])
        except (TypeError, ValueError):
            bad += 1
            continue
        good.append(row)
    return good, bad


def floats(a: np.ndarray | Sequence[float]) -> list[float | None]:
    """Plain floats, None where not finite."""
    return [None if not math.isfinite(float(v)) else float(v) for v in np.asarray(a).reshape(-1)]


def parse_cell(s: str | None) -> float | None:
    """A ``ybroad.csv`` score cell: a float, or None when empty or NaN (the
    one parser of the callback's history and of `camanim study`)."""
    if s in ("", "nan", "NaN", None):
        return None
    return float(s)


def _cell(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def csv_rows(epoch: int, probe: str, rec: EpochRecord) -> list[list[Any]]:
    """The ``ybroad.csv`` rows (`CSV_COLUMNS`) of one probe at one epoch."""
    names = rec.names
    none: list[float | None] = [None] * len(names)
    road = rec.road[probe] if rec.road else none
    ebpg = rec.ebpg[probe] if rec.ebpg and probe in rec.ebpg else none
    change = (rec.change.get(probe) or none) if rec.change else none
    rand, blob = (_cell(rec.chance_of(probe, k)) for k in ("random", "blob"))
    finite = [v for v in road if v is not None]
    mean = f"{sum(finite) / len(finite):.6g}" if finite else ""
    mx = f"{max(finite):.6g}" if finite else ""
    t = rec.targets.get(probe)
    return [[epoch, rec.global_step, probe, "" if t is None else t, rec.method, i, n,
             _cell(r), mean, mx, _cell(e), _cell(c), rand, blob]
            for i, (n, r, e, c) in enumerate(zip(names, road, ebpg, change, strict=True))]


