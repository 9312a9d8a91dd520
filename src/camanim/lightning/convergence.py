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
import warnings
from numbers import Real
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..core.maps import LayerMaps, minmax, resize_map, wide
from ..errors import CAManimError
from ..metrics.convergence import (DEFAULT_SETTLE_THRESHOLD, chance_road, kendall_tau,
                                   rank_change, rank_maps, share_below)
from ..runs.history import History, floats

__all__ = ["Convergence", "SANITY_WHEN", "check_sanity", "check_settle_threshold",
           "epoch_scalars", "epoch_text", "layer_ranks", "run_sanity"]

SANITY_WHEN = ("start", "end")


# ------------------------------------------------------------------ options

def check_settle_threshold(value: Any) -> float:
    """A map change in (0, 2]: below it a layer counts as settled."""
    if isinstance(value, bool) or not isinstance(value, (Real, np.number)) \
            or not math.isfinite(float(value)) or not 0 < float(value) <= 2:
        raise CAManimError(f"settle_threshold must be a map change in (0, 2] (1 - Spearman; "
                           f"default 0.1), got {value!r}")
    return float(value)


def check_sanity(value: Any) -> tuple[str, ...]:
    """``sanity=`` as a tuple of ``"start"`` / ``"end"`` (empty: off)."""
    if value is None or value is False or value == "":
        return ()
    parts = value.split(",") if isinstance(value, str) else value
    if not isinstance(parts, (list, tuple)):
        raise CAManimError(f"sanity must be None, 'start', 'end' or 'start,end', got {value!r}")
    parts = [str(p).strip() for p in parts]
    bad = [p for p in parts if p not in SANITY_WHEN]
    if bad or not parts:
        raise CAManimError(f"sanity must be None, 'start', 'end' or 'start,end' (when to run "
                           f"the model-randomization check), got {value!r}")
    return tuple(w for w in SANITY_WHEN if w in parts)


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

    Args:
        maps: measure the map change (``convergence=`` of the callback).
        chance: compute the chance ROAD (``chance=``; needs ROAD).
        threshold: change below which a layer counts as settled.
    """

    def __init__(self, maps: bool = True, chance: bool = True,
                 threshold: float = DEFAULT_SETTLE_THRESHOLD) -> None:
        self.maps = bool(maps)
        self.chance = bool(chance)
        self.threshold = check_settle_threshold(threshold)
        self._prev: dict | None = None        # epoch, names, size, raw, ranks
        self._restored: dict | None = None    # from a checkpoint: no ranks yet
        self._pending: dict[str, Any] = {}

    def new_fit(self) -> None:
        """Forget measurements of an aborted epoch."""
        self._pending = {}

    # ---------------------------------------------------------- measuring
    def measure_maps(self, maps: LayerMaps, timing: dict[str, float], here: bool = True) -> None:
        """Maps still on the training device: rank them (``here``: on rank zero)."""
        if self.maps and here:
            t = _now()
            self._pending["ranks"] = layer_ranks(maps.raw, maps.input_size)
            timing["convergence"] = _now() - t

    def measure_chance(self, model: torch.nn.Module, x: torch.Tensor, targets: Any,
                       road_kw: dict[str, Any], timing: dict[str, float], here: bool = True,
                       logits: torch.Tensor | None = None) -> None:
        """After the layers' ybROAD, with its targets, keyword arguments and
        the CAM pass's logits (``here``: on rank zero)."""
        if self.chance and here:
            t = _now()
            res = chance_road(model, x, targets, logits=logits, **road_kw)
            self._pending["chance"] = np.asarray(res.scores, dtype=np.float64)   # (2, B)
            timing["chance"] = _now() - t

    def fill(self, record: dict, epoch: int, maps: LayerMaps, probes: Sequence[str],
             history: History) -> None:
        """Add ``change``, ``chance`` and ``rank_tau`` to this epoch's record
        (maps on the CPU) and keep this epoch's maps for the next one."""
        names, size = list(maps.names), tuple(maps.input_size)
        ranks = self._pending.pop("ranks", None)
        before = [e for e in history.epochs if e < epoch]   # the callback epochs so far
        if self.maps:
            if ranks is None:
                ranks = layer_ranks(maps.raw, size)
            prev = self._previous(before[-1] if before else None, names, size, maps.batch_size)
            change = None if prev is None else rank_change(prev["ranks"], ranks)
            record["change"] = {p: [None] * len(names) if change is None else floats(change[:, b])
                                for b, p in enumerate(probes)}
            record["change_from"] = None if prev is None else int(prev["epoch"])
            self._prev = {"epoch": int(epoch), "names": names, "size": size,
                          "raw": [r.detach().cpu() for r in maps.raw], "ranks": ranks}
        chance = self._pending.pop("chance", None)
        if chance is not None:
            record["chance"] = {k: {p: floats(chance[i, b:b + 1])[0] for b, p in enumerate(probes)}
                                for i, k in enumerate(("random", "blob"))}
        if record.get("road") is not None and before:
            last = history[before[-1]]
            if last["names"] == names and last.get("road") is not None:
                record["rank_tau"] = {p: floats([kendall_tau(last["road"][p], record["road"][p])])[0]
                                      for p in probes}
                record["rank_tau_from"] = int(before[-1])

    def _previous(self, epoch: int | None, names: list[str], size: tuple,
                  batch: int) -> dict | None:
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
        self._prev = None
        self._restored = None
        if not state:
            return
        try:
            self._restored = {"epoch": int(state["epoch"]), "names": list(state["names"]),
                              "size": tuple(int(s) for s in state["size"]),
                              "raw": [torch.tensor(r, dtype=torch.float32) for r in state["raw"]]}
        except (KeyError, TypeError, ValueError):
            warnings.warn("CAManimCallback: unreadable convergence state in the checkpoint; the "
                          "first map change after resuming is left empty", stacklevel=3)


