"""Model-parameter randomization sanity check (Adebayo et al. 2018).

Cascading randomization from the logits down: the top block's parameters
are re-drawn at random, then the next block's as well, and so on until the
whole network is random. After each step k every layer's map is computed
again and compared with the map of the trained model. A map that explains
the model must change once the weights it explains are gone; a map that
stays the same (an edge detector, for example) shows the input, not the
model, and is flagged.

Blocks (``blocks=``):

* ``"children"`` (default): the model's top-level child modules that hold
  parameters, in reverse order of their first call in a forward pass
  (torchvision ResNet-18: fc, layer4, layer3, layer2, layer1, bn1, conv1).
  If only one such child exists (a wrapper around the real network), its
  children are used instead, and so on.
* ``"leaves"``: every module holding parameters of its own (conv, norm,
  linear, ...), in reverse order of first call: the paper's layer-by-layer
  cascade.
* a list of module names (top first), each one block.

Randomizing a block re-draws each of its parameters with a private,
seeded ``torch.Generator``: standard normal values scaled to the root mean
square of the tensor's trained values, so activations keep their scale
(neither vanish nor explode) while everything learned is gone. An all-zero
tensor (typically an untrained bias) stays zero. Buffers (BatchNorm running
statistics) are not parameters and are kept. All this happens on a deep
copy: the caller's model, its weights and the global RNG are untouched.

Similarities between the original and the randomized map, per layer and
image, on the upsampled "local"-normalized maps in [0, 1]:

* Spearman rank correlation (ties averaged),
* SSIM (Wang et al. 2004; Gaussian window 11, sigma 1.5, data range 1,
  mean over the valid window positions),
* HOG similarity: Pearson correlation of histogram-of-oriented-gradients
  descriptors (9 unsigned orientation bins, 8 x 8-pixel cells, 2 x 2-cell
  blocks normalized with L2-Hys), as in the paper.

Flag: a layer is flagged when its mean Spearman correlation over images
after full randomization is above ``threshold`` (0.9): its pixel ordering
hardly changed although no learned weight remains. (Adebayo et al. show
Guided Backprop, which stays near 1, failing, and Grad-CAM, which falls
towards 0, passing; 0.9 keeps maps that only changed a little from passing.)
The method is flagged when the mean of that value over layers is above the
threshold.
"""

from __future__ import annotations

import copy
import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.files import atomic_path, save_figure, write_json
from ..core.guard import eval_mode
from ..core.maps import exact_dtype
from ..engine import CAManim
from ..errors import CAManimError
from .convergence import average_ranks, pearson_rows
from .similarity import SsimReference, descriptor_corr, hog, hog_similarity, ssim

METRICS = ("spearman", "ssim", "hog")
DEFAULT_THRESHOLD = 0.9


# ------------------------------------------------------------------ report

