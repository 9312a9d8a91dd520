"""ybROAD: the ROAD score of every layer's class activation map.

ROAD (Rong et al. 2022) removes a percentile of pixels by noisy linear
imputation and measures the change of the target score. The conventions are
those of ``pytorch_grad_cam.metrics.road.ROADCombined``:

* percentile ``p`` is the percentage of pixels KEPT (`PERCENTILE_CONVENTION`):
  MoRF at p: ``threshold = np.percentile(cam, p)``, keep the pixels with
  ``cam < threshold``, impute the other ``100 - p`` percent (the most
  relevant); LeRF: the same on ``1 - cam``;
* the score change is ``score(perturbed) - score(clean)``;
* ROAD = mean over percentiles of ``(LeRF - MoRF) / 2``.

Doing this for every layer of a CAManim run gives the "yellow brick ROAD"
(CAManim paper, Eq. 5). Here the masks of several layers are imputed
together (`camanim.metrics.imputation`, as many as its memory budget allows),
the clean images go through the model at most once (not at all when their
``logits=`` are passed), and the perturbed images of all images, layers,
percentiles, MoRF/LeRF and trials go through it in batches sized by a
memory budget.

Precision: the model runs in its own dtype. Imputation, noise and scores
are accumulated in float32 for half-precision models (float64 only on the
CPU); see `ybroad`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.guard import eval_mode
from ..core.inference import FoldCache, scoring_runner
from ..core.inputs import SCORES, Target, check_images, resolve_targets, score_outputs
from ..core.maps import LayerMaps
from ..errors import CAManimError
from .imputation import add_noise, cuda_free_bytes, impute, masks_per_solve, solve_dtype, work_dtype
from .road_result import DEFAULT_PERCENTILES, PERCENTILE_CONVENTION, RoadSummary, YbRoad

__all__ = ["FoldCache", "ybroad", "road_masks", "percentile_thresholds", "YbRoad", "RoadSummary",
           "DEFAULT_PERCENTILES", "PERCENTILE_CONVENTION"]



def percentile_thresholds(values: torch.Tensor, percentiles: Sequence[float]) -> torch.Tensor:
    """``np.percentile(row, p)`` of every row, bit for bit.

    NumPy's default ("linear") method with a Python-number ``p``: the
    virtual index ``(n - 1) p / 100`` is a float64, the interpolation weight
    is cast to the values' dtype, and ``a + (b - a) t`` (or ``b - (b - a)
    (1 - t)`` for ``t >= 0.5``) is evaluated in that dtype.

    Args:
        values: ``(M, n)`` float tensor.
        percentiles: P numbers in [0, 100].

    Returns:
        ``(M, P)`` in ``values``' dtype.
    """
    s = values.sort(dim=-1).values
    n = s.shape[-1]
    out = []
    for p in percentiles:
        vi = (n - 1) * (p / 100)
        if vi >= n - 1:
            out.append(s[:, n - 1])
            continue
        prev = math.floor(vi)
        gamma = vi - prev
        a, b = s[:, prev], s[:, prev + 1]
        diff = b - a
        if gamma >= 0.5:
            out.append(b - diff * torch.tensor(1 - gamma, dtype=s.dtype, device=s.device))
        else:
            out.append(a + diff * torch.tensor(gamma, dtype=s.dtype, device=s.device))
    return torch.stack(out, dim=1)


def road_masks(cams: torch.Tensor, percentiles: Sequence[float]) -> torch.Tensor:
    """Keep-masks of the reference's ROAD for ``(B, H, W)`` maps.

    ``p`` is the percentage of pixels kept (`PERCENTILE_CONVENTION`).

    Returns:
        ``(2P, B, H, W)`` bool, True = pixel kept: first MoRF at each
        percentile (``cam < percentile(cam, p)``: the ``100 - p`` percent
        most relevant pixels are removed), then LeRF (the same rule on
        ``1 - cam``).
    """
    if cams.dtype in (torch.float16, torch.bfloat16):
        cams = cams.float()
    b = cams.shape[0]
    out = []
    for c in (cams, 1 - cams):
        flat = c.reshape(b, -1)
        thr = percentile_thresholds(flat, percentiles)        # (B, P)
        out.append(flat[None] < thr.T[:, :, None])              # (P, B, HW)
    return torch.cat(out).reshape((2 * len(percentiles),) + tuple(cams.shape))


# --------------------------------------------------------------- checking

def _check_percentiles(percentiles: Any) -> tuple[float, ...]:
    if isinstance(percentiles, (Real, np.number)) and not isinstance(percentiles, bool):
        percentiles = (percentiles,)
    try:
        ps = tuple(percentiles)
    except TypeError:
        raise CAManimError(f"percentiles must be a sequence of numbers in [0, 100], "
                           f"got {percentiles!r}") from None
    if not ps:
        raise CAManimError("percentiles is empty: pass e.g. (20, 40, 60, 80)")
    clean = []
    for p in ps:
        if isinstance(p, (bool, np.bool_)) or not isinstance(p, (Real, np.number)):
            raise CAManimError(f"percentiles must be numbers in [0, 100], got {p!r}")
        if not math.isfinite(float(p)) or not 0 <= float(p) <= 100:
            raise CAManimError(f"percentile {p!r} is outside [0, 100]; pass e.g. (20, 40, 60, 80)")
        clean.append(int(float(p)) if float(p).is_integer() else float(p))
    return tuple(clean)


def _check_args(noise: Any, seed: Any, trials: Any, batch_size: Any, score: Any) -> None:
    if isinstance(noise, bool) or not isinstance(noise, (Real, np.number)) \
            or not math.isfinite(float(noise)) or float(noise) < 0:
        raise CAManimError(f"noise must be a number >= 0 (the imputation noise's standard "
                           f"deviation, the reference uses 0.01), got {noise!r}")
    if isinstance(seed, bool) or not isinstance(seed, (Integral, np.integer)):
        raise CAManimError(f"seed must be an int, got {seed!r}")
    if isinstance(trials, bool) or not isinstance(trials, (Integral, np.integer)) or trials < 1:
        raise CAManimError(f"trials must be an int >= 1, got {trials!r}")
    if batch_size is not None and (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (Integral, np.integer))
        or batch_size < 1
    ):
        raise CAManimError(
            f"batch_size must be None (automatic) or an int >= 1, got {batch_size!r}"
        )
    if score not in SCORES:
        raise CAManimError(f"unknown score {score!r}: use 'softmax' (probability of the target "
                           "class, the default) or 'logit'")


def _layer_cams(maps: Any, batch: int, size: tuple[int, int]) -> tuple[list[str], Any, int]:
    """(names, iterator of ``(B, H, W)`` maps, L) from LayerMaps or an array."""
    if isinstance(maps, LayerMaps):
        if len(maps) == 0:
            raise CAManimError("maps has no layers")
        if maps.batch_size != batch:
            raise CAManimError(f"maps explain {maps.batch_size} images but {batch} images were "
                               "passed: pass the images the maps were computed on")
        if tuple(maps.input_size) != tuple(size):
            raise CAManimError(f"maps are for {maps.input_size[0]}x{maps.input_size[1]} inputs but "
                               f"the images are {size[0]}x{size[1]}: pass the images the maps were "
                               "computed on")
        return list(maps.names), maps.iter_upsampled("local"), len(maps)
    if isinstance(maps, np.ndarray):
        maps = torch.from_numpy(maps)
    if isinstance(maps, torch.Tensor):
        if maps.dim() == 3:
            maps = maps[None]
        if maps.dim() != 4 or maps.shape[1] != batch or tuple(maps.shape[2:]) != tuple(size):
            raise CAManimError(f"maps as an array must be (L, B, H, W) = (L, {batch}, {size[0]}, "
                               f"{size[1]}) (or (B, H, W) for one layer), got {tuple(maps.shape)}")
        if not maps.is_floating_point():
            raise CAManimError(f"maps must be float, got {maps.dtype}")
        return [str(i) for i in range(maps.shape[0])], iter(maps), int(maps.shape[0])
    raise CAManimError(
        f"maps must be a camanim.LayerMaps (from camanim.CAManim) or an (L, B, H, W) "
        f"array of maps, got {type(maps).__name__}"
    )


def _score_targets(targets: Any, maps: Any, logits: torch.Tensor, score: str
                   ) -> tuple[list[Target], list[int | None], str]:
    """Score callables per image, their class indices, and the score kind."""
    from pytorch_grad_cam.utils.model_targets import (
        ClassifierOutputSoftmaxTarget,
        ClassifierOutputTarget,
    )

    if targets is None and isinstance(maps, LayerMaps) and maps.targets is not None:
        targets = maps.targets
    if isinstance(targets, np.ndarray):
        targets = torch.as_tensor(targets)
    if isinstance(targets, np.integer):
        targets = int(targets)
    b = logits.shape[0]
    is_callables = (isinstance(targets, Sequence) and not isinstance(targets, (str, bytes))
                    and len(targets) > 0 and all(callable(t) for t in targets))
    calls, idx = resolve_targets(targets, b, logits)
    if is_callables:
        cls = [getattr(t, "category", None) for t in calls]
        return (
            calls,
            [int(c) if isinstance(c, (int, np.integer)) else None for c in cls],
            "callable",
        )
    assert idx is not None  # class indices: resolve_targets made them from the logits
    classes: list[int | None] = [int(c) for c in idx]
    if score == "softmax" and logits.shape[-1] == 1:
        raise CAManimError(
            "the model has a single output: its softmax is always 1, so every ROAD score would "
            "be 0; pass score='logit', or target callables such as pytorch_grad_cam's "
            "BinaryClassifierOutputTarget")
    make = ClassifierOutputSoftmaxTarget if score == "softmax" else ClassifierOutputTarget
    return [make(c) for c in classes], classes, score


def _device_memory(device: torch.device) -> tuple[Callable[[], int], int] | None:
    """``(allocated bytes now, bytes available)`` on an accelerator, ``None``
    on the CPU (or where torch cannot tell). Only counters are read: the
    user's peak-memory statistics are never reset."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return (lambda: torch.cuda.memory_allocated(device)), cuda_free_bytes(device)
    if device.type == "mps" and hasattr(torch, "mps"):
        try:
            free = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
            return torch.mps.current_allocated_memory, int(max(free, 0))
        except (AttributeError, RuntimeError):
            return None
    return None