def _now() -> float:
    import time

    return time.perf_counter()


# ------------------------------------------------------------------ logging

def _arr(values: Sequence[float | None] | None) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in (values or [])], dtype=np.float64)


def _above(rec: dict, p: str) -> tuple[int, int, float] | None:
    """``(layers above the random map's ROAD, layers with a score, chance)``."""
    chance = ((rec.get("chance") or {}).get("random") or {}).get(p)
    if chance is None or rec.get("road") is None:
        return None
    s = _arr(rec["road"][p])
    s = s[np.isfinite(s)]
    return int((s > chance).sum()), int(s.size), float(chance)


def epoch_scalars(rec: dict, probes: Sequence[str],
                  threshold: float = DEFAULT_SETTLE_THRESHOLD) -> dict[str, float]:
    """``convergence/<p>/share_settled``, ``ybroad/<p>/{above_chance,
    chance_random, chance_blob, rank_tau}`` and ``ybroad/rank_tau_mean``
    (only the defined ones)."""
    out: dict[str, float] = {}
    taus = []
    for p in probes:
        ch = (rec.get("change") or {}).get(p)
        share = share_below(_arr(ch), threshold) if ch else math.nan
        if math.isfinite(share):
            out[f"convergence/{p}/share_settled"] = share
        ab = _above(rec, p)
        if ab is not None and ab[1]:
            out[f"ybroad/{p}/above_chance"] = ab[0] / ab[1]
        for k in ("random", "blob"):
            v = ((rec.get("chance") or {}).get(k) or {}).get(p)
            if v is not None:
                out[f"ybroad/{p}/chance_{k}"] = float(v)
        tau = (rec.get("rank_tau") or {}).get(p)
        if tau is not None:
            out[f"ybroad/{p}/rank_tau"] = float(tau)
            taus.append(float(tau))
    if taus:
        out["ybroad/rank_tau_mean"] = float(np.mean(taus))
    return out


