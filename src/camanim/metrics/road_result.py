"""ybROAD results: `YbRoad` (scores of every layer, per-percentile MoRF/LeRF,
summary, CSV/JSON/plot) and `RoadSummary`."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np

from ..core.files import atomic_path, save_figure, write_json
from ..errors import CAManimError

DEFAULT_PERCENTILES = (20, 40, 60, 80)
#: What a ROAD percentile means here, in `road_masks`, `ybroad` and
#: `YbRoad` (pytorch-grad-cam's convention, ``ROADCombined``): ``p`` is the
#: percentage of pixels KEPT. MoRF at ``p`` = ``ROADMostRelevantFirst(p)``
#: keeps the pixels with ``cam < np.percentile(cam, p)`` and imputes the
#: ``100 - p`` percent most relevant ones; LeRF at ``p`` =
#: ``ROADLeastRelevantFirst(p)`` does the same on ``1 - cam``, imputing the
#: ``100 - p`` percent least relevant ones. So p = 20 removes 80% of the pixels.
PERCENTILE_CONVENTION = "kept"


# ------------------------------------------------------------------ results

@dataclass
class RoadSummary:
    """ybROAD of one image (the paper's Table 2 comparison).

    ROAD (RemOve And Debias) imputes the pixels a map ranks most relevant
    and, separately, those it ranks least relevant, and compares the
    model's score of the target class: ``(LeRF - MoRF) / 2``. Positive is
    good (removing what the map points at hurts more than removing the
    rest); a map that finds the class typically scores 0.05 to 0.3 with
    softmax scores; near 0, or not above the ROAD of a random map (the
    chance line), the map tells nothing about the model. ``str(summary)``
    says it in words.

    Attributes:
        image: index in the batch.
        target: class index scored (``None`` for a callable without one).
        mean: mean ybROAD over layers.
        max: best layer's ROAD.
        best_layer / best_index: name and index of that layer.
        final: ROAD of the last layer (the usual practice).
        max_minus_final: gain of picking the best layer over the last one.
        fails: mean ybROAD near 0: the model finds the class at no layer.
        chance: ROAD of a random map of this image (``None``: not given).
        above_chance: layers whose ROAD is above ``chance`` (``None``: not given).
    """

    image: int
    target: int | None
    mean: float
    max: float
    best_layer: str
    best_index: int
    final: float
    max_minus_final: float
    fails: bool
    chance: float | None = None
    above_chance: int | None = None
    n_layers: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields and `verdict`, JSON-ready."""
        return {**asdict(self), "verdict": self.verdict}

    @property
    def verdict(self) -> str:
        """The summary in words: above chance or not, and where the best layer is."""
        best = f"best layer {self.best_layer} (#{self.best_index}, ROAD {self.max:+.3f})"
        if self.above_chance == 0:
            return (f"no layer above chance: every layer's ROAD is at or below a random map's "
                    f"({self.chance:+.3f}); the maps do not show what the model uses")
        above = ("no chance line given" if self.above_chance is None else
                 f"{self.above_chance} of {self.n_layers} layers above chance ({self.chance:+.3f})")
        if self.fails:
            return (f"fails: mean ybROAD {self.mean:+.3f} is near 0, the model finds the class "
                    f"at no layer; {above}; {best}")
        return f"{above}; {best}; mean {self.mean:+.3f}"

    def __str__(self) -> str:
        return (f"image {self.image}" + ("" if self.target is None else f", class {self.target}")
                + f": {self.verdict}")


@dataclass
class YbRoad:
    """ROAD of every layer's map for every image.

    Attributes:
        scores: ``(L, B)`` ROAD (mean over trials).
        names: the L layer names (``maps.names``).
        targets: B class indices scored (``None`` for callables without one).
        percentiles: the P percentiles averaged over: percentages of pixels
            KEPT (`PERCENTILE_CONVENTION`); `removed_percent` gives
            ``100 - p``.
        std: ``(L, B)`` standard deviation over trials (ddof 1; 0 for 1 trial).
        trials: ``(T, L, B)`` ROAD of every trial (noise seeds seed, seed+1...).
        morf: ``(T, L, B, P)`` score change ``score(perturbed) -
            score(clean)``; ``morf[..., j]`` is ``ROADMostRelevantFirst(
            percentiles[j])``: the ``100 - percentiles[j]`` percent most
            relevant pixels removed.
        lerf: ``(T, L, B, P)`` the same with ``ROADLeastRelevantFirst``:
            the ``100 - percentiles[j]`` percent least relevant removed.
        clean: ``(B,)`` score of the unperturbed images.
        score: ``"softmax"``, ``"logit"`` or ``"callable"``.
        noise, seed: imputation noise and first seed.
    """

    scores: np.ndarray
    names: list[str]
    targets: list[int | None]
    percentiles: tuple[float, ...]
    std: np.ndarray
    trials: np.ndarray
    morf: np.ndarray
    lerf: np.ndarray
    clean: np.ndarray
    score: str = "softmax"
    noise: float = 0.01
    seed: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def removed_percent(self) -> tuple[float, ...]:
        """Percentage of pixels imputed at each of `percentiles` (``100 - p``),
        the label of ``morf[..., j]`` and ``lerf[..., j]`` in removal terms."""
        return tuple(100 - p for p in self.percentiles)

    @property
    def n_trials(self) -> int:
        return int(self.trials.shape[0])

    def __len__(self) -> int:
        return len(self.names)

    def fails(self, threshold: float = 0.05) -> np.ndarray:
        """``(B,)`` bool: ``|mean ybROAD| < threshold``, the paper's failure
        case (Fig. 11: the model does not find the class at any layer)."""
        return np.asarray(np.abs(self.scores.mean(axis=0)) < float(threshold))

    def summary(self, fail_threshold: float = 0.05, chance: Any = None) -> list[RoadSummary]:
        """One `RoadSummary` per image (``.to_dict()`` is JSON-ready,
        ``str()`` says it in words).

        Args:
            fail_threshold: see `fails`.
            chance: the ROAD of a random map: a number, one per image, or the
                `YbRoad` of `camanim.metrics.convergence.chance_road` (its
                ``random`` row); each summary then counts the layers above it.
        """
        out = []
        fails = self.fails(fail_threshold)
        ch = chance_scores(chance, self.scores.shape[1])
        for b in range(self.scores.shape[1]):
            col = self.scores[:, b]
            best = int(np.argmax(col))
            c = None if ch is None else float(ch[b])
            out.append(RoadSummary(
                image=b, target=self.targets[b], mean=float(col.mean()), max=float(col[best]),
                best_layer=self.names[best], best_index=best, final=float(col[-1]),
                max_minus_final=float(col[best] - col[-1]), fails=bool(fails[b]), chance=c,
                above_chance=None if c is None else int((col > c).sum()), n_layers=len(col)))
        return out

    def smoothed(self, window: int = 5) -> np.ndarray:
        """``(L, B)`` centred moving average over layers (the paper's
        suggestion); near the ends the window shrinks to the layers there."""
        if isinstance(window, bool) or not isinstance(window, Integral) or window < 1:
            raise CAManimError(f"window must be a positive int (layers), got {window!r}")
        n, half = self.scores.shape[0], (int(window) - 1) // 2
        return np.stack([self.scores[max(0, i - half):i - half + int(window)].mean(axis=0)
                         for i in range(n)])

    # ---------------------------------------------------------------- files
    def to_csv(self, path: str | Path) -> Path:
        """Tidy long form: one row per (image, layer).

        Columns ``image, target, layer_index, layer_name, road``; with
        several trials also ``road_std`` and ``road_trial<k>``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cols = ["image", "target", "layer_index", "layer_name", "road"]
        t = self.n_trials
        if t > 1:
            cols += ["road_std"] + [f"road_trial{k}" for k in range(t)]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for b in range(self.scores.shape[1]):
                tgt = "" if self.targets[b] is None else self.targets[b]
                for i, name in enumerate(self.names):
                    row = [b, tgt, i, name, repr(float(self.scores[i, b]))]
                    if t > 1:
                        row += [repr(float(self.std[i, b]))]
                        row += [repr(float(v)) for v in self.trials[:, i, b]]
                    w.writerow(row)
        return path

    def to_dict(self) -> dict[str, Any]:
        """Everything, as JSON-ready lists."""
        return {
            "names": list(self.names), "targets": list(self.targets),
            "percentiles": list(self.percentiles),
            "percentile_convention": PERCENTILE_CONVENTION,
            "removed_percent": list(self.removed_percent), "score": self.score,
            "noise": self.noise, "seed": self.seed, "n_trials": self.n_trials,
            "scores": self.scores.tolist(), "std": self.std.tolist(),
            "clean": self.clean.tolist(), "seconds": self.seconds,
            "summary": [s.to_dict() for s in self.summary()],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON of `to_dict`; written to ``path`` if given."""
        return write_json(path, self.to_dict())

    def plot(self, path: str | Path, images: Sequence[int] | None = None,
             smooth: int | None = None, title: str | None = None, chance: Any = None) -> Path:
        """ybROAD curves (paper Fig. 8): one panel per image, layer index vs
        ROAD, the trials' spread as a band, the mean as a dashed line, the
        best layer marked, an optional moving average (``smooth``) and, with
        ``chance`` (as for `summary`), the ROAD of a random map as a red
        dashed line: layers at or below it are no better than chance."""
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        idx = list(range(self.scores.shape[1])) if images is None else [int(i) for i in images]
        if not idx or any(not 0 <= i < self.scores.shape[1] for i in idx):
            raise CAManimError(
                f"images must be indices in 0..{self.scores.shape[1] - 1}, got {images}"
            )
        sm = self.smoothed(smooth) if smooth else None
        ch = chance_scores(chance, self.scores.shape[1])
        n_layers = len(self.names)
        x = np.arange(n_layers)
        fig, axes = plt.subplots(len(idx), 1, figsize=(max(6.0, min(16.0, 0.15 * n_layers + 4)),
                                                          2.8 * len(idx)), squeeze=False)
        for ax, b in zip(axes[:, 0], idx, strict=False):
            y = self.scores[:, b]
            if self.n_trials > 1:
                ax.fill_between(x, y - self.std[:, b], y + self.std[:, b], alpha=0.25,
                                color="tab:blue", lw=0, label=f"±1 std ({self.n_trials} trials)")
            ax.plot(x, y, "-o", ms=2.5, lw=1.2, color="tab:blue", label="ROAD")
            if sm is not None:
                ax.plot(x, sm[:, b], lw=2.0, color="tab:orange", label=f"moving average ({smooth})")
            mean = float(y.mean())
            ax.axhline(mean, ls="--", lw=1, color="gray", label=f"mean {mean:.3f}")
            best = int(np.argmax(y))
            ax.plot([best], [y[best]], "*", ms=12, color="tab:red",
                    label=f"max {y[best]:.3f} at {best}: {self.names[best]}")
            ax.axhline(0.0, lw=0.6, color="black")
            if ch is not None and np.isfinite(ch[b]):
                above = int((y > ch[b]).sum())
                ax.axhline(float(ch[b]), ls=(0, (4, 3)), lw=1.2, color="tab:red",
                           label=f"chance (random map) {ch[b]:+.3f}: {above}/{n_layers} above")
            tgt = self.targets[b]
            ax.set_title(title or f"ybROAD, image {b}" + ("" if tgt is None else f", class {tgt}"),
                         fontsize=10)
            ax.set_ylabel("ROAD (> 0: good)")
            ax.legend(fontsize=7, loc="best")
            ax.grid(alpha=0.3)
            if n_layers <= 30:
                ax.set_xticks(x)
                ax.set_xticklabels(self.names, rotation=60, ha="right", fontsize=6)
        axes[-1, 0].set_xlabel("layer index")
        fig.text(0.5, 0.005, "ROAD = (LeRF - MoRF) / 2: the class score lost when the map's most "
                 "relevant pixels are imputed,\nminus that lost for its least relevant ones; "
                 "> 0 and above chance (a random map) is good",
                 ha="center", va="bottom", fontsize=6.5, color="0.3")
        fig.tight_layout(rect=(0, 0.3 / fig.get_size_inches()[1], 1, 1))
        return save_figure(fig, path)

    def __repr__(self) -> str:
        return (
            f"YbRoad(layers={len(self.names)}, images={self.scores.shape[1]}, "
            f"trials={self.n_trials}, percentiles={list(self.percentiles)}, score={self.score!r})"
        )


def chance_scores(chance: Any, batch: int) -> np.ndarray | None:
    """``(B,)`` chance ROAD from a number, ``B`` numbers or the `YbRoad` of
    ``chance_road`` (row 0, the random map); ``None`` stays ``None``."""
    if chance is None:
        return None
    scores = getattr(chance, "scores", chance)
    arr = np.asarray(scores, dtype=np.float64)
    if isinstance(chance, YbRoad):
        arr = arr[0]
    if arr.size not in (1, batch):
        raise CAManimError(f"chance must be one number, {batch} numbers (one per image) or the "
                           "YbRoad of chance_road() on the same images")
    return np.array(np.broadcast_to(arr.reshape(-1), (batch,)), dtype=np.float64)


# -------------------------------------------------------------- thresholds