def _probe_forward(model: nn.Module, x: torch.Tensor, allocated: Callable[[], int]
                   ) -> tuple[torch.Tensor, int]:
    """``model(x)`` and the most memory it held at once beyond what was
    allocated before: the largest before/after difference of the allocated
    bytes, sampled after every module's forward (hooks removed afterwards)."""
    base = allocated()
    peak = [0]

    def sample(_module: nn.Module, _args: Any, _output: Any) -> None:  # a forward hook
        peak[0] = max(peak[0], allocated() - base)

    handles = [m.register_forward_hook(sample) for m in model.modules()]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, max(peak[0], allocated() - base, 1)


def _cpu_batch_size(h: int, w: int) -> int:
    """CPU: larger batches stop paying off early (measured on ResNet-50: 2-4
    images of 224x224 per forward are fastest per image, 16 are 30% slower,
    32 twice as slow), so 4 images of 224x224, scaled by image area."""
    return int(max(1, min(256, round(4 * 224 * 224 / (h * w)))))


def _check_logits(logits: Any, b: int, device: torch.device) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise CAManimError(f"logits must be the model's (B, K) output tensor for the images, got "
                           f"{type(logits).__name__}")
    if logits.dim() < 1 or logits.shape[0] != b or not logits.is_floating_point():
        raise CAManimError(f"logits must be the model's float output for the {b} images, shape "
                           f"({b}, K); got {tuple(logits.shape)} {logits.dtype}")
    if not bool(torch.isfinite(logits).all()):
        raise CAManimError("logits contain NaN or inf")
    return logits.detach().to(device)