def epoch_text(rec: dict, p: str, threshold: float = DEFAULT_SETTLE_THRESHOLD) -> str:
    """Markdown lines on chance, convergence and ranking for the summary
    ("" when there is nothing to say)."""
    lines = []
    ab = _above(rec, p)
    if ab is not None and ab[1]:
        k, n, chance = ab
        blob = ((rec.get("chance") or {}).get("blob") or {}).get(p)
        base = f"random map ROAD {chance:+.3f}" + ("" if blob is None else f", centred blob {blob:+.3f}")
        if k == 0:
            lines.append(f"**nothing above chance**: no layer's ybROAD beats the chance line "
                         f"({base}); the model finds the class at no layer yet")
        else:
            lines.append(f"{k} of {n} layers above chance ({base})")
    ch = (rec.get("change") or {}).get(p)
    if ch:
        c = _arr(ch)
        if np.isfinite(c).any():
            settled = int((c[np.isfinite(c)] < threshold).sum())
            lines.append(f"map change since epoch {rec.get('change_from')} (1 - Spearman): median "
                         f"{float(np.nanmedian(c)):.3f}; {settled} of {c.size} layers settled "
                         f"(< {threshold:g})")
        else:
            lines.append("map change: no earlier callback epoch to compare with yet")
    tau = (rec.get("rank_tau") or {}).get(p)
    if tau is not None:
        lines.append(f"layer ranking vs epoch {rec.get('rank_tau_from')}: Kendall tau {tau:+.3f}")
    return "\n\n".join(lines)


def media_fields(history: History, probes: Sequence[str], rec: dict,
                 maps_on: bool) -> dict[str, dict]:
    """What the background pictures need: ``convergence`` (probe -> epochs,
    names, ``(E, L)`` changes), ``road_mask`` (probe -> ``(E, L)`` bool, not
    above chance) and ``chance`` (probe -> this epoch's random-map ROAD)."""
    from ..viz.convergence import not_above_chance

    out: dict[str, dict] = {"convergence": {}, "road_mask": {}, "chance": {}}
    for p in probes:
        if maps_on and rec.get("change") is not None:
            out["convergence"][p] = history.matrix(p, "change")
        if rec.get("road") is not None and rec.get("chance") is not None:
            epochs, _, road = history.matrix(p, "road")
            line = [((history[e].get("chance") or {}).get("random") or {}).get(p) for e in epochs]
            out["road_mask"][p] = not_above_chance(road, _arr(line))
            out["chance"][p] = rec["chance"]["random"].get(p)
    return out


# ------------------------------------------------------------------ sanity

def run_sanity(when: str, cb: Any, model: torch.nn.Module, x: torch.Tensor, targets: Any,
               out_dir: Path, writer: Any, step: int) -> Any:
    """The model-randomization check (`camanim.metrics.sanity.sanity_check`)
    of the probes ``x`` at fit ``when`` ("start" or "end") with the callback
    ``cb``'s method, layers and options: writes ``sanity_<when>.json`` and
    ``.png`` to ``out_dir`` and the table as TensorBoard text
    ``camanim/sanity/<when>``. A failure raises or warns as ``cb.on_error``
    says. Returns the `SanityReport` (None after a warning)."""
    from ..metrics.sanity import sanity_check

    try:
        rep = sanity_check(model, x, cb.method, cb.layers, targets, max_layers=cb.max_layers,
                           seed=cb.seed, batch_size=cb.batch_size or 32, **cb.cam_options)
        rep.to_json(out_dir / f"sanity_{when}.json")
        rep.plot(out_dir / f"sanity_{when}.png",
                 title=f"Model randomization sanity check at fit {when}: {rep.method} "
                       f"({'FLAGGED' if rep.method_flagged else 'passed'})")
    except Exception as e:  # noqa: BLE001 - raised or warned as any monitoring failure
        if cb.on_error == "raise":
            raise
        warnings.warn(f"CAManimCallback: the sanity check at fit {when} failed "
                      f"({type(e).__name__}: {e}); training goes on", stacklevel=3)
        return None
    if writer is not None:
        text = "\n".join("    " + line for line in rep.table().splitlines())
        writer.add_text(f"camanim/sanity/{when}", text, step)
    return rep
