"""`CAManimCallback`: CAManim videos and epoch-wise ybROAD while a model trains.

At the end of every monitored training epoch (after that epoch's
validation) the callback computes, for a few fixed *probe* images, the class
activation map of every chosen layer (one pass, `camanim.CAManim`), scores
every layer's map with ROAD (`camanim.road.ybroad`), and logs:

TensorBoard (when a ``TensorBoardLogger`` is among ``trainer.loggers``)
    * ``camanim/<probe>/<norm>``: an animated GIF, one frame per layer
      (Images tab; start TensorBoard with ``--samples_per_plugin images=100``
      or it shows only 10 epochs per tag);
    * ``ybroad/<probe>/heatmap``: ROAD of every layer at every epoch so far
      (layers top to bottom in forward order, epochs left to right, each
      epoch's best layer circled) and ``ybroad/<probe>/curve``: this epoch's
      ybROAD curve (with EBPG when the probe has a mask);
    * scalars ``ybroad/<probe>/mean``, ``max``, ``best_layer`` (index),
      ``final_layer`` (the last layer's score); with masks
      ``ebpg/<probe>/best_road_layer`` and ``ebpg/<probe>/max``; and
      ``camanim/seconds`` (time this epoch's work took);
    * ``camanim/<probe>/summary`` text naming the best layer.

Other loggers (CSV, W&B, MLflow, ...)
    get the scalars through ``logger.log_metrics``.

Files, in ``save_dir`` (default: the TensorBoard logger's ``log_dir``, else
``<trainer.default_root_dir>/camanim``), whatever the loggers:
    * ``ybroad.csv``: tidy long form, one row per (epoch, probe, layer), see
      `camanim.study.CSV_COLUMNS`; appended and flushed every epoch, so a
      crash never loses a finished epoch; read it with ``camanim study``;
    * ``videos/<probe>_epoch{E:03d}_<norm>.mp4`` (``save_videos=True``);
    * ``heatmaps/<probe>.png``: the latest heatmap;
    * ``maps/epoch{E:03d}.npz`` (``save_maps=True``, `camanim.LayerMaps`).

Epochs are numbered from 0, as ``trainer.current_epoch`` and
``ModelCheckpoint`` file names count them.

The callback leaves training exactly as it was: parameters, ``.grad``,
optimizer state, BatchNorm statistics, each submodule's train/eval mode,
``requires_grad``, hooks, and the torch (CPU and CUDA), numpy and Python
random streams are the same as without it (a run with and without it ends
with bit-identical weights under ``deterministic=True``).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

try:  # Lightning 2.x ("lightning" package); the standalone package also works
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError:  # pragma: no cover
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    from pytorch_lightning.utilities import rank_zero_warn  # type: ignore[no-redef]

from .errors import CAManimError
from .maps import NORMALIZATIONS, LayerMaps
from .study import CSV_COLUMNS, CSV_NAME, safe_name

__all__ = ["CAManimCallback", "energy_pointing_game"]

_VIDEO_NORMS = NORMALIZATIONS + ("both",)
_STATE_FORMAT = "camanim.CAManimCallback/1"


# ===================================================================== EBPG

def energy_pointing_game(maps: LayerMaps | torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Energy-based pointing game (SISE's EBPG) of every layer's map.

    The share of a map's energy inside the object mask::

        EBPG = sum(map * mask) / sum(map)

    computed on the ``"local"``-normalized map upsampled to the input size
    (the map each frame of a CAManim video shows).

    Args:
        maps: `LayerMaps` of B images, or an ``(L, B, H, W)`` (or
            ``(B, H, W)``) tensor of non-negative maps.
        masks: ``(B, H, W)`` masks at the input size: bool, or floats in
            [0, 1] (soft masks weight the energy).

    Returns:
        ``(L, B)`` float64 in [0, 1]; NaN for an image whose mask is empty
        (nothing to point at) or whose map is all zero.
    """
    m = torch.as_tensor(masks)
    if m.dim() == 2:
        m = m[None]
    if m.dim() != 3:
        raise CAManimError(f"masks must be (B, H, W), got shape {tuple(m.shape)}")
    if isinstance(maps, LayerMaps):
        it: Any = maps.iter_upsampled("local")
        n_layers = len(maps)
        device = maps.raw[0].device if maps.raw else torch.device("cpu")
    else:
        t = torch.as_tensor(maps).detach()
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4:
            raise CAManimError(f"maps must be (L, B, H, W), got shape {tuple(t.shape)}")
        it, n_layers, device = iter(t), t.shape[0], t.device
    m = m.detach().to(device=device, dtype=torch.float32)
    out = np.full((n_layers, m.shape[0]), np.nan)
    empty = (m.flatten(1).sum(1) <= 0).cpu().numpy()
    # small elementwise work: one CPU thread (OpenMP stalls on a busy CPU
    # make 2 threads ~30x slower here); sums accumulate in float64
    from .render import one_torch_thread

    with one_torch_thread(device.type == "cpu"):
        for i, u in enumerate(it):
            if u.shape != m.shape:
                raise CAManimError(f"maps of shape {tuple(u.shape)} (B, H, W) and masks of shape "
                                   f"{tuple(m.shape)} differ: resize the masks to the input size")
            u = u.detach().float()
            total = u.flatten(1).sum(1, dtype=torch.float64)
            inside = (u * m).flatten(1).sum(1, dtype=torch.float64)
            e = (inside / total.clamp_min(1e-300)).cpu().numpy()
            e[(total <= 0).cpu().numpy() | empty] = np.nan
            out[i] = e
    return out


# ===================================================================== probes

@dataclass
class _Probes:
    images: torch.Tensor                 # (B, C, H, W) float, CPU
    labels: list[int] | None             # dataset labels, when every item had one
    masks: torch.Tensor | None           # (B, H, W) float32 in [0, 1], CPU
    has_mask: list[bool]
    names: list[str]
    num_classes: int | None              # len(dataset.classes) when known