class _Scorer:
    """Scores of model outputs, computed in float32 or better (`work_dtype`)
    and returned as CPU float64 (accumulation; never float64 on a device).

    Our own targets (a class per image, softmax or logit) are scored for
    the whole batch at once; user callables one row at a time, as
    pytorch-grad-cam calls them."""

    def __init__(self, calls: list[Target], classes: list[int | None], kind: str) -> None:
        self.calls, self.kind = calls, kind
        self.classes = torch.tensor(classes) if kind in SCORES else None

    def __call__(self, outputs: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """``(n,)`` CPU float64 scores of ``(n, K)`` outputs of the images
        with batch indices ``images`` (``(n,)`` long)."""
        if outputs.is_floating_point():
            outputs = outputs.to(work_dtype(outputs.dtype))
        if self.classes is not None:
            idx = self.classes[images].to(outputs.device)
            vals = torch.softmax(outputs, dim=-1) if self.kind == "softmax" else outputs
            scores = vals.gather(-1, idx[:, None])[:, 0]
        else:
            scores = score_outputs([self.calls[i] for i in images.tolist()], outputs)
        return scores.detach().cpu().double()


# -------------------------------------------------------------------- API

def noise_generator(seed: int, trial: int, layer: int, device: torch.device) -> torch.Generator:
    """The generator of one (trial, layer)'s imputation noise: keyed by
    ``(seed + trial, layer)``, so trial k equals a single run with seed + k."""
    key = np.random.SeedSequence([(int(seed) + int(trial)) & 0xFFFFFFFF, int(layer)])
    return torch.Generator(device=device).manual_seed(int(key.generate_state(1, np.uint64)[0] >> 1))


def ybroad(model: nn.Module, images: torch.Tensor, maps: LayerMaps | torch.Tensor | np.ndarray,
           targets: Any = None, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
           noise: float = 0.01, seed: int = 0, batch_size: int | None = None,
           score: str = "softmax", trials: int = 1, progress: bool = True,
           logits: torch.Tensor | None = None,
           layer_ids: Sequence[int] | None = None, fold: bool | FoldCache = True) -> YbRoad:
    """ROAD of every layer's map (ybROAD), as ``ROADCombined`` per layer.

    Args:
        model: the classifier (put in eval mode while scoring; every
            submodule's train/eval mode is restored afterwards).
        images: ``(B, C, H, W)`` images the maps explain.
        maps: `LayerMaps` (each layer's map is normalized "local", i.e. the
            map pytorch-grad-cam returns for that layer) or an
            ``(L, B, H, W)`` array of maps used as they are.
        targets: ``None`` (``maps.targets``; for an array of maps, the
            predicted class), an int, B ints, or B pytorch-grad-cam target
            callables (used as they are; ``score`` then does not apply).
            Maps computed for callables without a class index
            (``maps.targets is None``) need ``targets=``: ybROAD must score
            the class the maps explain.
        percentiles: percentages of pixels KEPT, as
            ``ROADCombined(percentiles)`` (`PERCENTILE_CONVENTION`): at
            ``p = 20`` MoRF and LeRF each remove 80% of the pixels.
        noise: standard deviation of the imputation noise (the reference
            uses 0.01; 0 for a deterministic score).
        seed: seed of the noise; layer ``l`` of trial ``k`` draws from its own
            generator seeded by ``(seed + k, l)`` (`noise_generator`), so a
            layer's score does not depend on which other layers are scored
            with it. The global RNG is never touched.
        batch_size: perturbed images per forward pass (default: CUDA/MPS:
            as many as a third of the available memory holds, measured on
            one forward as a before/after difference of the allocated bytes;
            CPU: 4 images of 224x224, scaled by area).
        score: ``"softmax"`` (probability of the target class, as
            ``ClassifierOutputSoftmaxTarget``) or ``"logit"``.
        trials: repeat with k noise seeds; ``scores`` is the mean, ``std``
            the spread (paper Fig. 8 uses 11 trials).
        progress: show a tqdm progress bar over layers.
        layer_ids: the L layers' indices in the full list when ``maps`` is a
            share of it (`LayerMaps.select`; the callback's DDP ranks), so
            that their noise equals a whole run's. Default ``0..L-1``.
        logits: ``(B, K)`` outputs of the model (in eval mode) on
            ``images``: the clean forward is then skipped. Default: the
            maps' own (`LayerMaps.logits`, from the pass that computed
            them), else one clean forward.
        fold: on the CPU, score the perturbed images with a copy of the
            model's graph whose Conv2d -> BatchNorm pairs are folded into
            channels-last convolutions (`camanim.core.inference`; ~20-30%
            faster on ResNet-50), used only after its outputs on the clean
            images agree with the model's (relative 1e-4; float rounding
            gives ~1e-6); models it cannot trace run as they are. The
            model itself is never changed. ``False``: always run the model.
            A `FoldCache` folds as ``True`` does, once for every call that
            passes it with the same model state, images and logits.

    Precision: the model runs in its dtype. For float16/bfloat16 models the
    imputation starts from ``images`` in float32 (not the rounded model
    input), the noise is added in float32 and the perturbed image is cast
    to the model's dtype once, just before its forward; scores are taken
    from the outputs cast to float32 and accumulated in float64 on the CPU.
    The model cannot see finer than its input dtype: at ``|x| >= 2`` a
    bfloat16 step is 0.0156, so each pixel's 0.01 noise arrives quantized
    to that step (an unbiased rounding of the float32 value, unlike adding
    the noise to an already rounded image, where it is rounded twice).

    Returns:
        `YbRoad` with ``scores`` of shape ``(L, B)``.
    """
    # over 80 lines by its docstring only: the body is split into _ybroad_inputs,
    # _perturb_and_score and _combine
    import time

    t0 = time.perf_counter()
    ps, x, (names, cams, n_layers), logits, ids = _ybroad_inputs(
        model, images, maps, targets, percentiles, noise, seed, trials, batch_size, score,
        logits, layer_ids, fold)
    b, c, h, w = x.shape
    acc = work_dtype(x.dtype)
    # half-precision models: impute from the float32 images, not the rounded input
    x_acc = x if acc == x.dtype else images.detach().to(device=x.device, dtype=acc)
    per_layer = 2 * len(ps) * b
    sdt = solve_dtype(x.device, x_acc.dtype)
    layers_per_solve = max(1, min(n_layers, masks_per_solve(c, h, w, x.device, sdt) // per_layer))

    with eval_mode(model), torch.no_grad():
        bs, first = _batch_size(model, x, batch_size, logits is None)
        if logits is None:
            done = [] if first is None else [first]
            start = 0 if first is None else first.shape[0]
            logits = torch.cat(done + [model(x[i:i + bs]) for i in range(start, b, bs)])
        calls, classes, kind = _score_targets(targets, maps, logits, score)
        scorer = _Scorer(calls, classes, kind)
        clean = scorer(logits, torch.arange(b))                              # (B,) CPU
        runner, channels_last = (fold.runner(model, images, x, logits, bs)
                                 if isinstance(fold, FoldCache) else
                                 scoring_runner(model, x, logits, bs, fold))
        n_trials = int(trials) if noise else 1   # without noise every trial is the same
        pert = torch.full((n_trials, n_layers, per_layer // b, b), float("nan"),
                          dtype=torch.float64)
        queue = _ForwardQueue(runner, scorer, pert, bs, b, x.dtype, channels_last)
        _perturb_and_score(queue, x_acc, cams, names, ps, layers_per_solve, sdt,
                           float(noise), int(seed), ids, n_trials, progress)

    morf, lerf, road = _combine(pert, clean, len(ps), int(trials))
    std = road.std(axis=0, ddof=1) if trials > 1 else np.zeros(road.shape[1:])
    return YbRoad(scores=road.mean(axis=0), names=names, targets=classes, percentiles=ps,
                  std=std, trials=road, morf=morf, lerf=lerf, clean=clean.numpy(),
                  score=kind, noise=float(noise), seed=int(seed),
                  seconds=time.perf_counter() - t0,
                  extra={"batch_size": bs, "layers_per_solve": layers_per_solve,
                         "folded": channels_last})


def _ybroad_inputs(model: nn.Module, images: torch.Tensor,
                   maps: LayerMaps | torch.Tensor | np.ndarray, targets: Any,
                   percentiles: Sequence[float], noise: float, seed: int, trials: int,
                   batch_size: int | None, score: str, logits: torch.Tensor | None,
                   layer_ids: Sequence[int] | None, fold: bool | FoldCache
                   ) -> tuple[tuple[float, ...], torch.Tensor,
                              tuple[list[str], Iterable[torch.Tensor], int],
                              torch.Tensor | None, list[int]]:
    """`ybroad`'s arguments checked: ``(percentiles, images on the model's
    device, (layer names, (B, H, W) maps, L), logits or None, layer ids)``."""
    if not isinstance(model, nn.Module):
        raise CAManimError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ps = _check_percentiles(percentiles)
    _check_args(noise, seed, trials, batch_size, score)
    if not isinstance(fold, (bool, FoldCache)):
        raise CAManimError(f"fold must be True, False or a FoldCache, got {fold!r}")
    x = check_images(images, model)
    b, _, h, w = x.shape
    layers = _layer_cams(maps, b, (h, w))
    if targets is None and isinstance(maps, LayerMaps) and maps.targets is None:
        raise CAManimError(
            "these maps were computed for target callables without a class index "
            "(maps.targets is None), so ybroad cannot tell which class they explain; pass the "
            "same callables (or the class indices) as ybroad(..., targets=...)")
    if logits is None and isinstance(maps, LayerMaps):
        logits = maps.logits                  # the CAM pass's outputs spare a clean forward
    if logits is not None:
        logits = _check_logits(logits, b, x.device)
    n_layers = layers[2]
    ids = list(range(n_layers)) if layer_ids is None else [int(i) for i in layer_ids]
    if len(ids) != n_layers:
        raise CAManimError(f"layer_ids has {len(ids)} entries for {n_layers} layers")
    return ps, x, layers, logits, ids


def _perturb_and_score(queue: _ForwardQueue, x_acc: torch.Tensor, cams: Iterable[torch.Tensor],
                       names: Sequence[str], ps: tuple[float, ...], layers_per_solve: int,
                       sdt: torch.dtype, noise: float, seed: int, ids: Sequence[int],
                       n_trials: int, progress: bool) -> None:
    """Impute the MoRF / LeRF images of ``layers_per_solve`` layers at a
    time (one solve), add each trial's noise and push them through
    ``queue``, which scores them into its ``(T', L, 2P, B)`` output."""
    from tqdm.auto import tqdm

    b, _, h, w = x_acc.shape
    n_p, n_layers = len(ps), len(names)
    per_layer = 2 * n_p * b
    with tqdm(total=n_layers, desc="ybROAD", unit="layer", disable=not progress) as bar:
        layer = 0
        cams = iter(cams)
        while layer < n_layers:
            group: list[torch.Tensor] = []
            for cam in cams:
                cam = cam.to(x_acc.device)
                if not bool(torch.isfinite(cam).all()):
                    raise CAManimError(f"the map of layer {names[layer + len(group)]!r} "
                                       "contains NaN or inf")
                group.append(road_masks(cam, ps).reshape(per_layer, h, w))
                if len(group) == layers_per_solve:
                    break
            if not group:
                break
            keep = torch.cat(group)
            filled = impute(x_acc.repeat(len(group) * 2 * n_p, 1, 1, 1), keep,
                            chunk=layers_per_solve * per_layer, dtype=sdt)
            for t in range(n_trials):
                for g in range(len(group)):
                    rows = slice(g * per_layer, (g + 1) * per_layer)
                    imgs = (add_noise(filled[rows], keep[rows], noise,
                                      noise_generator(seed, t, ids[layer + g], x_acc.device))
                            if noise else filled[rows])
                    queue.push(imgs, t, layer + g)
            del filled, keep
            layer += len(group)
            bar.update(len(group))
        queue.flush()


def _combine(pert: torch.Tensor, clean: torch.Tensor, n_p: int, trials: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(MoRF, LeRF, ROAD)``: ``(T, L, B, P)`` score drops of the perturbed
    images ``pert`` ``(T', L, 2P, B)`` against the clean scores ``(B,)``,
    and their ``(T, L, B)`` combination ``mean_p (LeRF - MoRF) / 2``."""
    diff = (pert - clean).numpy()                          # (T', L, 2P, B)
    morf = diff[:, :, :n_p].transpose(0, 1, 3, 2)          # (T', L, B, P)
    lerf = diff[:, :, n_p:].transpose(0, 1, 3, 2)
    if diff.shape[0] < trials:                             # noise 0: all trials equal
        morf, lerf = (np.repeat(a, trials, axis=0) for a in (morf, lerf))
    road = ((lerf - morf) / 2).mean(axis=-1)               # (T, L, B)
    return morf, lerf, road


def _batch_size(model: nn.Module, x: torch.Tensor, batch_size: int | None, need_first: bool
                ) -> tuple[int, torch.Tensor | None]:
    """Perturbed images per forward, and the outputs of ``x[:1]`` when a
    memory probe had to run it anyway (so the clean pass can reuse them;
    only when ``need_first``)."""
    if batch_size is not None:
        return int(batch_size), None
    mem = _device_memory(x.device)
    if mem is None:
        return _cpu_batch_size(*x.shape[-2:]), None
    allocated, free = mem
    out, per_image = _probe_forward(model, x[:1], allocated)
    bs = int(max(1, min(1024, (free // 3) // per_image)))
    return bs, (out if need_first else None)


class _ForwardQueue:
    """Collects perturbed images and scores them in batches of ``size``.

    Rows of a pushed ``(2P * B, C, H, W)`` block are (mask kind, image);
    scores land in ``out[trial, layer, kind, image]``. Images are cast to
    the model's dtype as they enter a batch.
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], scorer: _Scorer,
                 out: torch.Tensor, size: int,
                 n_images: int, dtype: torch.dtype, channels_last: bool = False) -> None:
        self.model, self.scorer, self.out, self.size = model, scorer, out, size
        self.b, self.dtype = n_images, dtype
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.images: list[torch.Tensor] = []
        self.where: list[torch.Tensor] = []     # (rows, 3): trial, layer, row in block
        self.count = 0

    def push(self, imgs: torch.Tensor, trial: int, layer: int) -> None:
        n = imgs.shape[0]
        self.images.append(imgs.to(self.dtype))
        rows = torch.arange(n)
        self.where.append(torch.stack([torch.full((n,), trial), torch.full((n,), layer), rows], 1))
        self.count += n
        while self.count >= self.size:
            self._run(self.size)

    def flush(self) -> None:
        while self.count:
            self._run(min(self.size, self.count))

    def _take(self, items: list[torch.Tensor], n: int) -> torch.Tensor:
        parts, got = [], 0
        while got < n:
            head = items[0]
            k = min(n - got, head.shape[0])
            parts.append(head[:k])
            got += k
            if k == head.shape[0]:
                items.pop(0)
            else:
                items[0] = head[k:]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _run(self, n: int) -> None:
        batch = self._take(self.images, n)
        where = self._take(self.where, n)
        self.count -= n
        kind, image = where[:, 2] // self.b, where[:, 2] % self.b
        scores = self.scorer(self.model(batch.contiguous(memory_format=self.format)), image)
        self.out[where[:, 0], where[:, 1], kind, image] = scores
