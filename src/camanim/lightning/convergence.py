"""The callback's convergence, chance and ranking bookkeeping, epoch by epoch.

At every callback epoch, on rank zero, `Convergence` adds to the epoch's
record (`camanim.runs.history`):

* ``change``: per probe, for each layer ``1 - Spearman`` between this
  epoch's upsampled map and the previous callback epoch's
  (`camanim.metrics.convergence.rank_change`; ``None`` at the first epoch,
  after the layer list changed, or where a map is constant). The ranks of
  this epoch's maps are computed on the training device and kept on the CPU
  for the next epoch, so each epoch is ranked once.
* ``chance``: per probe, ROAD of a seeded random map and of a centred
  Gaussian blob (`camanim.metrics.convergence.chance_road`) with the layers'
  percentiles, noise, seed and targets: the line a layer must clear. The
  random map has the same seed at every epoch, so the line moves only
  because the model does.
* ``rank_tau``: per probe, Kendall tau-b between this epoch's and the
  previous callback epoch's per-layer ybROAD (the ranking of the layers).

Resume. Ranks cannot be recomputed after a restart unless the maps they
come from survive, so the callback's ``state_dict`` keeps the last callback
epoch's *raw* maps (each layer at its own resolution, plain lists: ~1 MB for
4 probes x 53 ResNet-50 layers at 224 px, against ~42 MB of upsampled
ranks). That is the epoch a resumed run needs in every case Lightning has:
a checkpoint written at train-epoch end (``ModelCheckpoint``'s default when
validation runs once per epoch) holds epoch e's maps and the run goes on at
e + 1; one written at validation end or mid-epoch holds e - 1's maps and the
run repeats epoch e. A change is only measured against the last callback
epoch before the current one (by the history, after reading back
``ybroad.csv``); when the checkpoint lacks its maps (written by an older
camanim, or before the callback was added), the first change after resuming
is missing (NaN, an empty CSV cell), never measured against another epoch.
Every later epoch is continuous.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ..core.layers import Selector
from ..core.maps import LayerMaps, minmax, resize_map, wide
from ..metrics.convergence import (
    DEFAULT_SETTLE_THRESHOLD,
    chance_road,
    kendall_tau,
    rank_change,
    rank_maps,
    share_below,
)
from ..runs.history import EpochRecord, History, floats

__all__ = ["Convergence", "epoch_scalars", "epoch_text", "layer_ranks", "media_fields",
           "run_sanity"]


# ------------------------------------------------------------------ ranks

def layer_ranks(raw: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Pixel ranks of every layer's upsampled "local" map, on the CPU.

    The steps of `LayerMaps.upsample` ("local": min-max, bilinear resize,
    min-max) one layer at a time, so memory stays flat, on the maps' device.

    Args:
        raw: L tensors ``(B, h_l, w_l)`` (`LayerMaps.raw`).
        size: ``(H, W)`` input size.

    Returns:
        ``(L, B, H * W)`` float32 ranks; a layer with a non-finite value is
        all NaN (its change is then NaN, not an error).
    """
    h, w = int(size[0]), int(size[1])
    b = int(raw[0].shape[0]) if raw else 0
    out = torch.empty((len(raw), b, h * w), dtype=torch.float32)
    for i, r in enumerate(raw):
        m = minmax(resize_map(minmax(wide(r.detach())), (h, w)))
        if bool(torch.isfinite(m).all()):
            out[i] = rank_maps(m[None])[0].cpu()
        else:
            out[i] = float("nan")
    return out


# ------------------------------------------------------------------ tracker