def _as_image(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise CAManimError(
            f"{what} is a {type(x).__name__}, not a tensor: probes must be (C, H, W) tensors "
            "as fed to the model (add a ToTensor/normalize transform to the dataset)")
    if x.dim() != 3:
        raise CAManimError(f"{what} has shape {tuple(x.shape)}; each probe image must be "
                           "(C, H, W)")
    if not x.is_floating_point():
        raise CAManimError(f"{what} has dtype {x.dtype}; probes must be float images "
                           "normalized as the model expects")
    return x.detach().cpu()


def _as_label(y: Any) -> int | None:
    if isinstance(y, bool):
        return None
    if isinstance(y, (int, np.integer)):
        return int(y)
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(y)
    if isinstance(y, torch.Tensor):
        if y.numel() == 1 and not y.is_floating_point():
            return int(y.reshape(()))
        if y.dim() == 1 and y.numel() > 1:  # one-hot
            return int(y.argmax())
    return None


def _as_mask(m: Any, hw: tuple[int, int], what: str) -> torch.Tensor:
    if isinstance(m, np.ndarray):
        m = torch.from_numpy(np.ascontiguousarray(m))
    if not isinstance(m, torch.Tensor):
        raise CAManimError(f"{what} is a {type(m).__name__}; masks must be (H, W) tensors")
    m = m.detach().cpu()
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise CAManimError(f"{what} has shape {tuple(m.shape)}; a mask must be (H, W) "
                           "(or (1, H, W))")
    if tuple(m.shape) != tuple(hw):
        raise CAManimError(f"{what} is {tuple(m.shape)} but the probe images are {tuple(hw)}: "
                           "resize the mask to the image size (nearest neighbour)")
    if m.dtype == torch.bool:
        return m.float()
    if not m.is_floating_point():
        return (m > 0).float()
    m = m.float()
    if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise CAManimError(f"{what} has values outside [0, 1]; pass a bool mask or floats "
                           "in [0, 1]")
    return m


def _split_item(item: Any, i: int) -> tuple[Any, Any, Any]:
    """(image, label, mask) of a dataset item."""
    if isinstance(item, dict):
        img = next((item[k] for k in ("image", "img", "input", "x") if k in item), None)
        if img is None:
            raise CAManimError(f"dataset item {i} is a dict without an 'image' key "
                               f"(keys: {sorted(item)})")
        lab = next((item[k] for k in ("label", "target", "y") if k in item), None)
        msk = next((item[k] for k in ("mask", "seg", "segmentation") if k in item), None)
        return img, lab, msk
    if isinstance(item, (tuple, list)):
        if not 1 <= len(item) <= 3:
            raise CAManimError(f"dataset item {i} has {len(item)} parts; items must be "
                               "image, (image, label) or (image, label, mask)")
        return (list(item) + [None, None])[:3]
    return item, None, None


def _is_dataset_probes(p: Any) -> bool:
    return (isinstance(p, tuple) and len(p) == 2
            and not isinstance(p[0], (torch.Tensor, np.ndarray))
            and hasattr(p[0], "__getitem__") and hasattr(p[0], "__len__")
            and isinstance(p[1], (Sequence, range, np.ndarray, torch.Tensor))
            and not isinstance(p[1], (str, bytes)))


def _load_probes(probes: Any, masks: Any, probe_names: Sequence[str] | None) -> _Probes:
    labels: list[int | None] = []
    item_masks: list[Any] = []
    num_classes = None
    default_names: list[str]
    if _is_dataset_probes(probes):
        dataset, idx = probes
        idx = [int(i) for i in (idx.tolist() if hasattr(idx, "tolist") else idx)]
        if not idx:
            raise CAManimError("the probe index list is empty: pass (dataset, [i, j, ...])")
        n = len(dataset)
        bad = [i for i in idx if not -n <= i < n]
        if bad:
            raise CAManimError(f"probe index {bad[0]} is out of range for a dataset of {n} items")
        imgs = []
        for i in idx:
            img, lab, msk = _split_item(dataset[i], i)
            imgs.append(_as_image(img, f"dataset item {i}'s image"))
            labels.append(_as_label(lab))
            item_masks.append(msk)
        classes = getattr(dataset, "classes", None)
        num_classes = len(classes) if isinstance(classes, Sequence) and classes else None
        default_names = [f"sample{i}" for i in idx]
    elif isinstance(probes, torch.Tensor):
        if probes.dim() == 3:
            raise CAManimError(f"probes has shape {tuple(probes.shape)}: pass a batch "
                               "(B, C, H, W), e.g. probes.unsqueeze(0) for one image")
        if probes.dim() != 4 or probes.shape[0] == 0:
            raise CAManimError(f"probes must be a (B, C, H, W) batch with B >= 1, got shape "
                               f"{tuple(probes.shape)}")
        imgs = [_as_image(p, f"probe {k}") for k, p in enumerate(probes)]
        default_names = [f"probe{k}" for k in range(len(imgs))]
    elif isinstance(probes, (list, tuple)) and probes:
        imgs = [_as_image(p, f"probe {k}") for k, p in enumerate(probes)]
        default_names = [f"probe{k}" for k in range(len(imgs))]
    else:
        raise CAManimError(
            f"probes must be a (B, C, H, W) tensor, a list of (C, H, W) tensors or "
            f"(dataset, [indices]); got {type(probes).__name__}"
            + (" (empty)" if isinstance(probes, (list, tuple)) else ""))
    shapes = {tuple(x.shape) for x in imgs}
    if len(shapes) > 1:
        raise CAManimError(f"probe images have different shapes {sorted(shapes)}: resize "
                           "them to one size")
    images = torch.stack(imgs).clone()
    if not torch.isfinite(images).all():
        raise CAManimError("probe images contain NaN or infinite values")
    B, hw = images.shape[0], tuple(images.shape[-2:])

    # masks: the argument wins over the dataset's
    mask_list: list[Any]
    if masks is not None:
        if isinstance(masks, (torch.Tensor, np.ndarray)):
            mt = torch.as_tensor(masks)
            if mt.dim() == 4 and mt.shape[1] == 1:
                mt = mt[:, 0]
            if mt.dim() != 3:
                raise CAManimError(f"masks must be (B, H, W), got shape {tuple(mt.shape)}")
            mask_list = list(mt)
        elif isinstance(masks, (list, tuple)):
            mask_list = list(masks)
        else:
            raise CAManimError(f"masks must be a (B, H, W) tensor or a list of (H, W) "
                               f"tensors / None, got {type(masks).__name__}")
        if len(mask_list) != B:
            raise CAManimError(f"got {len(mask_list)} masks for {B} probe images; pass one "
                               "per probe (None for a probe without one)")
    else:
        mask_list = item_masks if item_masks else [None] * B
    has_mask = [m is not None for m in mask_list]
    mask_t = None
    if any(has_mask):
        mask_t = torch.stack([_as_mask(m, hw, f"mask {k}") if m is not None
                              else torch.zeros(hw) for k, m in enumerate(mask_list)])

    if probe_names is not None:
        names = [str(n) for n in probe_names]
        if len(names) != B:
            raise CAManimError(f"got {len(names)} probe_names for {B} probe images")
    else:
        names = default_names
    safe = [safe_name(n) for n in names]
    if len(set(safe)) != len(safe):
        raise CAManimError(f"probe names must be unique (after making them file-safe): {safe}")
    lab = [int(x) for x in labels] if labels and all(x is not None for x in labels) else None
    return _Probes(images=images, labels=lab, masks=mask_t, has_mask=has_mask, names=safe,
                   num_classes=num_classes)


# ===================================================================== guards

def _cuda_devices(model: nn.Module) -> list[int]:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    devs = {t.device.index for t in list(model.parameters()) + list(model.buffers())
            if t.device.type == "cuda"}
    devs.add(torch.cuda.current_device())
    return sorted(d for d in devs if d is not None)


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run a block and leave ``model`` and the global RNG streams as they were.

    Saves and restores: the torch CPU and CUDA, numpy and Python ``random``
    states; torch's intra-op thread count; every submodule's ``training`` flag; every parameter's
    ``requires_grad`` and ``.grad`` (the same tensor object); hooks added
    during the block are removed. In-place changes that cannot be undone
    without a copy (parameters, gradients, buffers such as BatchNorm
    statistics) are detected through their version counters and reported
    with a warning.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    threads = torch.get_num_threads()
    params = list(model.parameters())
    buffers = list(model.buffers())
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad, p.grad, p._version,
              None if p.grad is None else p.grad._version) for p in params]
    buf_versions = [(b, b._version) for b in buffers]
    hook_keys = [(m, {a: set(getattr(m, a).keys()) for a in _HOOK_DICTS if hasattr(m, a)})
                 for m in model.modules()]
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        for m, t in modes:
            m.training = t
        changed = []
        for p, req, grad, ver, gver in flags:
            if p.requires_grad != req:
                p.requires_grad_(req)
            if p.grad is not grad:
                p.grad = grad
            if p._version != ver or (grad is not None and grad._version != gver):
                changed.append("parameters/gradients")
        if any(b._version != v for b, v in buf_versions):
            changed.append("buffers (e.g. BatchNorm statistics)")
        for m, keys in hook_keys:
            for attr, before in keys.items():
                d = getattr(m, attr)
                for k in [k for k in d if k not in before]:
                    del d[k]
        if changed:
            rank_zero_warn(f"camanim: the monitoring work changed {sorted(set(changed))} in "
                           "place; training may differ from a run without the callback. "
                           "Please report this.")


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")


