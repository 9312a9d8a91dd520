"""Scalars and the text summary the callback logs for one epoch's record."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..runs.history import EpochRecord

__all__ = ["epoch_metrics", "log_epoch", "summary_text"]


def _array(values: Sequence[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


def epoch_metrics(
    rec: EpochRecord, probes: Sequence[str]
) -> tuple[dict[str, float], dict[str, int]]:
    """``(metrics, best layer index per probe)`` of one record: ``ybroad/<p>/
    {mean,max,best_layer,final_layer}``, ``ebpg/<p>/{max,best_road_layer}``
    and ``camanim/seconds``."""
    metrics: dict[str, float] = {}
    if rec.seconds is not None:
        metrics["camanim/seconds"] = float(rec.seconds)
    best: dict[str, int] = {}
    for p in probes:
        if rec.road is not None:
            s = _array(rec.road[p])
            if np.isfinite(s).any():
                b = best[p] = int(np.nanargmax(s))
                metrics[f"ybroad/{p}/mean"] = float(np.nanmean(s))
                metrics[f"ybroad/{p}/max"] = float(s[b])
                metrics[f"ybroad/{p}/best_layer"] = float(b)
                metrics[f"ybroad/{p}/final_layer"] = float(s[-1])
        if rec.ebpg is not None and p in rec.ebpg:
            eb = _array(rec.ebpg[p])
            if np.isfinite(eb).any():
                metrics[f"ebpg/{p}/max"] = float(np.nanmax(eb))
                if p in best:
                    metrics[f"ebpg/{p}/best_road_layer"] = float(eb[best[p]])
    return metrics, best


def summary_text(epoch: int, rec: EpochRecord, p: str, best: int | None,
                 class_names: Sequence[str] | None) -> str:
    """Markdown naming the probe's best layer, its score and the final layer's."""
    names = rec.names
    t = rec.targets.get(p)
    if t is None:
        tname = ""
    elif class_names and 0 <= t < len(class_names):
        tname = f"{class_names[t]} ({t})"
    else:
        tname = f"class {t}"
    lines = [f"**{p}**, epoch {epoch} (step {rec.global_step}), {rec.method}, "
             f"{len(names)} layers" + (f", target {tname}" if tname else "")]
    if best is not None and rec.road is not None:
        s = rec.road[p]
        lines.append(f"best ybROAD layer: `{names[best]}` (layer {best + 1} of {len(names)}), "
                     f"ROAD {s[best]:+.3f}; final layer `{names[-1]}` {s[-1]:+.3f}; "
                     f"mean {float(np.nanmean(_array(s))):+.3f}")
        eb = _array(rec.ebpg[p]) if rec.ebpg is not None and p in rec.ebpg else None
        if eb is not None and np.isfinite(eb).any():
            k = int(np.nanargmax(eb))
            lines.append(f"EBPG at the best ROAD layer: {eb[best]:.3f}; best EBPG "
                         f"{eb[k]:.3f} at `{names[k]}`")
    elif rec.road is None:
        lines.append("ybROAD off (road=False)")
    return "\n\n".join(lines)


def log_epoch(trainer: Any, tb: Any, epoch: int, rec: EpochRecord, probes: Sequence[str],
              class_names: Sequence[str] | None, threshold: float) -> None:
    """Scalars to every logger; the text summary (with the chance,
    convergence and ranking lines) to TensorBoard's ``tb`` writer."""
    from .convergence import epoch_scalars, epoch_text

    step = int(trainer.global_step)
    metrics, best = epoch_metrics(rec, probes)
    metrics.update(epoch_scalars(rec, probes, threshold))
    for lg in trainer.loggers:
        lg.log_metrics(metrics, step=step)
    if tb is not None:
        for p in probes:
            text = [summary_text(epoch, rec, p, best.get(p), class_names),
                    epoch_text(rec, p, threshold)]
            tb.add_text(f"camanim/{p}/summary", "\n\n".join(filter(None, text)), step)
