"""`CAManimCallback`: CAManim videos and epoch-wise ybROAD while a model trains.

At the end of every monitored training epoch (after that epoch's
validation) the callback computes, for a few fixed *probe* images, the class
activation map of every chosen layer (one pass, `camanim.CAManim`), scores
every layer's map with ROAD (`camanim.metrics.road.ybroad`), and logs:

TensorBoard (when a ``TensorBoardLogger`` is among ``trainer.loggers``)
    * ``camanim/<probe>/local_global``: an animated GIF, one frame per layer,
      local and global normalization side by side (``camanim/<probe>/<norm>``
      for other normalizations; Images tab; start TensorBoard with
      ``--samples_per_plugin images=100`` or it shows only 10 epochs per tag);
    * ``ybroad/<probe>/heatmap``: ROAD of every layer at every epoch so far
      (layers top to bottom in forward order, epochs left to right, each
      epoch's best layer circled) and ``ybroad/<probe>/curve``: this epoch's
      ybROAD curve (with EBPG when the probe has a mask);
    * scalars ``ybroad/<probe>/mean``, ``max``, ``best_layer`` (index),
      ``final_layer`` (the last layer's score); with masks
      ``ebpg/<probe>/best_road_layer`` and ``ebpg/<probe>/max``; and
      ``camanim/seconds`` (time this epoch's work took);
    * ``camanim/<probe>/summary`` text naming the best layer;
    * convergence (`camanim.lightning.convergence`): ``convergence/<probe>/
      heatmap`` (each layer's map change against the previous callback
      epoch, ``1 - Spearman``), scalars ``convergence/<probe>/share_settled``,
      ``ybroad/<probe>/above_chance`` (share of layers whose ybROAD beats a
      seeded random map's ROAD, the dashed line on the curve; layers that do
      not are hatched on the heatmap), ``ybroad/<probe>/chance_random``,
      ``chance_blob``, ``rank_tau`` (Kendall tau of the layer ranking against
      the previous callback epoch) and ``ybroad/rank_tau_mean``.

Other loggers (CSV, W&B, MLflow, ...)
    get the scalars through ``logger.log_metrics``; ``WandbLogger`` and
    ``MLFlowLogger`` also the videos, heatmaps, curves and the report
    (`camanim.lightning.loggers`); any other one a notice.

Files, in ``save_dir`` (default: the TensorBoard logger's ``log_dir``, else
``<trainer.default_root_dir>/camanim``), whatever the loggers:
    * ``ybroad.csv``: tidy long form, one row per (epoch, probe, layer), see
      `camanim.runs.study.CSV_COLUMNS`; appended and flushed every epoch, so a
      crash never loses a finished epoch; read it with ``camanim study``;
    * ``videos/<probe>_epoch{E:03d}_<norm>.mp4`` (``save_videos=True``, full
      size, one per normalization);
    * ``heatmaps/<probe>.png``: the latest heatmap (``<probe>_convergence.png``:
      the map-change heatmap);
    * ``sanity_{start,end}.json`` / ``.png`` (``sanity=``);
    * ``maps/epoch{E:03d}.npz`` (``save_maps=True``, `camanim.LayerMaps`);
    * ``viewer/`` (``viewer=True``): every layer's map at every epoch, small,
      for TensorBoard's CAManim tab and ``camanim report`` (docs/VIEWER.md).

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
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

try:  # Lightning 2.x ("lightning" package); the standalone package also works
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]

from ..core.guard import untouched
from ..core.maps import LayerMaps
from ..errors import CAManimError
from ..metrics.pointing import energy_pointing_game
from ..runs.history import History
from .convergence import Convergence, check_sanity, media_fields, run_sanity
from .loggers import LoggerMedia
from .distributed import check_strategy, gather_objects, merge_shares, score_share
from .checks import check_outputs, check_score, epoch_record, finite_probes, pick
from .media import (EpochMedia, MediaQueue, mark_restart, output_dir,
                    tensorboard_writer, write_epoch_media)
from .options import (build_engine, check_count, check_road, check_schedule, check_targets,
                      check_videos, resolve_module, state_key_parts)
from .probes import load_probes, probe_batch
from .summary import log_epoch

__all__ = ["CAManimCallback"]

_STATE_FORMAT = "camanim.CAManimCallback/1"


class CAManimCallback(Callback):
    r"""Log CAManim videos and epoch-wise ybROAD of fixed probe images.

    ``Trainer(callbacks=[CAManimCallback((val_set, [0, 7]))], logger=TensorBoardLogger("runs"))``.

    The work runs at ``on_train_epoch_end`` (in Lightning 2.x after that
    epoch's validation), never during the sanity check or outside ``fit``,
    in float32 outside autocast, with gradients enabled. The pictures are
    drawn and written on background threads while training goes on (at most
    ``media_queue`` epochs in flight). Under DDP every rank scores its share
    of the layers; rank zero gathers the scores and writes.

    Args:
        probes: the images to follow, fixed for the whole run: a
            ``(B, C, H, W)`` tensor, a list of ``(C, H, W)`` tensors, or
            ``(dataset, [i, ...])`` with items ``image``, ``(image, label)``,
            ``(image, label, mask)`` or a dict with those keys; normalized as
            the model expects.
        targets: ``None`` (dataset labels if every probe has one, else the
            predicted class), ``"predicted"``, ``"labels"``, an int, B ints
            or B pytorch-grad-cam target callables.
        method: CAM method name or ``BaseCAM`` subclass (see `camanim.CAManim`).
        layers: ``"conv"``, ``"all"``, ``"blocks"``, a list of layer names or a
            callable ``(name, module) -> bool``.
        every_n_epochs: run after every N-th epoch (epochs ``N-1, 2N-1, ...``).
        epochs: instead, exactly these epochs (0-based ints).
        normalization: one video per name: ``"local"``, ``"global"``,
            ``"none"`` or ``"both"`` (side by side).
        road: compute ybROAD (ROAD of every layer's map).
        road_percentiles: ROAD percentiles ``p`` in (0, 100), with
            pytorch-grad-cam's convention: MoRF keeps the pixels whose map
            value is below the ``p``-th percentile (removes the top
            ``100 - p`` %), LeRF keeps those above the ``(100 - p)``-th.
        road_noise: ROAD imputation noise.
        score: what ROAD scores: ``"softmax"`` (the target's probability),
            ``"logit"``, or ``"auto"`` (default: softmax, the logit for a
            single-output head, with a notice).
        fps: frames (layers) per second of the videos.
        log_videos: log the animated GIFs to TensorBoard.
        save_videos: write the full-size MP4 files under ``save_dir/videos``.
        save_dir: folder for the CSV, videos, heatmaps and maps. Default: the
            TensorBoard logger's ``log_dir``, else
            ``<trainer.default_root_dir>/camanim``.
        probe_names: B names for tags and files (made file-safe).
        max_layers: keep at most this many evenly spaced layers.
        batch_size: images per extra forward (Score-CAM, Ablation-CAM, ROAD).
        seed: seed of the private generators (random CAM methods, ROAD noise).
        on_fit_end: run once more at the end of training (``on_train_end``,
            on the training device) unless the last epoch was already done.
        masks: object masks for the pointing game (EBPG): ``(B, H, W)`` or
            a list of ``(H, W)`` masks / ``None``.
        mean, std: the probes' input normalization, undone in the frames.
        save_maps: also save the raw maps (``maps/epoch{E:03d}.npz``).
        model: the module to explain: ``None`` (the LightningModule), an
            attribute path (``"backbone.model"``) or a callable.
        class_names: class names for the captions and text summaries.
        video_size: MP4 panel size (``None``: automatic, an int: long side).
        tb_video_size: long side of a TensorBoard GIF panel (default 128 px;
            ``None``: as ``video_size``); tb_colors: colours of its shared
            palette (default 64). GIFs are the bulk of the event files, which
            TensorBoard loads whole: at the full setting (4 probes x 53
            layers) the defaults keep an epoch under 6 MiB.
        on_error: after the setup checks, a failure of the monitoring work
            (a full disk, a codec, an overflow) ``"warn"``\ s once per epoch
            naming the epoch and the cause, and training goes on (default);
            ``"raise"`` stops training.
        progress: show progress bars of the CAM/ROAD work.
        cam_options: further options for `camanim.CAManim` (e.g. ``steps``).
        media_workers: threads that render and encode one epoch's pictures.
        media_queue: epochs whose pictures may still be in the works while
            training goes on (default 1; the training thread waits when the
            queue is full); ``0`` draws everything before training resumes.
        convergence, chance, settle_threshold: each layer's map change since
            the previous callback epoch; ROAD of a seeded random map and a
            centred blob (needs ROAD); the change below which a layer counts
            as settled (0.1). See `camanim.lightning.convergence`.
        sanity: ``"start"``, ``"end"`` or ``"start,end"``: `camanim.sanity_check`
            of the probes at fit start / end (rank zero; default off).
        viewer: write ``viewer/`` for TensorBoard's CAManim tab and ``camanim report``.

    Raises:
        CAManimError: at construction, for probes, targets, masks or options
            that cannot work; at the start of ``fit``, for targets outside
            the model's classes, selections that match nothing, and output
            folders that cannot be written.
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
                 road_noise: float = 0.01, *, save_videos: bool = True, viewer: bool = True,
                 model: str | Callable[[nn.Module], nn.Module] | None = None,
                 class_names: Sequence[str] | None = None,
                 video_size: int | Sequence[int] | None = None,
                 tb_video_size: int | None = 128, tb_colors: int = 64, on_error: str = "warn",
                 progress: bool = False, cam_options: dict | None = None,
                 media_workers: int | None = None, media_queue: int = 1,
                 score: str = "auto", convergence: bool = True, chance: bool = True,
                 settle_threshold: float = 0.1, sanity: str | Sequence[str] | None = None) -> None:
        super().__init__()
        self._probes = load_probes(probes, masks, probe_names)
        channels = self._probes.images.shape[1]
        self.every_n_epochs, self.epochs = check_schedule(every_n_epochs, epochs)
        self._targets_mode, self._targets = check_targets(targets, self._probes)
        self.log_videos, self.save_videos = bool(log_videos), bool(save_videos)
        self.normalization, self.fps = check_videos(
            normalization, fps, self.log_videos or self.save_videos, mean, std, channels)
        self.video_size, self.tb_video_size = video_size, check_count("tb_video_size", tb_video_size, 16)
        self.tb_colors = check_count("tb_colors", tb_colors, 2, allow_none=False)
        if self.tb_colors > 256:
            raise CAManimError(f"tb_colors must be within 2..256 (a GIF palette), got {tb_colors}")
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]
        self.class_names = list(class_names) if class_names is not None else None
        self.road = bool(road)
        self.road_percentiles, self.road_noise = check_road(self.road, road_percentiles, road_noise)
        self.score = self._score = check_score(score)

        from ..methods import get_method  # a typo should not wait an epoch

        get_method(method)
        self.method, self.layers = method, layers
        self.max_layers = check_count("max_layers", max_layers)
        self.batch_size = check_count("batch_size", batch_size)
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
        self.save_maps, self.viewer = bool(save_maps), bool(viewer)
        self.save_dir = Path(save_dir) if save_dir is not None else None
        workers = check_count("media_workers", media_workers)
        self.media_workers = workers or max(2, min(8, os.cpu_count() or 2))
        self.media_queue = check_count("media_queue", media_queue, 0, allow_none=False)

        self._conv = Convergence(convergence, chance and self.road, settle_threshold)
        self.sanity = check_sanity(sanity)

        self._history = History(self._probes.names)
        self._anim: Any = None
        self._anim_model: nn.Module | None = None
        self._dir: Path | None = None
        self._last_epoch: int | None = None
        self._queue: MediaQueue | None = None
        self._loggers = LoggerMedia()  # W&B, MLflow: the pictures (camanim.lightning.loggers)
        self._keep = np.ones(len(self._probes.names), dtype=bool)  # probes with finite logits
        #: seconds per phase of the last epoch's work on this rank: cam, road,
        #: ebpg, csv, log, blocking (the training loop waited: all of
        #: the above plus any wait for the media queue) and, once the
        #: epoch's pictures are done, media (background)
        self.last_timing: dict[str, float] = {}
        self._t0 = 0.0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**state_key_parts(self.method, self.layers,
                                                          self._probes.names))

    @property
    def probe_names(self) -> list[str]:
        """The (file-safe) probe names used in tags and files."""
        return list(self._probes.names)

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
        check_strategy(trainer)
        self._last_epoch = None
        self._dir = None
        self._history.forget_csv()
        self._conv.new_fit()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Check the model, targets, layers and output folder before training."""
        model, x, dev = self._inputs(pl_module)
        try:
            with self._context(model, dev):
                table = self._engine(model).layer_table(x)
                if not table.selected:
                    raise CAManimError(f"layers={self.layers!r} selects no layer of this model")
                from ..core.capture import forward_logits
                from ..core.guard import eval_mode

                with eval_mode(model), torch.no_grad():
                    logits = forward_logits(model, x[:1])
        except CAManimError as e:
            raise CAManimError(f"CAManimCallback: {e}") from None
        self._score = check_outputs(logits, self._targets_mode, self._targets, self.score,
                                    self.road)
        if trainer.is_global_zero:  # a folder that cannot be written fails now
            self._out_dir(trainer)
        self._sanity(trainer, pl_module, "start")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        tb = tensorboard_writer(trainer)  # the checkpoint is restored by now: on a resume,
        if trainer.is_global_zero and tb is not None and int(trainer.global_step) > 0:
            mark_restart(tb, int(trainer.global_step) + 1)  # TensorBoard drops later steps

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._fitting(trainer):
            return
        epoch = int(trainer.current_epoch)
        self._last_epoch = epoch
        self._report_media_errors()
        if self._scheduled(epoch):
            self._run_synced(trainer, pl_module, epoch)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # before the strategy's teardown moves the module off its device
        epoch = self._last_epoch
        if self.run_on_fit_end and not trainer.sanity_checking and epoch is not None \
                and not self._scheduled(epoch):
            # decided from the schedule alone: every DDP rank takes this branch
            self._run_synced(trainer, pl_module, epoch)
        self._sanity(trainer, pl_module, "end")
        if trainer.is_global_zero and self._dir is not None and len(self._history):
            try:  # a CSV append that failed at the last epoch gets its retry now
                self._history.write_csv(self._dir, None, str(self._anim.method.name))
            except CAManimError as e:
                self._fail(self._history.epochs[-1], e)
        self._loggers.finish(trainer, self._queue, self._dir, self._history.epochs)  # report
        self._report_media_errors(drain=True)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # write what is done; the training error comes first, media errors are warned
        if self._queue is not None:
            self._queue.close()
            for epoch, error in self._queue.errors():
                warnings.warn(f"CAManimCallback: epoch {epoch}'s pictures failed "
                              f"({type(error).__name__}: {error})", stacklevel=2)
            self._queue = None

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._queue is not None:
            self._queue.close()
            self._queue = None
        if stage == "fit":  # keep no reference to the model after fit
            self._anim = self._anim_model = None

    def state_dict(self) -> dict[str, Any]:
        return {"format": _STATE_FORMAT, "history": self._history.state_dict(),
                "convergence": self._conv.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("format") != _STATE_FORMAT:
            warnings.warn("CAManimCallback: unknown checkpoint state format; starting a "
                          "fresh history", stacklevel=2)
            return
        self._history.load_state_dict(state_dict.get("history", []))
        self._conv.load_state_dict(state_dict.get("convergence"))

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn: no threads, no engine
        return {**self.__dict__, "_queue": None, "_anim": None, "_anim_model": None}

    @property
    def epochs_done(self) -> list[int]:
        """Epochs with results so far (this run and restored ones), sorted."""
        return self._history.epochs

    def road_history(self, probe: str | int) -> tuple[list[int], list[str], np.ndarray]:
        """``(epochs, layer names, (E, L) ROAD scores)`` of one probe over the
        epochs done so far with the current layer list."""
        return self._history.matrix(probe, "road")

    def ebpg_history(self, probe: str | int) -> tuple[list[int], list[str], np.ndarray]:
        """Like `road_history`, for the energy-based pointing game."""
        return self._history.matrix(probe, "ebpg")

    # ------------------------------------------------------------ the work
    def _inputs(self, pl_module: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.device]:
        model = resolve_module(self.model, pl_module)
        return (model, *probe_batch(self._probes.images, model))

    def _engine(self, model: nn.Module) -> Any:
        if self._anim is None or self._anim_model is not model:
            self._anim, self._anim_model = build_engine(self, model), model
        return self._anim

    @contextlib.contextmanager
    def _context(self, model: nn.Module, dev: torch.device) -> Iterator[None]:
        with untouched(model), torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device_type=dev.type, enabled=False):
            yield

    def _run_synced(self, trainer: Any, pl_module: Any, epoch: int) -> None:
        """Every rank computes the maps and scores its share of the layers;
        rank zero gathers the scores and writes. An error on any rank is
        raised (or warned) on all of them."""
        self._t0 = t0 = time.perf_counter()
        self.last_timing = timing = {}
        error: BaseException | None = None
        result = None
        rank, world = int(trainer.global_rank), int(trainer.world_size)
        try:
            result = self._compute(trainer, pl_module, rank, world, timing)
        except Exception as e:  # noqa: BLE001 - raised or warned below
            error = e
        if world > 1:
            share = None if result is None else result[1][0]
            gathered = gather_objects(trainer, (None if error is None else
                                                f"{type(error).__name__}: {error}", share))
            failed = [(r, msg) for r, (msg, _) in enumerate(gathered) if msg is not None]
            if failed and error is None:
                error = CAManimError(f"rank {failed[0][0]} failed: {failed[0][1]}")
            elif error is None and result is not None:
                result = (result[0], [s for _, s in gathered], result[2])
        if result is not None:
            result = (result[0], merge_shares(result[1]), result[2])
        if error is None and trainer.is_global_zero:
            try:
                self._write(trainer, epoch, *result, timing)
            except Exception as e:  # noqa: BLE001
                error = e
        timing["blocking"] = time.perf_counter() - t0
        if error is not None:
            self._fail(epoch, error)

    def _fail(self, epoch: int, error: BaseException) -> None:
        if self.on_error == "raise":
            raise error
        warnings.warn(f"CAManimCallback: epoch {epoch}: {type(error).__name__}: {error}; "
                      "training goes on", stacklevel=3)

    def _compute(self, trainer: Any, pl_module: Any, rank: int, world: int,
                 timing: dict[str, float]) -> tuple[LayerMaps, list, np.ndarray | None]:
        """Maps (all ranks), ybROAD of this rank's layers, EBPG; maps to the CPU."""
        model, x, dev = self._inputs(pl_module)
        with self._context(model, dev):
            anim = self._engine(model)
            # probes with NaN/Inf logits get no map, target or score (no argmax of NaN)
            self._keep = keep = finite_probes(model, x, self._probes.names, self._last_epoch)
            x = pick(x, keep)
            targets = pick(None if self._targets_mode == "predicted" else self._targets, keep)
            t = time.perf_counter()
            maps = anim(x, targets)
            _sync(x.device)
            timing["cam"] = time.perf_counter() - t
            share = None
            if self.road:
                kw = dict(percentiles=self.road_percentiles, noise=self.road_noise,
                          seed=self.seed, progress=self.progress, batch_size=self.batch_size,
                          score=self._score)
                # the user's own score callables are kept; class indices otherwise
                road_targets = (targets if self._targets_mode == "callables"
                                or maps.targets is None else maps.targets)
                t = time.perf_counter()
                share = score_share(model, x, maps, road_targets, kw, rank, world)
                timing["road"] = time.perf_counter() - t
                self._conv.measure_chance(model, x, road_targets, kw, timing, rank == 0,
                                          logits=maps.logits)
            ebpg = None
            if self._probes.masks is not None and rank == 0:
                t = time.perf_counter()
                ebpg = energy_pointing_game(maps, pick(self._probes.masks, keep))
                timing["ebpg"] = time.perf_counter() - t
            self._conv.measure_maps(maps, timing, rank == 0)
            # on an accelerator the maps stay there: the frames are upsampled,
            # normalized, colour-mapped and blended on it, and only uint8 crosses
        return maps, [share], ebpg

    def _write(self, trainer: Any, epoch: int, maps: LayerMaps, road: np.ndarray | None,
               ebpg: np.ndarray | None, timing: dict[str, float]) -> None:
        """Rank zero: history, CSV and scalars now; pictures in the background."""
        out_dir = self._out_dir(trainer)
        names = pick(self._probes.names, self._keep)  # the probes with finite logits
        masked = [n for n, m in zip(self._probes.names, self._probes.has_mask) if m]
        record = epoch_record(int(trainer.global_step), maps, road, ebpg, self._probes.names,
                              self._keep, masked)
        self._history.recover(out_dir, record["method"])  # epochs the CSV holds, for the tau
        self._conv.fill(record, epoch, maps, names, self._history)
        record["seconds"] = time.perf_counter() - self._t0
        self._history[epoch] = record
        t = time.perf_counter()
        csv_error = None
        try:
            self._history.write_csv(out_dir, epoch, record["method"])
        except CAManimError as e:  # the other outputs go on; reported at the end
            csv_error = e
        timing["csv"] = time.perf_counter() - t
        tb = tensorboard_writer(trainer)
        t = time.perf_counter()
        log_epoch(trainer, tb, epoch, record, names, self.class_names, self._conv.threshold)
        timing["log"] = time.perf_counter() - t
        media = EpochMedia(
            epoch=epoch, step=int(trainer.global_step), maps=maps,
            images=pick(self._probes.images, self._keep),
            probes=list(names), out_dir=out_dir, method=record["method"], road=road,
            ebpg={n: ebpg[:, b] for b, n in enumerate(names) if n in masked} if ebpg is not None
            else {},
            history={n: self.road_history(n) for n in names} if road is not None else {},
            writer=tb, normalization=self.normalization, log_videos=self.log_videos,
            save_videos=self.save_videos, save_maps=self.save_maps, fps=self.fps,
            render=dict(mean=self.mean, std=self.std, size=self.video_size,
                        class_names=self.class_names),
            tb_size=self.tb_video_size if self.tb_video_size is not None else self.video_size,
            tb_colors=self.tb_colors, timing=timing, viewer=self.viewer,
            sinks=self._loggers.sinks(trainer),
            **media_fields(self._history, names, record, self._conv.maps))
        queue = self._queue = self._queue or MediaQueue(self.media_workers, self.media_queue)
        t = time.perf_counter()
        queue.submit(epoch, lambda: write_epoch_media(media, queue.pool()))
        timing["queue_wait"] = time.perf_counter() - t
        if csv_error is not None:
            raise csv_error

    def _report_media_errors(self, drain: bool = False) -> None:
        if self._queue is not None:
            if drain:
                self._queue.drain()
            for epoch, error in self._queue.errors():
                self._fail(epoch, error)

    def _out_dir(self, trainer: Any) -> Path:
        self._dir = self._dir or output_dir(self.save_dir, trainer)
        return self._dir

    def _sanity(self, trainer: Any, pl_module: Any, when: str) -> None:
        """The model-randomization check at fit ``when`` (rank zero, ``sanity=``)."""
        if when in self.sanity and trainer.is_global_zero and \
                (when == "start" or self._last_epoch is not None):
            model, x, dev = self._inputs(pl_module)
            with self._context(model, dev):
                run_sanity(when, self, model, x, None if self._targets_mode == "predicted"
                           else self._targets, self._out_dir(trainer),
                           tensorboard_writer(trainer), int(trainer.global_step))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