# ===================================================================== the callback

class CAManimCallback(Callback):
    r"""Log CAManim videos and epoch-wise ybROAD of fixed probe images.

    .. code-block:: python

        from lightning.pytorch import Trainer
        from lightning.pytorch.loggers import TensorBoardLogger
        import camanim

        cb = camanim.CAManimCallback((val_set, [0, 7, 42, 99]), layers="conv")
        Trainer(callbacks=[cb], logger=TensorBoardLogger("runs")).fit(model, data)
        # tensorboard --logdir runs --samples_per_plugin images=100
        # camanim study runs/

    The work runs at ``on_train_epoch_end`` (in Lightning 2.x after that
    epoch's validation), never during the sanity check or outside
    ``fit``, in float32 outside autocast, with gradients enabled. Under DDP
    it runs on global rank zero only; every rank then meets at a barrier, and
    only rank zero writes files.

    Args:
        probes: the images to follow, fixed for the whole run: a
            ``(B, C, H, W)`` tensor, a list of ``(C, H, W)`` tensors, or
            ``(dataset, [i, j, ...])`` whose items are ``image``,
            ``(image, label)``, ``(image, label, mask)`` or a dict with
            ``"image"``, ``"label"``, ``"mask"`` keys. Images are normalized
            as the model expects; they move to the module's device and dtype.
        targets: the class each probe's maps explain. ``None``: the dataset
            labels when the probes come from a dataset whose items all have
            an integer label, else the class the model predicts at that
            epoch (recorded in the CSV ``target`` column); ``"predicted"``:
            always the predicted class; ``"labels"``: the dataset labels
            (an error without them); an int for every probe; B ints; or B
            pytorch-grad-cam target callables.
        method: CAM method name or ``BaseCAM`` subclass (see `camanim.CAManim`).
        layers: ``"conv"``, ``"all"``, ``"blocks"``, a list of layer names or a
            callable ``(name, module) -> bool``.
        every_n_epochs: run after every N-th epoch (epochs ``N-1, 2N-1, ...``,
            as Lightning's ``check_val_every_n_epoch``). Must be >= 1.
        epochs: instead, exactly these epochs (0-based ints).
        normalization: one video per name: ``"local"`` (each layer's map
            min-max scaled on its own), ``"global"`` (one scale over all
            layers of an image), ``"none"``, or ``"both"`` (side by side).
        road: compute ybROAD (ROAD of every layer's map). Without it there is
            no heatmap, no ROAD scalars and an empty ``road`` CSV column.
        road_percentiles: ROAD removal percentiles, each in (0, 100).
        road_noise: ROAD imputation noise.
        fps: frames (layers) per second of the videos.
        log_videos: log the animated GIFs to TensorBoard.
        save_videos: write the MP4 files under ``save_dir/videos``.
        save_dir: folder for the CSV, videos, heatmaps and maps. Default: the
            TensorBoard logger's ``log_dir``, else
            ``<trainer.default_root_dir>/camanim``.
        probe_names: B names for tags and files (made file-safe). Default:
            ``probe0, probe1, ...`` or ``sample<index>`` for dataset probes.
        max_layers: keep at most this many evenly spaced layers.
        batch_size: images per extra forward (Score-CAM, Ablation-CAM, ROAD).
        seed: seed of the private generators (random CAM methods, ROAD noise).
        on_fit_end: run once more when ``fit`` ends unless its last epoch was
            already done (e.g. ``every_n_epochs=5`` and 12 epochs: 4, 9, 11).
        masks: object masks of the probes for the energy-based pointing game
            (EBPG): a ``(B, H, W)`` bool/float tensor or a list of ``(H, W)``
            masks or ``None`` per probe; overrides masks from the dataset.
        mean, std: the input normalization of the probes, undone in the video
            frames (e.g. `camanim.render.IMAGENET_MEAN`/``IMAGENET_STD``).
            Without them values outside [0, 1] are stretched per image.
        save_maps: also save the raw maps of every monitored epoch
            (``maps/epoch{E:03d}.npz``, `camanim.LayerMaps.save`).
        model: which module to explain: ``None`` (the LightningModule, whose
            ``forward`` must return class scores), an attribute path of the
            LightningModule (``"net"``, ``"backbone.model"``) or a callable
            ``(lightning_module) -> nn.Module``.
        class_names: class names for the video captions and text summaries.
        video_size: frame panel size (``None``: automatic, an int: long side).
        on_error: ``"raise"`` (default) stops training on a failure of the
            monitoring work; ``"warn"`` warns and goes on training.
        progress: show progress bars of the CAM/ROAD work.
        cam_options: further options for `camanim.CAManim` (e.g. ``steps``).
        media_workers: threads that encode GIFs/MP4s and draw the plots while
            the next frames render (default: CPU count, 2 to 8). They touch
            neither torch nor any random stream.

    Raises:
        CAManimError: at construction, for probes, targets, masks or options
            that cannot work, naming the fix; at the start of ``fit``, for
            targets outside the model's classes or layer selections that
            match nothing.
    """

    def __init__(self, probes: Any, targets: Any = None, method: Any = "gradcam",
                 layers: Any = "conv", every_n_epochs: int = 1,
                 epochs: Sequence[int] | None = None,
                 normalization: str | Sequence[str] = ("local", "global"),
                 road: bool = True, road_percentiles: Sequence[float] = (20, 40, 60, 80),
                 fps: float = 8, log_videos: bool = True, save_dir: str | Path | None = None,
                 probe_names: Sequence[str] | None = None, max_layers: int | None = None,
                 batch_size: int | None = None, seed: int = 0, on_fit_end: bool = True,
                 masks: Any = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, save_maps: bool = False,
                 road_noise: float = 0.01, *, save_videos: bool = True,
                 model: str | Callable[[nn.Module], nn.Module] | None = None,
                 class_names: Sequence[str] | None = None,
                 video_size: int | Sequence[int] | None = None, on_error: str = "raise",
                 progress: bool = False, cam_options: dict | None = None,
                 media_workers: int | None = None) -> None:
        super().__init__()
        self._probes = _load_probes(probes, masks, probe_names)
        B, C = self._probes.images.shape[:2]

        # --- schedule
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, (int, np.integer)):
            raise CAManimError(f"every_n_epochs must be an int >= 1, got {every_n_epochs!r}")
        if every_n_epochs < 1:
            raise CAManimError(f"every_n_epochs must be >= 1, got {every_n_epochs} (to log "
                               "only at chosen epochs pass epochs=[...])")
        if epochs is not None:
            if isinstance(epochs, (int, str)) or not isinstance(
                    epochs, (Sequence, range, np.ndarray)):
                raise CAManimError(f"epochs must be a list of epoch numbers, e.g. [0, 4, 9]; "
                                   f"got {epochs!r}")
            ep = list(epochs)
            bad = [e for e in ep if isinstance(e, bool) or not isinstance(e, (int, np.integer))
                   or e < 0]
            if bad or not ep:
                raise CAManimError(f"epochs must be non-negative ints (0-based, as "
                                   f"trainer.current_epoch); bad: {bad or ep!r}")
            if len(set(ep)) != len(ep):
                raise CAManimError(f"epochs lists an epoch twice: {sorted(ep)}")
            if every_n_epochs != 1:
                raise CAManimError("pass either every_n_epochs or epochs, not both")
            epochs = sorted(int(e) for e in ep)
        self.every_n_epochs = int(every_n_epochs)
        self.epochs = epochs

        # --- targets
        self._targets_mode, self._targets = self._check_targets(targets, B)

        # --- videos
        norms = (normalization,) if isinstance(normalization, str) else tuple(normalization)
        bad = [n for n in norms if n not in _VIDEO_NORMS]
        if bad:
            raise CAManimError(f"unknown normalization {bad[0]!r}; use any of "
                               f"{', '.join(_VIDEO_NORMS)}")
        if len(set(norms)) != len(norms):
            raise CAManimError(f"normalization lists a name twice: {norms}")
        if not norms and (log_videos or save_videos):
            raise CAManimError("normalization is empty: name at least one (local, global, "
                               "both, none) or pass log_videos=False, save_videos=False")
        self.normalization = norms
        if not (isinstance(fps, (int, float)) and fps > 0 and math.isfinite(fps)):
            raise CAManimError(f"fps must be a positive number, got {fps!r}")
        self.fps = float(fps)
        self.log_videos = bool(log_videos)
        self.save_videos = bool(save_videos)
        self.video_size = video_size
        for what, v in (("mean", mean), ("std", std)):
            if v is not None:
                n = len(list(v))
                if n not in (1, C):
                    raise CAManimError(f"{what} has {n} values but the probes have {C} "
                                       "channels")
        if std is not None and any(float(s) <= 0 for s in std):
            raise CAManimError(f"std values must be > 0, got {list(std)}")
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]
        self.class_names = list(class_names) if class_names is not None else None

        # --- ROAD
        self.road = bool(road)
        pct = list(road_percentiles)
        if self.road and (not pct or any(not 0 < float(p) < 100 for p in pct)):
            raise CAManimError(f"road_percentiles must be numbers strictly between 0 and 100, "
                               f"got {pct}")
        self.road_percentiles = tuple(float(p) for p in pct)
        if not (isinstance(road_noise, (int, float)) and road_noise >= 0):
            raise CAManimError(f"road_noise must be >= 0, got {road_noise!r}")
        self.road_noise = float(road_noise)

        # --- CAM engine options (checked now: a typo should not wait an epoch)
        from .methods import get_method

        get_method(method)
        self.method = method
        self.layers = layers
        if max_layers is not None and (not isinstance(max_layers, (int, np.integer))
                                       or max_layers < 1):
            raise CAManimError(f"max_layers must be an int >= 1 or None, got {max_layers!r}")
        self.max_layers = max_layers
        if batch_size is not None and (not isinstance(batch_size, (int, np.integer))
                                       or batch_size < 1):
            raise CAManimError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
        self.batch_size = batch_size
        self.seed = int(seed)
        self.progress = bool(progress)
        self.cam_options = dict(cam_options or {})
        if not (model is None or isinstance(model, str) or callable(model)):
            raise CAManimError("model must be None, an attribute name of the LightningModule "
                               "or a callable (lightning_module) -> nn.Module")
        self.model = model
        if on_error not in ("raise", "warn"):
            raise CAManimError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        self.on_error = on_error
        self.run_on_fit_end = bool(on_fit_end)
        self.save_maps = bool(save_maps)
        self.save_dir = Path(save_dir) if save_dir is not None else None

        # --- state
        self._history: dict[int, dict] = {}     # epoch -> record (plain python)
        self._anim: Any = None
        self._anim_model: nn.Module | None = None
        self._dir: Path | None = None
        self._csv_keys: set[tuple[int, str, str]] | None = None
        self._last_epoch: int | None = None
        self._warned: set[str] = set()
        #: seconds per phase of the last epoch's work (cam, road, ebpg, to_cpu,
        #: csv, videos (render + encode, parallel jobs), plots (a job,
        #: overlapped with videos), log (scalars, text, flush), total)
        self.last_timing: dict[str, float] = {}
        self._pool: Any = None
        if media_workers is not None and (not isinstance(media_workers, int) or media_workers < 1):
            raise CAManimError(f"media_workers must be an int >= 1, got {media_workers!r}")
        self.media_workers = media_workers or max(2, min(8, os.cpu_count() or 2))

    # ------------------------------------------------------------ validation
    def _check_targets(self, targets: Any, B: int) -> tuple[str, Any]:
        labels = self._probes.labels
        k = self._probes.num_classes
        if targets is None:
            return ("labels", list(labels)) if labels is not None else ("predicted", None)
        if isinstance(targets, str):
            if targets == "predicted":
                return "predicted", None
            if targets in ("labels", "label"):
                if labels is None:
                    raise CAManimError("targets='labels' needs probes from a dataset whose "
                                       "items all carry an integer label")
                return "labels", list(labels)
            raise CAManimError(f"targets must be None, 'predicted', 'labels', an int, "
                               f"{B} ints or {B} callables; got {targets!r}")
        if isinstance(targets, torch.Tensor):
            if targets.is_floating_point():
                raise CAManimError("targets must be integer class indices, got a float tensor")
            targets = [int(t) for t in targets.reshape(-1)]
        if isinstance(targets, (int, np.integer)) and not isinstance(targets, bool):
            targets = [int(targets)] * B
        if isinstance(targets, (list, tuple)) and targets and all(callable(t) for t in targets):
            if len(targets) != B:
                raise CAManimError(f"got {len(targets)} target callables for {B} probes; "
                                   "pass one per probe")
            return "callables", list(targets)
        if not isinstance(targets, (list, tuple, np.ndarray)) or not all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in targets):
            raise CAManimError(f"targets must be None, 'predicted', 'labels', an int, {B} ints "
                               f"or {B} callables; got {targets!r}")
        targets = [int(t) for t in targets]
        if len(targets) != B:
            raise CAManimError(f"got {len(targets)} targets for {B} probes; pass one per probe")
        bad = [t for t in targets if t < 0 or (k is not None and t >= k)]
        if bad:
            rng = f" (the dataset has {k} classes: 0..{k - 1})" if k is not None else ""
            raise CAManimError(f"target class {bad[0]} is out of range{rng}")
        return "given", targets

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=str(getattr(self.method, "__name__", self.method)),
                                        layers=str(self.layers), probes=self._probes.names)

    @property
    def probe_names(self) -> list[str]:
        """The (file-safe) probe names used in tags and files."""
        return list(self._probes.names)

    # ------------------------------------------------------------ schedule
    def _scheduled(self, epoch: int) -> bool:
        if self.epochs is not None:
            return epoch in self.epochs
        return (epoch + 1) % self.every_n_epochs == 0

    def _fitting(self, trainer: Any) -> bool:
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        return (not trainer.sanity_checking) and str(getattr(fn, "value", fn)) == "fit"

    # ------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._last_epoch = None
        self._csv_keys = None
        self._dir = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Check targets and layers against the model before any training."""
        model = self._module(pl_module)
        x, dev = self._probe_batch(model)
        try:
            with self._context(model, dev):
                anim = self._engine(model)
                table = anim.layer_table(x)
                if not table.selected:
                    raise CAManimError(f"layers={self.layers!r} selects no layer of this model")
                from .capture import eval_mode, forward_logits

                with eval_mode(model), torch.no_grad():
                    logits = forward_logits(model, x[:1])
        except CAManimError as e:
            raise CAManimError(f"CAManimCallback: {e}") from None
        if logits.dim() != 2 and self._targets_mode != "callables":
            raise CAManimError(f"CAManimCallback: the model returns shape {tuple(logits.shape)}, "
                               "not (B, classes); pass model= (the classifier to explain) or "
                               "target callables")
        if self._targets is not None and self._targets_mode != "callables":
            k = logits.shape[-1]
            bad = [t for t in self._targets if not 0 <= t < k]
            if bad:
                raise CAManimError(f"CAManimCallback: target class {bad[0]} is out of range: "
                                   f"the model has {k} classes (0..{k - 1})")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._fitting(trainer):
            return
        epoch = int(trainer.current_epoch)
        self._last_epoch = epoch
        if self._scheduled(epoch):
            self._run_synced(trainer, pl_module, epoch)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.run_on_fit_end or trainer.sanity_checking:
            return
        epoch = self._last_epoch
        if epoch is None:  # no epoch ran in this fit (e.g. resumed a finished run)
            return
        if self._scheduled(epoch):
            return  # on_train_epoch_end did it (decided from the schedule alone, so
            #         every DDP rank takes the same branch and meets the same barrier)
        self._run_synced(trainer, pl_module, epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"format": _STATE_FORMAT,
                "history": [dict(epoch=e, **rec) for e, rec in sorted(self._history.items())]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("format") != _STATE_FORMAT:
            rank_zero_warn("CAManimCallback: unknown checkpoint state format; starting a "
                           "fresh history")
            return
        self._history = {}
        for rec in state_dict.get("history", []):
            rec = dict(rec)
            self._history[int(rec.pop("epoch"))] = rec

    # ------------------------------------------------------------ history access
    @property
    def epochs_done(self) -> list[int]:
        """Epochs with results so far (this run and restored ones), sorted."""
        return sorted(self._history)

    def road_history(self, probe: str | int) -> tuple[list[int], list[str], np.ndarray]:
        """``(epochs, layer names, (E, L) ROAD scores)`` of one probe over the
        epochs done so far with the current layer list."""
        return self._matrix(probe, "road")

    def ebpg_history(self, probe: str | int) -> tuple[list[int], list[str], np.ndarray]:
        """Like `road_history`, for the energy-based pointing game."""
        return self._matrix(probe, "ebpg")

    def _matrix(self, probe: str | int, key: str) -> tuple[list[int], list[str], np.ndarray]:
        name = self._probes.names[probe] if isinstance(probe, int) else str(probe)
        if name not in self._probes.names:
            raise CAManimError(f"no probe {probe!r}; probes are {self._probes.names}")
        if not self._history:
            return [], [], np.zeros((0, 0))
        names = self._history[max(self._history)]["names"]
        epochs = [e for e in sorted(self._history) if self._history[e]["names"] == names
                  and self._history[e].get(key) is not None
                  and name in self._history[e][key]]
        mat = np.array([[math.nan if v is None else v for v in self._history[e][key][name]]
                        for e in epochs], dtype=np.float64).reshape(len(epochs), len(names))
        return epochs, list(names), mat

    # ------------------------------------------------------------ the work
    def _module(self, pl_module: nn.Module) -> nn.Module:
        if self.model is None:
            return pl_module
        if isinstance(self.model, str):
            m: Any = pl_module
            for part in self.model.split("."):
                if not hasattr(m, part):
                    raise CAManimError(f"model={self.model!r}: the LightningModule has no "
                                       f"attribute {part!r}")
                m = getattr(m, part)
        else:
            m = self.model(pl_module)
        if not isinstance(m, nn.Module):
            raise CAManimError(f"model={self.model!r} gave a {type(m).__name__}, not an "
                               "nn.Module")
        return m

    def _engine(self, model: nn.Module) -> Any:
        if self._anim is None or self._anim_model is not model:
            from .cam import CAManim

            kw = dict(max_layers=self.max_layers, seed=self.seed, progress=self.progress,
                      **self.cam_options)
            if self.batch_size is not None:
                kw["batch_size"] = self.batch_size
            from .methods import get_method
            if get_method(self.method).name == "integrated-gradcam":
                # its black baseline lives in the model's input space: use the
                # normalization the probes were given with
                for key in ("mean", "std"):
                    if getattr(self, key, None) is not None:
                        kw.setdefault(key, getattr(self, key))
            self._anim = CAManim(model, self.method, self.layers, **kw)
            self._anim_model = model
        return self._anim

    def _probe_batch(self, model: nn.Module) -> tuple[torch.Tensor, torch.device]:
        from .inputs import model_device_dtype

        dev, dtype = model_device_dtype(model)
        with torch.inference_mode(False):
            x = self._probes.images.to(device=dev, dtype=dtype)
        return x, dev

    @contextlib.contextmanager
    def _context(self, model: nn.Module, dev: torch.device) -> Iterator[None]:
        with untouched(model), torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device_type=dev.type, enabled=False):
            yield

    def _run_synced(self, trainer: Any, pl_module: Any, epoch: int) -> None:
        """Rank zero works; every rank meets at the barrier after."""
        error: BaseException | None = None
        if trainer.is_global_zero:
            try:
                self._run(trainer, pl_module, epoch)
            except Exception as e:  # noqa: BLE001 - re-raised or warned below
                error = e
        if trainer.world_size > 1:
            trainer.strategy.barrier("camanim")
        if error is not None:
            if self.on_error == "raise":
                raise error
            rank_zero_warn(f"CAManimCallback: epoch {epoch} failed and was skipped: "
                           f"{type(error).__name__}: {error}")

    def _run(self, trainer: Any, pl_module: Any, epoch: int) -> None:
        t0 = time.perf_counter()
        model = self._module(pl_module)
        out_dir = self._resolve_dir(trainer)
        x, dev = self._probe_batch(model)
        self.last_timing = timing = {}
        with self._context(model, dev):
            maps, road_scores, ebpg = self._compute(model, x, timing)
            t = time.perf_counter()
            maps.to("cpu")
            timing["to_cpu"] = time.perf_counter() - t
            targets = ([None] * maps.batch_size if maps.targets is None
                       else [int(t) for t in maps.targets.reshape(-1)])
            record = {
                "global_step": int(trainer.global_step),
                "names": list(maps.names),
                "method": str(maps.method),
                "targets": dict(zip(self._probes.names, targets)),
                "road": None if road_scores is None else {
                    n: _floats(road_scores[:, b]) for b, n in enumerate(self._probes.names)},
                "ebpg": None if ebpg is None else {
                    n: _floats(ebpg[:, b]) for b, n in enumerate(self._probes.names)
                    if self._probes.has_mask[b]},
            }
            self._history[epoch] = record
            t = time.perf_counter()
            self._write_csv(out_dir, epoch)
            timing["csv"] = time.perf_counter() - t
            tb = _tensorboard(trainer)
            self._log_media(trainer, tb, out_dir, epoch, maps, road_scores, timing)
            if self.save_maps:
                maps.save(out_dir / "maps" / f"epoch{epoch:03d}.npz")
            del maps, x
            t = time.perf_counter()
            record["seconds"] = t - t0
            self._log_scalars(trainer, tb, epoch, record)
            if tb is not None:
                tb.flush()
            timing["log"] = time.perf_counter() - t
        timing["total"] = time.perf_counter() - t0

    def _compute(self, model: nn.Module, x: torch.Tensor, timing: dict[str, float]
                 ) -> tuple[LayerMaps, np.ndarray | None, np.ndarray | None]:
        anim = self._engine(model)
        targets = None if self._targets_mode == "predicted" else self._targets
        t = time.perf_counter()
        maps = anim(x, targets)
        _sync(x.device)
        timing["cam"] = time.perf_counter() - t
        scores = None
        if self.road:
            from .road import ybroad

            kw: dict[str, Any] = dict(percentiles=self.road_percentiles, noise=self.road_noise,
                                      seed=self.seed, progress=self.progress)
            if self.batch_size is not None:
                kw["batch_size"] = self.batch_size
            # the user's own score callables are kept; class indices otherwise
            road_targets = targets if self._targets_mode == "callables" or maps.targets is None \
                else maps.targets
            t = time.perf_counter()
            res = ybroad(model, x, maps, targets=road_targets, **kw)
            scores = np.asarray(getattr(res, "scores", res), dtype=np.float64)
            timing["road"] = time.perf_counter() - t
            del res
        ebpg = None
        if self._probes.masks is not None:
            t = time.perf_counter()
            ebpg = energy_pointing_game(maps, self._probes.masks)
            timing["ebpg"] = time.perf_counter() - t
        return maps, scores, ebpg

    # ------------------------------------------------------------ files
    def _resolve_dir(self, trainer: Any) -> Path:
        if self._dir is None:
            if self.save_dir is not None:
                d = self.save_dir
            else:
                tb = _tb_logger(trainer)
                d = (Path(tb.log_dir) if tb is not None
                     else Path(trainer.default_root_dir) / "camanim")
            d.mkdir(parents=True, exist_ok=True)
            self._dir = d
        return self._dir

    def _method_name(self) -> str:
        if self._anim is not None:
            return str(self._anim.method.name)
        return str(getattr(self.method, "__name__", self.method))

    def _read_csv_keys(self, path: Path) -> None:
        """Which (epoch, probe, method) the CSV already holds; epochs there
        but missing from the restored history (a checkpoint written before
        that epoch's work) are taken back into the history."""
        self._csv_keys = set()
        if not path.exists() or path.stat().st_size == 0:
            return
        method = self._method_name()
        found: dict[int, dict] = {}
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
                raise CAManimError(f"{path} exists with other columns ({reader.fieldnames}); "
                                   "pass another save_dir")
            for row in reader:
                e, p = int(row["epoch"]), row["probe"]
                self._csv_keys.add((e, p, row["method"]))
                if row["method"] != method or p not in self._probes.names:
                    continue
                rec = found.setdefault(e, {"global_step": int(row["global_step"]),
                                           "method": method, "rows": {}})
                rec["rows"].setdefault(p, {})[int(row["layer_index"])] = row
        for e, rec in found.items():
            if e in self._history or set(rec["rows"]) != set(self._probes.names):
                continue
            first = rec["rows"][self._probes.names[0]]
            names = [first[i]["layer_name"] for i in sorted(first)]
            road, ebpg, targets = {}, {}, {}
            for p, rows in rec["rows"].items():
                ordered = [rows[i] for i in sorted(rows)]
                if [r["layer_name"] for r in ordered] != names:
                    break
                road[p] = [_parse(r["road"]) for r in ordered]
                eb = [_parse(r["ebpg"]) for r in ordered]
                if any(v is not None for v in eb):
                    ebpg[p] = eb
                t = ordered[0]["target"]
                targets[p] = int(t) if t != "" else None
            else:
                self._history[e] = {
                    "global_step": rec["global_step"], "names": names, "method": method,
                    "targets": targets,
                    "road": road if any(any(v is not None for v in r) for r in road.values())
                    else None,
                    "ebpg": ebpg or None}

    def _write_csv(self, out_dir: Path, epoch: int) -> None:
        path = out_dir / CSV_NAME
        if self._csv_keys is None:
            self._read_csv_keys(path)
        assert self._csv_keys is not None
        rows = []
        skipped = False
        # backfill restored epochs this CSV lacks (e.g. a new log_dir after resume)
        for e in sorted(self._history):
            rec = self._history[e]
            for p in self._probes.names:
                key = (e, p, rec["method"])
                if key in self._csv_keys:
                    skipped = skipped or e == epoch
                    continue
                rows.extend(_csv_rows(e, p, rec))
                self._csv_keys.add(key)
        if skipped and "csv" not in self._warned:
            self._warned.add("csv")
            rank_zero_warn(f"CAManimCallback: {path} already holds epoch {epoch} (a resumed "
                           "run); rows already there are not written again")
        if not rows:
            return
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(CSV_COLUMNS)
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------ logging
    def _executor(self) -> Any:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=self.media_workers,
                                            thread_name_prefix="camanim-media")
        return self._pool

    def _log_media(self, trainer: Any, tb: Any, out_dir: Path, epoch: int, maps: LayerMaps,
                   road: np.ndarray | None, timing: dict[str, float]) -> None:
        """Videos (render, GIF, MP4; one job per probe and normalization) and
        plots run in parallel on worker threads, all finished before this
        returns (training waits meanwhile); none of them uses a random stream."""
        step = int(trainer.global_step)
        names = self._probes.names
        pool = self._executor()
        jobs = []
        errors: list[BaseException] = []
        t = time.perf_counter()
        threads = torch.get_num_threads()
        try:
            if road is not None:
                plots = []
                for b, name in enumerate(names):
                    eb = self._history[epoch]["ebpg"]
                    eb_b = None if eb is None or name not in eb else np.array(
                        [math.nan if v is None else v for v in eb[name]])
                    plots.append((name, self.road_history(name), road[:, b].copy(), eb_b))
                jobs.append(pool.submit(self._plots, tb, out_dir, epoch, step,
                                        list(maps.names), plots, timing))
            if (self.log_videos and tb is not None) or self.save_videos:
                # The renderer upsamples with torch under a temporary 1-thread
                # setting; pinning the count to 1 while the jobs run keeps
                # their save/restore from racing. Restored below, before
                # training resumes (and by `untouched`).
                torch.set_num_threads(1)
                for norm in self.normalization:
                    for b, name in enumerate(names):
                        gif_tag = (f"camanim/{name}/{norm}" if self.log_videos and tb is not None
                                   else None)
                        mp4 = (out_dir / "videos" / f"{name}_epoch{epoch:03d}_{norm}.mp4"
                               if self.save_videos else None)
                        jobs.append(pool.submit(self._video_job, maps, b, norm, road, epoch,
                                                tb, gif_tag, mp4, step))
            for job in jobs:
                try:
                    job.result()
                except Exception as e:  # noqa: BLE001 - first one re-raised below
                    errors.append(e)
            jobs.clear()
        finally:
            torch.set_num_threads(threads)
        timing["videos"] = time.perf_counter() - t
        if errors:
            raise errors[0]

    def _video_job(self, maps: LayerMaps, b: int, norm: str, road: np.ndarray | None,
                   epoch: int, tb: Any, gif_tag: str | None, mp4: Path | None,
                   step: int) -> None:
        from .render import render_frames

        frames = list(render_frames(self._probes.images, maps, normalization=norm,
                                    mean=self.mean, std=self.std, road=road, index=b,
                                    size=self.video_size, class_names=self.class_names,
                                    title=f"epoch {epoch}"))
        _encode(tb, gif_tag, mp4, frames, self.fps, step)

    def _plots(self, tb: Any, out_dir: Path, epoch: int, step: int, layer_names: list[str],
               plots: list, timing: dict[str, float]) -> None:
        t = time.perf_counter()
        method = self._method_name()
        for name, (epochs, lnames, mat), scores, eb in plots:
            img = fast_heatmap_image(mat, epochs, lnames,
                                     title=f"{name}: ybROAD by epoch ({method})")
            _save_png(out_dir / "heatmaps" / f"{name}.png", img)
            if tb is not None:
                tb.add_image(f"ybroad/{name}/heatmap", img, step, dataformats="HWC")
                curve = fast_curve_image(scores, layer_names, ebpg=eb,
                                         title=f"{name}: ybROAD, epoch {epoch}")
                tb.add_image(f"ybroad/{name}/curve", curve, step, dataformats="HWC")
        timing["plots"] = time.perf_counter() - t

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if stage == "fit":  # keep no reference to the model after fit
            self._anim = self._anim_model = None

    def __getstate__(self) -> dict[str, Any]:
        # picklable for ddp_spawn: no thread pool, no engine holding the model
        state = dict(self.__dict__)
        state.update(_pool=None, _anim=None, _anim_model=None)
        return state

    def _log_scalars(self, trainer: Any, tb: Any, epoch: int, rec: dict) -> None:
        step = int(trainer.global_step)
        metrics: dict[str, float] = {"camanim/seconds": float(rec["seconds"])}
        names = rec["names"]
        for b, p in enumerate(self._probes.names):
            best = None
            if rec["road"] is not None:
                s = np.array([math.nan if v is None else v for v in rec["road"][p]])
                if np.isfinite(s).any():
                    best = int(np.nanargmax(s))
                    metrics[f"ybroad/{p}/mean"] = float(np.nanmean(s))
                    metrics[f"ybroad/{p}/max"] = float(s[best])
                    metrics[f"ybroad/{p}/best_layer"] = float(best)
                    metrics[f"ybroad/{p}/final_layer"] = float(s[-1])
            eb = None
            if rec["ebpg"] is not None and p in rec["ebpg"]:
                eb = np.array([math.nan if v is None else v for v in rec["ebpg"][p]])
                if np.isfinite(eb).any():
                    metrics[f"ebpg/{p}/max"] = float(np.nanmax(eb))
                    if best is not None:
                        metrics[f"ebpg/{p}/best_road_layer"] = float(eb[best])
            if tb is not None:
                tb.add_text(f"camanim/{p}/summary",
                            self._summary_text(epoch, rec, p, best, eb, names), step)
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)

    def _summary_text(self, epoch: int, rec: dict, p: str, best: int | None,
                      eb: np.ndarray | None, names: list[str]) -> str:
        t = rec["targets"].get(p)
        named = t is not None and self.class_names and 0 <= t < len(self.class_names)
        tname = ("" if t is None else f"{self.class_names[t]} ({t})" if named  # type: ignore[index]
                 else f"class {t}")
        lines = [f"**{p}**, epoch {epoch} (step {rec['global_step']}), {rec['method']}, "
                 f"{len(names)} layers" + (f", target {tname}" if tname else "")]
        if best is not None:
            s = rec["road"][p]
            lines.append(f"best ybROAD layer: `{names[best]}` (#{best}/{len(names) - 1}), "
                         f"ROAD {s[best]:+.3f}; final layer `{names[-1]}` {s[-1]:+.3f}; "
                         f"mean {float(np.nanmean(np.array(s, dtype=float))):+.3f}")
            if eb is not None and np.isfinite(eb).any():
                k = int(np.nanargmax(eb))
                lines.append(f"EBPG at the best ROAD layer: {eb[best]:.3f}; best EBPG "
                             f"{eb[k]:.3f} at `{names[k]}`")
        elif rec["road"] is None:
            lines.append("ybROAD off (road=False)")
        return "\n\n".join(lines)