class Convergence:
    """Map change, chance ROAD and ranking tau for `CAManimCallback`.

    The measurements of an epoch are made on the training device
    (`measure_maps`, `measure_chance`) and handed to `fill` with the record.

    Args:
        changes: measure each layer's map change (``convergence=`` of the
            callback).
        chance: compute the chance ROAD (``RoadOptions.chance``; needs ROAD).
        threshold: change below which a layer counts as settled (checked by
            `camanim.lightning.validation`).
    """

    def __init__(self, changes: bool = True, chance: bool = True,
                 threshold: float = DEFAULT_SETTLE_THRESHOLD) -> None:
        self.changes = bool(changes)
        self.chance = bool(chance)
        self.threshold = float(threshold)
        self._prev: dict[str, Any] | None = None        # epoch, names, size, raw, ranks
        self._restored: dict[str, Any] | None = None    # from a checkpoint: no ranks yet

    # ---------------------------------------------------------- measuring
    def measure_maps(self, maps: LayerMaps, timing: dict[str, float]) -> torch.Tensor | None:
        """The ``(L, B, H * W)`` pixel ranks of the maps, still on the
        training device (None when map changes are off)."""
        if not self.changes:
            return None
        t = time.perf_counter()
        ranks = layer_ranks(maps.raw, maps.input_size)
        timing["convergence"] = time.perf_counter() - t
        return ranks

    def measure_chance(self, model: torch.nn.Module, x: torch.Tensor, targets: Any,
                       road_kw: dict[str, Any], timing: dict[str, float],
                       logits: torch.Tensor | None = None) -> np.ndarray | None:
        """``(2, B)`` ROAD of the random map and the blob, with the layers'
        ybROAD targets, keyword arguments and the CAM pass's logits (None
        when off)."""
        if not self.chance:
            return None
        t = time.perf_counter()
        res = chance_road(model, x, targets, logits=logits, **road_kw)
        timing["chance"] = time.perf_counter() - t
        return np.asarray(res.scores, dtype=np.float64)

    def fill(self, record: EpochRecord, epoch: int, maps: LayerMaps, probes: Sequence[str],
             history: History, ranks: torch.Tensor | None = None,
             chance: np.ndarray | None = None) -> None:
        """Add ``change`` (from ``ranks``), ``chance`` and ``rank_tau`` to
        this epoch's record (maps on the CPU) and keep this epoch's maps for
        the next one."""
        names, size = list(maps.names), maps.input_size
        before = [e for e in history.epochs if e < epoch]   # the callback epochs so far
        if ranks is not None:
            prev = self._previous(before[-1] if before else None, names, size, maps.batch_size)
            change = None if prev is None else rank_change(prev["ranks"], ranks)
            record.change = {p: [None] * len(names) if change is None else floats(change[:, b])
                             for b, p in enumerate(probes)}
            record.change_from = None if prev is None else int(prev["epoch"])
            self._prev = {"epoch": int(epoch), "names": names, "size": size,
                          "raw": [r.detach().cpu() for r in maps.raw], "ranks": ranks}
        if chance is not None:
            record.chance = {k: {p: floats(chance[i, b:b + 1])[0] for b, p in enumerate(probes)}
                             for i, k in enumerate(("random", "blob"))}
        if record.road is not None and before:
            last = history[before[-1]]
            if last.names == names and last.road is not None:
                record.rank_tau = {p: floats([kendall_tau(last.road[p], record.road[p])])[0]
                                   for p in probes}
                record.rank_tau_from = int(before[-1])

    def _previous(self, epoch: int | None, names: list[str], size: tuple[int, int],
                  batch: int) -> dict[str, Any] | None:
        """The kept maps of callback epoch ``epoch`` (the last one before
        this), from this fit or the checkpoint; None if neither holds that
        epoch with the same layers, images and size."""
        cands = [c for c in (self._prev, self._restored) if c is not None]
        ok = [c for c in cands if c["epoch"] == epoch and c["names"] == names and c["raw"]
              and tuple(c["size"]) == size and int(c["raw"][0].shape[0]) == batch]
        if epoch is None or not ok:
            return None
        best = ok[0]
        if best.get("ranks") is None:
            best["ranks"] = layer_ranks(best["raw"], size)
        return best

    # ---------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any] | None:
        """The last callback epoch's raw maps as plain lists (JSON-able)."""
        prev = self._prev or self._restored
        if prev is None:
            return None
        return {"epoch": prev["epoch"], "names": list(prev["names"]), "size": list(prev["size"]),
                "raw": [r.float().tolist() for r in prev["raw"]]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Take back the raw maps of a `state_dict` (their ranks when needed)."""
        self._prev = None
        self._restored = None
        if not state:
            return
        try:
            self._restored = {"epoch": int(state["epoch"]), "names": list(state["names"]),
                              "size": tuple(int(s) for s in state["size"]),
                              "raw": [torch.tensor(r, dtype=torch.float32) for r in state["raw"]]}
        except (KeyError, TypeError, ValueError):
            rank_zero_warn("CAManimCallback: unreadable convergence state in the checkpoint; "
                           "the first map change after resuming is left empty")


# ------------------------------------------------------------------ logging

def _arr(values: Sequence[float | None] | None) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in (values or [])], dtype=np.float64)


def epoch_scalars(rec: EpochRecord, probes: Sequence[str],
                  threshold: float = DEFAULT_SETTLE_THRESHOLD) -> dict[str, float]:
    """``convergence/<p>/share_settled``, ``ybroad/<p>/{above_chance,
    chance_random, chance_blob, rank_tau}`` and ``ybroad/rank_tau_mean``
    (only the defined ones)."""
    out: dict[str, float] = {}
    taus = []
    for p in probes:
        ch = (rec.change or {}).get(p)
        share = share_below(_arr(ch), threshold) if ch else math.nan
        if math.isfinite(share):
            out[f"convergence/{p}/share_settled"] = share
        ab = rec.above_chance(p)
        if ab is not None and ab[1]:
            out[f"ybroad/{p}/above_chance"] = ab[0] / ab[1]
        for k in ("random", "blob"):
            v = rec.chance_of(p, k)
            if v is not None:
                out[f"ybroad/{p}/chance_{k}"] = float(v)
        tau = (rec.rank_tau or {}).get(p)
        if tau is not None:
            out[f"ybroad/{p}/rank_tau"] = float(tau)
            taus.append(float(tau))
    if taus:
        out["ybroad/rank_tau_mean"] = float(np.mean(taus))
    return out


def epoch_text(rec: EpochRecord, p: str, threshold: float = DEFAULT_SETTLE_THRESHOLD) -> str:
    """Markdown lines on chance, convergence and ranking for the summary
    ("" when there is nothing to say)."""
    lines = []
    ab = rec.above_chance(p)
    if ab is not None and ab[1]:
        k, n, chance = ab
        blob = rec.chance_of(p, "blob")
        base = f"random map ROAD {chance:+.3f}" + ("" if blob is None
                                                   else f", centred blob {blob:+.3f}")
        if k == 0:
            lines.append(f"**nothing above chance**: no layer's ybROAD beats the chance line "
                         f"({base}); the model finds the class at no layer yet")
        else:
            lines.append(f"{k} of {n} layers above chance ({base})")
    ch = (rec.change or {}).get(p)
    if ch:
        c = _arr(ch)
        if np.isfinite(c).any():
            settled = int((c[np.isfinite(c)] < threshold).sum())
            lines.append(f"map change since epoch {rec.change_from} (1 - Spearman): median "
                         f"{float(np.nanmedian(c)):.3f}; {settled} of {c.size} layers settled "
                         f"(< {threshold:g})")
        else:
            lines.append("map change: no earlier callback epoch to compare with yet")
    tau = (rec.rank_tau or {}).get(p)
    if tau is not None:
        lines.append(f"layer ranking vs epoch {rec.rank_tau_from}: Kendall tau {tau:+.3f}")
    return "\n\n".join(lines)


def media_fields(history: History, probes: Sequence[str], rec: EpochRecord,
                 changes_on: bool) -> dict[str, dict[str, Any]]:
    """What the background pictures need: ``convergence`` (probe -> epochs,
    names, ``(E, L)`` changes), ``road_mask`` (probe -> ``(E, L)`` bool, not
    above chance) and ``chance`` (probe -> this epoch's random-map ROAD)."""
    from ..viz.convergence import not_above_chance

    out: dict[str, dict[str, Any]] = {"convergence": {}, "road_mask": {}, "chance": {}}
    for p in probes:
        if changes_on and rec.change is not None:
            out["convergence"][p] = history.matrix(p, "change")
        if rec.road is not None and rec.chance is not None:
            epochs, _, road = history.matrix(p, "road")
            line = [history[e].chance_of(p) for e in epochs]
            out["road_mask"][p] = not_above_chance(road, _arr(line))
            out["chance"][p] = rec.chance_of(p)
    return out


# ------------------------------------------------------------------ sanity

def run_sanity(when: str, model: torch.nn.Module, x: torch.Tensor, targets: Any, *,
               method: Any, layers: Selector, seed: int, batch_size: int | None,
               cam_options: dict[str, Any], raise_errors: bool, out_dir: Path, writer: Any,
               step: int) -> Any:
    """The model-randomization check (`camanim.metrics.sanity.sanity_check`)
    of the probes ``x`` at fit ``when`` ("start" or "end") with the
    callback's method, layers and options: writes ``sanity_<when>.json`` and
    ``.png`` to ``out_dir`` and the table as TensorBoard text
    ``camanim/sanity/<when>``. A failure raises (``raise_errors``) or warns
    once. Returns the `SanityReport` (None after a warning)."""
    from ..metrics.sanity import sanity_check

    try:
        rep = sanity_check(model, x, method, layers, targets, seed=seed,
                           batch_size=batch_size or 32, **cam_options)
        rep.to_json(out_dir / f"sanity_{when}.json")
        rep.plot(out_dir / f"sanity_{when}.png",
                 title=f"Model randomization sanity check at fit {when}: {rep.method} "
                       f"({'FLAGGED' if rep.method_flagged else 'passed'})")
    except Exception as e:  # noqa: BLE001 - raised or warned as any monitoring failure
        if raise_errors:
            raise
        rank_zero_warn(f"CAManimCallback: the sanity check at fit {when} failed "
                       f"({type(e).__name__}: {e}); training goes on")
        return None
    if writer is not None:
        text = "\n".join("    " + line for line in rep.table().splitlines())
        writer.add_text(f"camanim/sanity/{when}", text, step)
    return rep