@dataclass
class SanityReport:
    """Similarity of every layer's map to the original under cascading
    randomization.

    Attributes:
        method: name of the CAM method.
        layers: the L layer names.
        blocks: the K blocks randomized, top first; step k (1-based)
            randomized ``blocks[:k]``. Each entry names one or more modules
            (comma-separated).
        spearman, ssim, hog: ``(K, L, B)`` similarity of the map after step k
            to the original map (NaN where undefined: a constant map).
        targets: the B class indices explained (``None`` for callables).
        threshold: Spearman above which a layer is flagged.
        seed: seed of the randomization.
        seconds: wall time of the check.
    """

    method: str
    layers: list[str]
    blocks: list[str]
    spearman: np.ndarray
    ssim: np.ndarray
    hog: np.ndarray
    targets: list[int | None]
    threshold: float = DEFAULT_THRESHOLD
    seed: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def mean(self, metric: str = "spearman") -> np.ndarray:
        """``(K, L)`` mean over images (NaN ignored; NaN if all are NaN)."""
        if metric not in METRICS:
            raise CAManimError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
        a = getattr(self, metric)
        with np.errstate(invalid="ignore"):
            cnt = (~np.isnan(a)).sum(-1)
            s = np.nansum(a, axis=-1)
            return np.where(cnt > 0, s / np.maximum(cnt, 1), np.nan)

    @property
    def final_spearman(self) -> np.ndarray:
        """``(L,)`` mean Spearman after full randomization."""
        return np.asarray(self.mean("spearman")[-1])

    @property
    def flagged(self) -> np.ndarray:
        """``(L,)`` bool: the layer's maps did not change (see module doc).
        A layer whose maps are all undefined (constant) is not flagged."""
        f = self.final_spearman
        return np.asarray(np.nan_to_num(f, nan=-np.inf) > self.threshold)

    @property
    def flagged_layers(self) -> list[str]:
        return [n for n, f in zip(self.layers, self.flagged, strict=False) if f]

    @property
    def method_flagged(self) -> bool:
        """The mean over layers of the final Spearman is above the threshold."""
        f = self.final_spearman
        f = f[~np.isnan(f)]
        return bool(f.size and f.mean() > self.threshold)

    # ---------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        def clean(a: np.ndarray) -> Any:
            return [[None if math.isnan(v) else float(v) for v in row] for row in a]

        return {
            "method": self.method, "layers": list(self.layers), "blocks": list(self.blocks),
            "targets": list(self.targets), "threshold": self.threshold, "seed": self.seed,
            "seconds": self.seconds, "method_flagged": self.method_flagged,
            "flagged_layers": self.flagged_layers,
            "mean": {m: clean(self.mean(m)) for m in METRICS},   # (K, L)
            "per_image": {m: [clean(k) for k in getattr(self, m)] for m in METRICS},  # (K, L, B)
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON of `to_dict` (NaN as null); written to ``path`` if given."""
        return write_json(path, self.to_dict())

    def to_csv(self, path: str | Path) -> Path:
        """Long form, one row per (step, layer, image): ``step, block,
        layer_index, layer_name, image, target, spearman, ssim, hog,
        flagged`` (NaN written as an empty cell)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = self.flagged
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "block", "layer_index", "layer_name", "image", "target",
                        "spearman", "ssim", "hog", "flagged"])
            for k, block in enumerate(self.blocks):
                for i, name in enumerate(self.layers):
                    for b in range(self.spearman.shape[2]):
                        t = self.targets[b] if b < len(self.targets) else None
                        w.writerow([k + 1, block, i, name, b, "" if t is None else t]
                                   + [_cell(getattr(self, m)[k, i, b]) for m in METRICS]
                                   + [int(flags[i])])
        return path

    def table(self) -> str:
        """Text table: per layer the mean similarities after the top block
        and after full randomization, and the flag."""
        sp, ss, hg = (self.mean(m) for m in METRICS)
        head = ("#", "layer", "spearman@1", "spearman@all", "ssim@all", "hog@all", "flag")
        rows = [(str(i), n, _fmt(sp[0, i]), _fmt(sp[-1, i]), _fmt(ss[-1, i]), _fmt(hg[-1, i]),
                 "FLAG" if f else "")
                for i, (n, f) in enumerate(zip(self.layers, self.flagged, strict=False))]
        widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
        lines = ["  ".join(c.ljust(w) if j == 1 else c.rjust(w)
                           for j, (c, w) in enumerate(zip(r, widths, strict=False))).rstrip()
                 for r in [head, tuple("-" * w for w in widths)] + rows]
        verdict = ("FLAGGED: the maps barely change when the model is randomized; they do not "
                   "explain the model" if self.method_flagged else
                   f"passed: {len(self.flagged_layers)} of {len(self.layers)} layers flagged")
        top = [f"sanity check ({self.method}): cascading randomization of {len(self.blocks)} "
               f"blocks, top first: {', '.join(self.blocks)}",
               f"flag: mean Spearman after full randomization > {self.threshold:g}; nan: the map "
               "is constant (e.g. all zero) in every image, no pixel ordering to compare",
               "similarities to the trained model's map: low is good (the map changes when the "
               "weights it should explain are gone); near 1, the map shows the input, not the "
               "model",
               f"{verdict}"]
        return "\n".join(top + [""] + lines)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Heatmaps layer x step of the three similarities (image mean);
        flagged layers' names in red."""
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        n_layers, n_steps = len(self.layers), len(self.blocks)
        height = max(3.5, min(24.0, 0.16 * n_layers + 2.2))
        width = 3 * max(2.6, min(7.0, 0.22 * n_steps + 1.8)) + 2.5
        fig, axes = plt.subplots(1, 3, figsize=(width, height), sharey=True, squeeze=False)
        label_size = 7 if n_layers <= 40 else (6 if n_layers <= 70 else 5)
        every = max(1, math.ceil(n_layers / 90))
        flags = self.flagged
        for ax, m in zip(axes[0], METRICS, strict=False):
            data = self.mean(m).T                                    # (L, K)
            im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="viridis",
                           vmin=-1, vmax=1, interpolation="nearest")
            ax.set_title({"spearman": "Spearman", "ssim": "SSIM", "hog": "HOG similarity"}[m],
                         fontsize=10)
            ax.set_xticks(range(n_steps))
            ax.set_xticklabels([f"{k + 1}: {_short(b)}" for k, b in enumerate(self.blocks)],
                               rotation=70, ha="right", fontsize=max(5, label_size))
            ax.set_xlabel("blocks randomized (top first)", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        ax0 = axes[0, 0]
        ticks = list(range(0, n_layers, every))
        ax0.set_yticks(ticks)
        ax0.set_yticklabels([f"{i} {self.layers[i]}" for i in ticks], fontsize=label_size)
        for t, i in zip(ax0.get_yticklabels(), ticks, strict=False):
            if flags[i]:
                t.set_color("red")
        verdict = "FLAGGED" if self.method_flagged else "passed"
        fig.suptitle(title or f"Model randomization sanity check: {self.method} ({verdict}; "
                     f"red = layer flagged, Spearman > {self.threshold:g} after all blocks)",
                     fontsize=10)
        fig.text(0.5, 0.005, "image mean of the similarity to the trained model's map after "
                 "randomizing blocks 1..k; LOW is good: the map depends on the learned weights; "
                 "near 1 the map ignores the model\nwhite: undefined (a constant map)",
                 ha="center", va="bottom", fontsize=8)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        return save_figure(fig, path)

    def __repr__(self) -> str:
        return (f"SanityReport(method={self.method!r}, layers={len(self.layers)}, "
                f"blocks={len(self.blocks)}, flagged_layers={len(self.flagged_layers)}, "
                f"method_flagged={self.method_flagged})")


def _cell(v: float) -> str:
    return "" if math.isnan(float(v)) else repr(float(v))


def _fmt(v: float) -> str:
    return "nan" if math.isnan(float(v)) else f"{float(v):.3f}"


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else name[: n - 3] + "..."


# ----------------------------------------------------------------- blocks

def _call_order(model: nn.Module, x: torch.Tensor, modules: Sequence[nn.Module]) -> list[nn.Module]:
    """``modules`` that run in a forward of ``x``, by first call."""
    order: list[nn.Module] = []
    seen: set[int] = set()

    def hook(m: nn.Module, *_: Any) -> None:
        if id(m) not in seen:
            seen.add(id(m))
            order.append(m)

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        with torch.no_grad(), eval_mode(model):     # eval: BatchNorm statistics stay as they are
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order


def _has_params(m: nn.Module, recurse: bool = True) -> bool:
    return any(True for _ in m.parameters(recurse=recurse))


def find_blocks(model: nn.Module, x: torch.Tensor,
                blocks: Any = "children") -> list[tuple[str, list[nn.Module]]]:
    """The blocks to randomize, top (closest to the logits) first.

    Args:
        model: the network.
        x: ``(1, C, H, W)`` example input (one forward finds the call order).
        blocks: ``"children"``, ``"leaves"`` or a list of module names
            (see the module docstring).

    Returns:
        K ``(label, modules)`` pairs.
    """
    named = dict(model.named_modules())
    names = {id(m): n for n, m in named.items()}
    if isinstance(blocks, str) and blocks == "children":
        parent = model
        while True:
            kids = [m for m in parent.children() if _has_params(m)]
            if len(kids) == 1 and not _has_params(parent, recurse=False):
                parent = kids[0]
                continue
            break
        own = list(parent.parameters(recurse=False))
        if not kids:                                # a single module with parameters
            return [(names.get(id(parent), "") or "model", [parent])]
        order = _call_order(model, x, kids)
        out = [(names[id(m)], [m]) for m in reversed(order)]
        if own:                                     # e.g. a bare nn.Parameter of the model
            out.append((names.get(id(parent), "") or "model (own parameters)", [parent]))
        return out
    if isinstance(blocks, str) and blocks == "leaves":
        leaves = [m for m in model.modules() if _has_params(m, recurse=False)]
        order = _call_order(model, x, leaves)
        return [(names[id(m)] or "model", [m]) for m in reversed(order)]
    if isinstance(blocks, (list, tuple)) and blocks and all(isinstance(b, str) for b in blocks):
        out = []
        for b in blocks:
            if b not in named:
                raise CAManimError(f"blocks: no module named {b!r} in this model; module names "
                                   f"look like {', '.join(list(named)[1:6])}")
            if not _has_params(named[b]):
                raise CAManimError(f"blocks: module {b!r} has no parameters to randomize")
            out.append((b, [named[b]]))
        return out
    raise CAManimError(f"blocks must be 'children', 'leaves' or a list of module names (top "
                       f"first), got {blocks!r}")


def _randomize(modules: Sequence[nn.Module], gen: torch.Generator, done: set[int]) -> None:
    """Re-draw every parameter once (N(0, 1) scaled to the tensor's RMS)."""
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                if id(p) in done:
                    continue
                done.add(id(p))
                rms = p.detach().double().square().mean().sqrt()
                z = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                p.copy_((z * rms.cpu()).to(p.dtype))


# ------------------------------------------------------------------ check

def _references(orig: Any) -> list[tuple[torch.Tensor, SsimReference, torch.Tensor]]:
    """The trained model's side of every comparison, per layer, computed
    once: ranks (whole or half numbers: exact in float32, see rank_maps),
    SSIM statistics and HOG descriptors of its local-normalized maps."""
    out = []
    for ref in orig.iter_upsampled("local"):                        # (B, H, W) per layer
        b = ref.shape[0]
        ranks = average_ranks(ref.reshape(b, -1)).float()
        out.append((ranks, SsimReference(ref), hog(ref)))
    return out


def _compare(refs: Sequence[tuple[torch.Tensor, SsimReference, torch.Tensor]], maps: Any, k: int,
             sims: dict[str, np.ndarray]) -> None:
    """Fill ``sims[metric][k]`` with every layer's similarity to the reference."""
    for i, cur in enumerate(maps.iter_upsampled("local")):
        ranks, ssim_ref, hog_ref = refs[i]
        acc = exact_dtype(cur.device)
        b = cur.shape[0]
        # ranks of the float32 map itself (the sort order is the same as in float64)
        cur_ranks = average_ranks(cur.reshape(b, -1))
        sims["spearman"][k, i] = pearson_rows(ranks.to(cur.device, acc), cur_ranks).cpu().numpy()
        sims["ssim"][k, i] = ssim_ref.to(cur.device)(cur).cpu().numpy()
        sims["hog"][k, i] = descriptor_corr(hog_ref.to(cur.device), hog(cur)).cpu().numpy()


def sanity_check(model: nn.Module, images: torch.Tensor, method: Any = "gradcam",
                 layers: Any = "conv", targets: Any = None, *, blocks: Any = "children",
                 threshold: float = DEFAULT_THRESHOLD, seed: int = 0,
                 reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 max_layers: int | None = None, batch_size: int = 32, progress: bool = False,
                 **options: Any) -> SanityReport:
    """Cascading model-parameter randomization check of a CAM method.

    Args:
        model: the classifier. Not modified: the check runs on a deep copy.
        images: ``(B, C, H, W)`` images, normalized as the model expects.
        method, layers, reshape_transform, max_layers, batch_size,
            **options: as for `camanim.CAManim`.
        targets: classes to explain (``None``: the trained model's
            prediction). The randomized models explain the same classes.
        blocks: ``"children"``, ``"leaves"`` or a list of module names,
            top first (see the module docstring).
        threshold: a layer whose mean Spearman correlation after full
            randomization is above it is flagged (default 0.9).
        seed: seed of the private generator that draws the random weights
            (and of random CAM methods).
        progress: progress bar over the steps.

    Returns:
        `SanityReport` with ``(K, L, B)`` similarities.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise CAManimError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, (Real, np.number)) \
            or not -1 <= float(threshold) <= 1:
        raise CAManimError(
            f"threshold must be a Spearman correlation in [-1, 1], got {threshold!r}")
    if isinstance(seed, bool) or not isinstance(seed, (Integral, np.integer)):
        raise CAManimError(f"seed must be an int, got {seed!r}")
    try:
        work = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - any failure to copy is the model's
        raise CAManimError(f"sanity_check randomizes a copy of the model, but copy.deepcopy "
                           f"failed: {type(e).__name__}: {e}. Pass a copyable model (e.g. "
                           "rebuild it and load its state_dict)") from None

    from ..core.inputs import check_images

    x = check_images(images, work)
    plan = find_blocks(work, x[:1], blocks)
    if not plan:
        raise CAManimError("the model has no parameters to randomize")
    # one engine for every step: the copy's weights change in place, its layers do not
    anim = CAManim(work, method=method, layers=layers, reshape_transform=reshape_transform,
                   max_layers=max_layers, batch_size=batch_size, seed=int(seed),
                   progress=False, **options)
    bar = tqdm(total=len(plan) + 1, desc="sanity (trained, then blocks randomized)",
               unit="pass", disable=not progress)
    with bar:
        orig = anim(images, targets)
        keep_targets = targets if orig.targets is None else orig.targets
        refs = _references(orig)
        bar.update()
        gen = torch.Generator().manual_seed(int(seed))
        done: set[int] = set()
        sims = {m: np.full((len(plan), len(orig), orig.batch_size), np.nan) for m in METRICS}
        for k, (_, modules) in enumerate(plan):
            _randomize(modules, gen, done)
            maps = anim(images, keep_targets)
            if maps.names != orig.names:
                raise CAManimError("the randomized model selected other layers than the original "
                                   f"({len(maps.names)} vs {len(orig.names)}); pass layers as a "
                                   "list of names")
            _compare(refs, maps, k, sims)
            bar.update()
    b = orig.batch_size
    tg = [int(t) for t in orig.targets] if orig.targets is not None else [None] * b
    return SanityReport(method=orig.method, layers=list(orig.names),
                        blocks=[label for label, _ in plan], targets=tg,
                        threshold=float(threshold), seed=int(seed),
                        seconds=time.perf_counter() - t0, **sims)


__all__ = ["DEFAULT_THRESHOLD", "METRICS", "SanityReport", "find_blocks", "hog", "hog_similarity",
           "sanity_check", "ssim"]