# ===================================================================== fast plots
# The heatmap and curve logged every epoch are drawn with numpy + PIL: ~10 ms
# instead of ~0.5 s for a matplotlib figure with 53 layer labels (text layout
# dominates there). The label strips, which never change during a run, are
# drawn once and cached. `camanim study` draws the same pictures with
# matplotlib (`camanim.study.heatmap_image`).

_BG = (255, 255, 255)
_INK = (30, 30, 30)
_GRID = (200, 200, 200)
_NAN = (215, 215, 215)
_font_cache: dict[int, Any] = {}
_strip_cache: dict[tuple, np.ndarray] = {}


def _pil_font(size: int) -> Any:
    if size not in _font_cache:
        from PIL import ImageFont

        try:
            import matplotlib

            path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSansMono.ttf")
            _font_cache[size] = ImageFont.truetype(path, size)
        except Exception:  # noqa: BLE001 - any font will do
            _font_cache[size] = ImageFont.load_default(size=size)
    return _font_cache[size]


def _label_strip(names: Sequence[str], row: int, font_size: int, rotate: bool) -> np.ndarray:
    """Layer labels, one per ``row`` pixels: the index right-aligned in its own
    column, then the name; only names, right-aligned and rotated 90 degrees,
    for an x axis. Cached (``(H, W, 3)`` uint8)."""
    key = (tuple(names), row, font_size, rotate)
    if key not in _strip_cache:
        from PIL import Image, ImageDraw

        font = _pil_font(font_size)
        step = max(1, math.ceil(font_size * 1.1 / row))
        idx_w = 0 if rotate else int(font.getlength(str(len(names) - 1))) + 8
        width = idx_w + int(max(font.getlength(n) for n in names)) + 6
        im = Image.new("RGB", (width, row * len(names)), _BG)
        d = ImageDraw.Draw(im)
        for i in range(0, len(names), step):
            y = i * row + row / 2
            if rotate:
                d.text((width - 3, y), names[i], font=font, fill=_INK, anchor="rm")
            else:
                d.text((idx_w - 6, y), str(i), font=font, fill=_INK, anchor="rm")
                d.text((idx_w, y), names[i], font=font, fill=_INK, anchor="lm")
        if rotate:
            im = im.transpose(Image.Transpose.ROTATE_90)
        if len(_strip_cache) > 64:
            _strip_cache.clear()
        _strip_cache[key] = np.asarray(im)
    return _strip_cache[key]


