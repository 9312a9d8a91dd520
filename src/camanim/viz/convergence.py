"""Pictures of layer convergence and of the chance line, shared by the
callback (TensorBoard, ``heatmaps/``) and ``camanim study``.

* `convergence_image`: epoch-by-layer map change (``1 - Spearman`` against
  the previous callback epoch) on its whole range 0..2: 0 (the map kept its
  pixel ordering) light, 1 (unrelated to the previous map) orange, 2 (the
  ordering reversed) dark red; the first epoch has no previous map and is
  white and dotted, a change that is undefined (a constant map) is grey.
* `not_above_chance`: the cells of an epoch-by-layer ROAD matrix that do not
  beat that epoch's random-map ROAD (hatched on the ybROAD heatmap).
* `chance_tau_image`: per epoch, the share of layers above chance and the
  Kendall tau of the layer ranking, one line per run and probe.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .plots import agg_figure, figure_rgb, heatmap_image

__all__ = ["CHANGE_CMAP", "CHANGE_NOTE", "convergence_image", "not_above_chance",
           "chance_tau_image"]

CHANGE_CMAP = "YlOrRd"


CHANGE_NOTE = ("1 - Spearman of the map vs the previous epoch: 0 same pixel ranking, 1 "
               "unrelated, 2 reversed; dotted white: first epoch (nothing to compare); grey: "
               "undefined (a constant map)")


def convergence_image(change: np.ndarray, epochs: Sequence[int], names: Sequence[str],
                      title: str = "") -> np.ndarray:
    """``(E, L)`` map changes as a heatmap on the whole range of
    ``1 - Spearman``, 0..2. A column with no value at all is an epoch
    without a previous map (the first one): white and dotted; a single
    undefined cell (NaN: a constant map) is grey. ``(H, W, 3)`` uint8."""
    change = np.asarray(change, dtype=np.float64).reshape(len(epochs), len(names))
    first = (np.asarray(~np.isfinite(change).any(axis=1)) if len(names)
             else np.zeros(len(epochs), bool))
    return heatmap_image(change, epochs, names, title, cmap=CHANGE_CMAP, vmin=0.0, vmax=2.0,
                         mark_best=False, blank=first, note=CHANGE_NOTE)


def not_above_chance(road: np.ndarray, chance: np.ndarray) -> np.ndarray:
    """``(E, L)`` bool: ``road[e, l] <= chance[e]``; False where either is
    NaN (unknown is not marked).

    Args:
        road: ``(E, L)`` ROAD per epoch and layer.
        chance: ``(E,)`` ROAD of the random map per epoch.
    """
    road = np.asarray(road, dtype=np.float64)
    ch = np.asarray(chance, dtype=np.float64).reshape(-1, 1)
    with np.errstate(invalid="ignore"):
        return np.isfinite(road) & np.isfinite(ch) & (road <= ch)


def chance_tau_image(series: Sequence[tuple[str, Sequence[int], np.ndarray, np.ndarray]]
                     ) -> np.ndarray:
    """Two panels over epochs: share of layers above the random-map chance
    and Kendall tau of the per-layer ybROAD ranking against the previous
    epoch; ``series`` holds ``(label, epochs, above (E,), tau (E,))``."""
    from matplotlib.ticker import MaxNLocator

    fig = agg_figure(9.0, 3.8)
    axes = fig.subplots(1, 2)
    for label, epochs, above, tau in series:
        line, = axes[0].plot(epochs, above, marker="o", markersize=3, linewidth=1.2, label=label)
        axes[1].plot(epochs, tau, marker="o", markersize=3, linewidth=1.2, color=line.get_color())
    axes[0].set_ylim(-0.03, 1.03)
    axes[0].set_ylabel("share of layers above chance", fontsize=8)
    axes[0].set_title("layers whose ybROAD beats a random map", fontsize=9)
    axes[1].set_ylim(-1.05, 1.05)
    axes[1].axhline(0.0, color="0.6", linewidth=0.8, linestyle="--")
    axes[1].set_ylabel("Kendall tau vs previous epoch\n(1: same layer ranking, 0: unrelated)",
                       fontsize=8)
    axes[1].set_title("stability of the layer ranking", fontsize=9)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6, loc="best", frameon=False)
    fig.tight_layout()
    return figure_rgb(fig)