def _lut(name: str) -> np.ndarray:
    from .render import colormap_lut

    return colormap_lut(name)


def _colors(values: np.ndarray, v: float, lut: np.ndarray) -> np.ndarray:
    idx = np.clip((np.nan_to_num(values) + v) / (2 * v) * 255 + 0.5, 0, 255).astype(np.int64)
    rgb = lut[idx]
    rgb[~np.isfinite(values)] = _NAN
    return rgb


def fast_heatmap_image(road: np.ndarray, epochs: Sequence[int], names: Sequence[str],
                       title: str = "") -> np.ndarray:
    """Epoch-by-layer ROAD heatmap (layers top to bottom, epochs left to
    right, each epoch's best layer marked, colour bar), ``(H, W, 3)`` uint8.
    A column is 14 px wide up to 40 epochs, so the image widens by one
    column per epoch; then columns narrow to keep it under ~560 px."""
    from PIL import Image, ImageDraw

    road = np.asarray(road, dtype=np.float64).reshape(len(epochs), len(names))
    E, L = road.shape
    cw = 14 if E <= 40 else max(2, 560 // E)
    rh = 12 if L <= 80 else max(3, 960 // L)
    fs = 10
    strip = _label_strip(names, rh, fs, rotate=False)
    top, bottom, gap = 24, 34, 4
    x0 = strip.shape[1] + gap
    pw, ph = cw * max(E, 1), rh * L
    width = x0 + pw + 70
    height = top + ph + bottom
    im = Image.new("RGB", (width, height), _BG)
    canvas = np.asarray(im).copy()
    canvas[top:top + ph, :strip.shape[1]] = strip
    finite = road[np.isfinite(road)]
    v = float(np.abs(finite).max()) if finite.size else 1.0
    v = v if v > 0 else 1.0
    lut = _lut("RdYlGn")
    if E:
        cells = _colors(road.T, v, lut)                                  # (L, E, 3)
        canvas[top:top + ph, x0:x0 + pw] = np.repeat(np.repeat(cells, rh, 0), cw, 1)
    bar = _colors(np.linspace(v, -v, ph)[:, None], v, lut)             # colour bar
    bx = x0 + pw + 10
    canvas[top:top + ph, bx:bx + 10] = np.repeat(bar, 10, 1)
    im = Image.fromarray(canvas)
    d = ImageDraw.Draw(im)
    font = _pil_font(fs)
    d.rectangle([x0 - 1, top - 1, x0 + pw, top + ph], outline=_INK)
    for e in range(E):
        if np.isfinite(road[e]).any():
            b = int(np.nanargmax(road[e]))
            cx, cy, r = x0 + e * cw + cw / 2, top + b * rh + rh / 2, max(2, min(cw, rh) / 2 - 2)
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(0, 0, 0), width=2)
    step = max(1, math.ceil(24 / cw))
    for e in range(0, E, step):
        d.text((x0 + e * cw + cw / 2, top + ph + 3), str(epochs[e]), font=font, fill=_INK,
               anchor="ma")
    d.text((x0 + pw / 2, top + ph + 18), "epoch", font=font, fill=_INK, anchor="ma")
    for val, y in ((v, top), (0.0, top + ph / 2), (-v, top + ph)):
        d.text((bx + 13, y), f"{val:+.2g}", font=font, fill=_INK, anchor="lm")
    d.text((4, 6), title, font=_pil_font(11), fill=_INK)
    return np.asarray(im)


def fast_curve_image(road: np.ndarray, names: Sequence[str], title: str = "",
                     ebpg: np.ndarray | None = None) -> np.ndarray:
    """This epoch's ybROAD curve (ROAD per layer, best layer marked), with
    the EBPG per layer dashed on a 0..1 axis when given. ``(H, W, 3)`` uint8."""
    from PIL import Image, ImageDraw

    road = np.asarray(road, dtype=np.float64).reshape(-1)
    L = len(names)
    cw = max(6, min(16, 800 // max(L, 1)))
    fs = 10
    strip = _label_strip(names, cw, fs, rotate=True)                   # (h, L*cw)
    left, right, top, ph = 56, 50 if ebpg is not None else 16, 24, 150
    pw = cw * L
    width, height = left + pw + right, top + ph + 6 + strip.shape[0] + 4
    canvas = np.full((height, width, 3), 255, np.uint8)
    canvas[top + ph + 6: top + ph + 6 + strip.shape[0], left:left + pw] = strip[:, :pw]
    im = Image.fromarray(canvas)
    d = ImageDraw.Draw(im)
    font = _pil_font(fs)
    finite = road[np.isfinite(road)]
    lo = min(0.0, float(finite.min())) if finite.size else -1.0
    hi = max(0.0, float(finite.max())) if finite.size else 1.0
    if hi - lo < 1e-12:
        hi = lo + 1.0
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def y_of(val: float, a: float = lo, b: float = hi) -> float:
        return top + ph - (val - a) / (b - a) * ph

    def x_of(i: int) -> float:
        return left + i * cw + cw / 2

    d.rectangle([left, top, left + pw, top + ph], outline=_INK)
    d.line([(left, y_of(0.0)), (left + pw, y_of(0.0))], fill=_GRID)
    for val in (lo + pad, 0.0, hi - pad):
        d.text((left - 4, y_of(val)), f"{val:+.3g}", font=font, fill=_INK, anchor="rm")
    d.text((4, top + ph / 2 + 14), "ROAD", font=font, fill=(31, 119, 180))
    if ebpg is not None:
        eb = np.asarray(ebpg, dtype=np.float64).reshape(-1)
        pts = [(x_of(i), y_of(float(e), 0.0, 1.0)) for i, e in enumerate(eb) if np.isfinite(e)]
        for (xa, ya), (xb, yb) in zip(pts[:-1], pts[1:]):
            for k in range(0, 10, 2):  # dashed
                f0, f1 = k / 10, (k + 1) / 10
                d.line([(xa + (xb - xa) * f0, ya + (yb - ya) * f0),
                        (xa + (xb - xa) * f1, ya + (yb - ya) * f1)], fill=(148, 103, 189), width=2)
        for val in (0.0, 1.0):
            d.text((left + pw + 4, y_of(val, 0.0, 1.0)), f"{val:.0f}", font=font,
                   fill=(148, 103, 189), anchor="lm")
        d.text((left + pw + 4, top + ph / 2), "EBPG", font=font, fill=(148, 103, 189),
               anchor="lm")
    pts = [(x_of(i), y_of(float(r))) for i, r in enumerate(road) if np.isfinite(r)]
    if len(pts) > 1:
        d.line(pts, fill=(31, 119, 180), width=2)
    for x, y in pts:
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(31, 119, 180))
    if finite.size:
        b = int(np.nanargmax(road))
        x, y = x_of(b), y_of(float(road[b]))
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=(245, 197, 24), outline=(0, 0, 0))
    d.text((4, 6), title, font=_pil_font(11), fill=_INK)
    return np.asarray(im)


# ===================================================================== helpers

def _floats(a: np.ndarray) -> list[float | None]:
    return [None if not math.isfinite(float(v)) else float(v) for v in np.asarray(a).reshape(-1)]


def _parse(s: str) -> float | None:
    if s in ("", "nan", "NaN"):
        return None
    return float(s)


def _csv_rows(epoch: int, probe: str, rec: dict) -> list[list[Any]]:
    names = rec["names"]
    road = rec["road"][probe] if rec.get("road") else [None] * len(names)
    ebpg = (rec["ebpg"][probe] if rec.get("ebpg") and probe in rec["ebpg"]
            else [None] * len(names))
    finite = [v for v in road if v is not None]
    mean = f"{sum(finite) / len(finite):.6g}" if finite else ""
    mx = f"{max(finite):.6g}" if finite else ""
    t = rec["targets"].get(probe)
    return [[epoch, rec["global_step"], probe, "" if t is None else t, rec["method"], i, n,
             "" if r is None else f"{r:.6g}", mean, mx, "" if e is None else f"{e:.6g}"]
            for i, (n, r, e) in enumerate(zip(names, road, ebpg))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tb_logger(trainer: Any) -> Any:
    try:
        from lightning.pytorch.loggers import TensorBoardLogger
    except ImportError:  # pragma: no cover
        from pytorch_lightning.loggers import TensorBoardLogger  # type: ignore[no-redef]
    for lg in getattr(trainer, "loggers", []) or []:
        if isinstance(lg, TensorBoardLogger):
            return lg
    return None


def _tensorboard(trainer: Any) -> Any:
    """The SummaryWriter of the first TensorBoardLogger, or None."""
    lg = _tb_logger(trainer)
    return None if lg is None else lg.experiment


def _encode(tb: Any, gif_tag: str | None, mp4: Path | None, frames: list[np.ndarray],
            fps: float, step: int) -> None:
    if gif_tag is not None:
        _add_gif(tb, gif_tag, frames, fps, step)
    if mp4 is not None:
        _write_mp4(mp4, frames, fps)


def _add_gif(writer: Any, tag: str, frames: list[np.ndarray], fps: float, step: int) -> None:
    """An animated GIF as a TensorBoard image summary (no moviepy)."""
    from .video import encode_gif

    data = encode_gif(frames, fps)
    if type(writer).__module__.startswith("tensorboardX"):  # pragma: no cover
        from tensorboardX.proto.summary_pb2 import Summary
    else:
        from tensorboard.compat.proto.summary_pb2 import Summary
    h, w = frames[0].shape[:2]
    summary = Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
        height=int(h), width=int(w), colorspace=3, encoded_image_string=data))])
    writer._get_file_writer().add_summary(summary, step)


def _write_mp4(path: Path, frames: list[np.ndarray], fps: float) -> None:
    from .video import write_frames

    path.parent.mkdir(parents=True, exist_ok=True)
    write_frames(path, frames, fps=fps)  # temporary name, renamed when complete


def _save_png(path: Path, rgb: np.ndarray) -> None:
    from .study import _save_png as save

    save(path, rgb)
