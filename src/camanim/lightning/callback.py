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
    * ``videos/<probe>_epoch{E:03d}_<norm>.mp4`` (``VideoOptions.save``, full
      size, one per normalization);
    * ``heatmaps/<probe>.png``: the latest heatmap (``<probe>_convergence.png``:
      the map-change heatmap);
    * ``sanity_{start,end}.json`` / ``.png`` (``sanity=``);
    * ``maps/epoch{E:03d}.npz`` (``MediaOptions.save_maps``, `camanim.LayerMaps`);
    * ``viewer/`` (``MediaOptions.viewer``): every layer's map at every epoch, small,
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
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from ..core.guard import untouched
from ..core.layers import Selector
from ..core.maps import LayerMaps
from ..errors import CAManimError
from ..metrics.convergence import DEFAULT_SETTLE_THRESHOLD
from ..metrics.pointing import energy_pointing_game
from ..metrics.road import FoldCache
from ..runs.history import EpochRecord, History
from .convergence import Convergence, media_fields, run_sanity
from .distributed import Share, gather_objects, merge_shares, score_share
from .epoch import build_engine, epoch_record, finite_probes, pick, state_key_parts
from .loggers import LoggerMedia
from .media import (
    EpochMedia,
    MediaQueue,
    mark_restart,
    output_dir,
    tensorboard_writer,
    write_epoch_media,
)
from .options import (
    ConvergenceOptions,
    MediaOptions,
    RoadOptions,
    VideoOptions,
    deprecated_spellings,
)
from .probes import probe_batch
from .summary import log_epoch
from .validation import check_model_outputs, check_setup, resolve_module, validate_init

if TYPE_CHECKING:
    from ..engine import CAManim

#: what ``probes=`` takes: a (B, C, H, W) tensor, (C, H, W) tensors or (dataset, indices)
ProbeSpec = Any
#: what ``targets=`` takes: None, "predicted", "labels", an int, B ints or B callables
TargetSpec = Any

__all__ = ["CAManimCallback"]

_STATE_FORMAT = "camanim.CAManimCallback/1"


class CAManimCallback(Callback):
    r"""Log CAManim videos and epoch-wise ybROAD of fixed probe images.

    ``Trainer(callbacks=[CAManimCallback((val_set, [0, 7]))], logger=TensorBoardLogger("runs"))``.

    The work runs at ``on_train_epoch_end`` (in Lightning 2.x after that
    epoch's validation), never during the sanity check or outside ``fit``,
    in float32 outside autocast, with gradients enabled. The pictures are
    drawn and written on background threads while training goes on (at most
    ``MediaOptions.queue`` epochs in flight). Under DDP every rank scores its share
    of the layers; rank zero gathers the scores and writes.

    Arguments after ``probes`` are keyword-only; related knobs come as one
    option object each, checked here (`camanim.lightning.validation`).

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
        model: the module to explain: ``None`` (the LightningModule), an
            attribute path (``"backbone.model"``) or a callable.
        cam_options: further options of `camanim.CAManim`: ``max_layers``
            (keep at most this many evenly spaced layers),
            ``reshape_transform`` and the method's own (e.g. ``steps``).
        every_n_epochs: run after every N-th epoch (epochs ``N-1, 2N-1, ...``).
        epochs: instead, exactly these epochs (0-based ints).
        on_fit_end: run once more at the end of training (``on_train_end``,
            on the training device) unless the last epoch was already done.
        sanity: ``"start"``, ``"end"`` or ``"start,end"``: `camanim.sanity_check`
            of the probes at fit start / end (rank zero; default off).
        video: the videos (`VideoOptions`: normalizations, fps, sizes, the
            probes' ``mean`` / ``std``, class names).
        road: ``True``, a `RoadOptions`, or ``False`` (no ybROAD).
        convergence: ``True``, a `ConvergenceOptions` or ``False``.
        media: the background drawing (`MediaOptions`).
        save_dir: folder for the CSV, videos, heatmaps and maps. Default: the
            TensorBoard logger's ``log_dir``, else
            ``<trainer.default_root_dir>/camanim``.
        probe_names: B names for tags and files (made file-safe).
        masks: object masks for the pointing game (EBPG): ``(B, H, W)`` or
            a list of ``(H, W)`` masks / ``None``.
        batch_size: images per extra forward (Score-CAM, Ablation-CAM, ROAD).
        seed: seed of the private generators (random CAM methods, ROAD noise).
        progress: show progress bars of the CAM/ROAD work.
        on_error: after the setup checks, a failure of the monitoring work
            (a full disk, a codec, an overflow) ``"warn"``\ s once per epoch
            naming the epoch and the cause, and training goes on (default);
            ``"raise"`` stops training.

    Deprecated:
        Positional arguments and the flat keywords of 0.1.0 (``fps=``, ...)
        warn for one release (`camanim.lightning.options.LEGACY_NAMES`).

    Example:
        >>> cb = CAManimCallback(images, layers="blocks", every_n_epochs=2,
        ...                      video=VideoOptions(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ...                      road=RoadOptions(percentiles=(10, 50, 90)))  # doctest: +SKIP

    Raises:
        CAManimError: at construction, for probes, targets, masks or options
            that cannot work; at the start of ``fit``, for targets outside
            the model's classes, selections that match nothing, and output
            folders that cannot be written.
    """

    @deprecated_spellings
    def __init__(self, probes: ProbeSpec, *, targets: TargetSpec = None,
                 method: str | type = "gradcam", layers: Selector = "conv",
                 model: str | Callable[[nn.Module], nn.Module] | None = None,
                 cam_options: dict[str, Any] | None = None,
                 every_n_epochs: int = 1, epochs: Sequence[int] | None = None,
                 on_fit_end: bool = True, sanity: str | Sequence[str] | None = None,
                 video: VideoOptions | None = None, road: bool | RoadOptions = True,
                 convergence: bool | ConvergenceOptions = True,
                 media: MediaOptions | None = None, save_dir: str | Path | None = None,
                 probe_names: Sequence[str] | None = None, masks: Any = None,
                 batch_size: int | None = None, seed: int = 0, progress: bool = False,
                 on_error: str = "warn") -> None:
        super().__init__()
        s = validate_init(probes, targets=targets, method=method, layers=layers, model=model,
                          cam_options=cam_options, every_n_epochs=every_n_epochs, epochs=epochs,
                          on_fit_end=on_fit_end, sanity=sanity, video=video, road=road,
                          convergence=convergence, media=media, save_dir=save_dir,
                          probe_names=probe_names, masks=masks, batch_size=batch_size,
                          seed=seed, progress=progress, on_error=on_error)
        self._probes = s.probes
        self._targets_mode, self._targets = s.targets_mode, s.targets
        self.method, self.layers, self.model = s.method, s.layers, s.model
        self.cam_options = s.cam_options
        self.every_n_epochs, self.epochs = s.every_n_epochs, s.epochs
        self.run_on_fit_end = s.on_fit_end
        self.sanity = s.sanity
        self.video, self.road, self.media = s.video, s.road, s.media
        self.save_dir = s.save_dir
        self.batch_size, self.seed, self.progress = s.batch_size, s.seed, s.progress
        self.on_error = s.on_error
        #: the score ROAD uses, resolved at fit start from ``road.score``
        self._road_score = s.road.score if s.road is not None else "auto"
        conv = s.convergence
        self._convergence = Convergence(
            changes=conv is not None, chance=s.road is not None and s.road.chance,
            threshold=conv.settle_threshold if conv is not None else DEFAULT_SETTLE_THRESHOLD)
        self._history = History(self._probes.names)
        self._anim: CAManim | None = None
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
    def convergence(self) -> ConvergenceOptions | None:
        """The map-change options (None: off)."""
        c = self._convergence
        return ConvergenceOptions(c.threshold) if c.changes else None

    @property
    @override
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

    def _fitting(self, trainer: Trainer) -> bool:
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        return (not trainer.sanity_checking) and str(getattr(fn, "value", fn)) == "fit"

    # ------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_setup(trainer)
        self._last_epoch = None
        self._dir = None
        self._history.forget_csv()

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
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
        score = self.road.score if self.road is not None else "auto"
        self._road_score = check_model_outputs(logits, self._targets_mode, self._targets,
                                               score, self.road is not None)
        if trainer.is_global_zero:  # a folder that cannot be written fails now
            self._out_dir(trainer)
        self._sanity(trainer, pl_module, "start")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        tb = tensorboard_writer(trainer)  # the checkpoint is restored by now: on a resume,
        if trainer.is_global_zero and tb is not None and int(trainer.global_step) > 0:
            mark_restart(tb, int(trainer.global_step) + 1)  # TensorBoard drops later steps

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._fitting(trainer):
            return
        epoch = int(trainer.current_epoch)
        self._last_epoch = epoch
        self._report_media_errors()
        if self._scheduled(epoch):
            self._run_synced(trainer, pl_module, epoch)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # before the strategy's teardown moves the module off its device
        epoch = self._last_epoch
        if self.run_on_fit_end and not trainer.sanity_checking and epoch is not None \
                and not self._scheduled(epoch):
            # decided from the schedule alone: every DDP rank takes this branch
            self._run_synced(trainer, pl_module, epoch)
        self._sanity(trainer, pl_module, "end")
        if trainer.is_global_zero and self._dir is not None and len(self._history):
            try:  # a CSV append that failed at the last epoch gets its retry now
                method = self._history[self._history.epochs[-1]].method
                self._history.write_csv(self._dir, None, method)
            except CAManimError as e:
                self._fail(self._history.epochs[-1], e)
        self._loggers.finish(trainer, self._queue, self._dir, self._history.epochs)  # report
        self._report_media_errors(drain=True)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        # write what is done; the training error comes first, media errors are warned
        if self._queue is not None:
            self._queue.close()
            for epoch, error in self._queue.errors():
                rank_zero_warn(f"CAManimCallback: epoch {epoch}'s pictures failed "
                               f"({type(error).__name__}: {error})")
            self._queue = None

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._queue is not None:
            self._queue.close()
            self._queue = None
        if stage == "fit":  # keep no reference to the model after fit
            self._anim = self._anim_model = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"format": _STATE_FORMAT, "history": self._history.state_dict(),
                "convergence": self._convergence.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("format") != _STATE_FORMAT:
            rank_zero_warn("CAManimCallback: unknown checkpoint state format; starting a "
                           "fresh history")
            return
        self._history.load_state_dict(state_dict.get("history", []))
        self._convergence.load_state_dict(state_dict.get("convergence"))

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

    def _engine(self, model: nn.Module) -> CAManim:
        if self._anim is None or self._anim_model is not model:
            self._anim = build_engine(
                model, self.method, self.layers, cam_options=self.cam_options, seed=self.seed,
                progress=self.progress, batch_size=self.batch_size,
                mean=self.video.mean, std=self.video.std)
            self._anim_model = model
        return self._anim

    @contextlib.contextmanager
    def _context(self, model: nn.Module, dev: torch.device) -> Iterator[None]:
        with untouched(model), torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device_type=dev.type, enabled=False):
            yield

    def _run_synced(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        """Every rank computes the maps and scores its share of the layers;
        rank zero gathers the scores and writes. An error on any rank is
        raised (or warned) on all of them."""
        self._t0 = t0 = time.perf_counter()
        timing: dict[str, float] = {}
        self.last_timing = timing
        error: BaseException | None = None
        result: _Computed | None = None
        rank, world = int(trainer.global_rank), int(trainer.world_size)
        try:
            result = self._compute(pl_module, rank, world, timing)
        except Exception as e:  # noqa: BLE001 - any failure is raised or warned below
            error = e
        shares: list[Share | None] = [None if result is None else result.share]
        if world > 1:
            gathered = gather_objects((None if error is None else
                                       f"{type(error).__name__}: {error}", shares[0]))
            failed = [(r, msg) for r, (msg, _) in enumerate(gathered) if msg is not None]
            if failed and error is None:
                error = CAManimError(f"rank {failed[0][0]} failed: {failed[0][1]}")
            shares = [s for _, s in gathered]
        if error is None and result is not None and trainer.is_global_zero:
            try:
                self._write(trainer, epoch, result, merge_shares(shares), timing)
            except Exception as e:  # noqa: BLE001 - raised or warned by _fail
                error = e
        timing["blocking"] = time.perf_counter() - t0
        if error is not None:
            self._fail(epoch, error)

    def _fail(self, epoch: int, error: BaseException) -> None:
        if self.on_error == "raise":
            raise error
        rank_zero_warn(f"CAManimCallback: epoch {epoch}: {type(error).__name__}: {error}; "
                       "training goes on")

    def _compute(self, pl_module: LightningModule, rank: int, world: int,
                 timing: dict[str, float]) -> _Computed:
        """Maps (all ranks), ybROAD of this rank's layers, EBPG."""
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
            share, chance = None, None
            if self.road is not None:
                # one fold of the model serves the layers' and the chance ROAD
                kw = dict(percentiles=self.road.percentiles, noise=self.road.noise,
                          seed=self.seed, progress=self.progress, batch_size=self.batch_size,
                          score=self._road_score, fold=FoldCache())
                # the user's own score callables are kept; class indices otherwise
                road_targets = (targets if self._targets_mode == "callables"
                                or maps.targets is None else maps.targets)
                t = time.perf_counter()
                share = score_share(model, x, maps, road_targets, kw, rank, world)
                timing["road"] = time.perf_counter() - t
                if rank == 0:
                    chance = self._convergence.measure_chance(model, x, road_targets, kw, timing,
                                                              logits=maps.logits)
            ebpg = None
            if self._probes.masks is not None and rank == 0:
                t = time.perf_counter()
                ebpg = energy_pointing_game(maps, pick(self._probes.masks, keep))
                timing["ebpg"] = time.perf_counter() - t
            ranks = self._convergence.measure_maps(maps, timing) if rank == 0 else None
            # on an accelerator the maps stay there: the frames are upsampled,
            # normalized, colour-mapped and blended on it, and only uint8 crosses
        return _Computed(maps, share, ebpg, ranks, chance)

    def _write(self, trainer: Trainer, epoch: int, done: _Computed, road: np.ndarray | None,
               timing: dict[str, float]) -> None:
        """Rank zero: history, CSV and scalars now; pictures in the background."""
        maps, ebpg = done.maps, done.ebpg
        out_dir = self._out_dir(trainer)
        names = pick(self._probes.names, self._keep)  # the probes with finite logits
        masked = [n for n, m in zip(self._probes.names, self._probes.has_mask, strict=True) if m]
        record = epoch_record(int(trainer.global_step), maps, road, ebpg, self._probes.names,
                              self._keep, masked)
        self._history.recover(out_dir, record.method)  # epochs the CSV holds, for the tau
        self._convergence.fill(record, epoch, maps, names, self._history, ranks=done.ranks,
                               chance=done.chance)
        record.seconds = time.perf_counter() - self._t0
        self._history[epoch] = record
        t = time.perf_counter()
        csv_error = None
        try:
            self._history.write_csv(out_dir, epoch, record.method)
        except CAManimError as e:  # the other outputs go on; reported at the end
            csv_error = e
        timing["csv"] = time.perf_counter() - t
        tb = tensorboard_writer(trainer)
        t = time.perf_counter()
        log_epoch(trainer, tb, epoch, record, names, self.video.class_names,
                  self._convergence.threshold)
        timing["log"] = time.perf_counter() - t
        media = self._epoch_media(trainer, epoch, maps, road, ebpg, record, names, masked,
                                  out_dir, timing)
        if self._queue is None:
            self._queue = MediaQueue(self.media.workers or 2, self.media.queue)
        queue = self._queue
        t = time.perf_counter()
        queue.submit(epoch, lambda: write_epoch_media(media, queue.pool()))
        timing["queue_wait"] = time.perf_counter() - t
        if csv_error is not None:
            raise csv_error

    def _epoch_media(self, trainer: Trainer, epoch: int, maps: LayerMaps,
                     road: np.ndarray | None, ebpg: np.ndarray | None, record: EpochRecord,
                     names: list[str], masked: list[str], out_dir: Path,
                     timing: dict[str, float]) -> EpochMedia:
        """What the background pictures of this epoch need, on the CPU."""
        v = self.video
        return EpochMedia(
            epoch=epoch, step=int(trainer.global_step), maps=maps,
            images=pick(self._probes.images, self._keep),
            probes=list(names), out_dir=out_dir, method=record.method, road=road,
            ebpg={n: ebpg[:, b] for b, n in enumerate(names) if n in masked} if ebpg is not None
            else {},
            history={n: self.road_history(n) for n in names} if road is not None else {},
            writer=tensorboard_writer(trainer), normalization=v.norms, log_videos=v.log,
            save_videos=v.save, save_maps=self.media.save_maps, fps=float(v.fps),
            render=dict(mean=v.mean, std=v.std, size=v.size, class_names=v.class_names),
            tb_size=v.gif_size, tb_colors=v.tb_colors, timing=timing,
            viewer=self.media.viewer, sinks=self._loggers.sinks(trainer),
            **media_fields(self._history, names, record, self._convergence.changes))

    def _report_media_errors(self, drain: bool = False) -> None:
        if self._queue is not None:
            if drain:
                self._queue.drain()
            for epoch, error in self._queue.errors():
                self._fail(epoch, error)

    def _out_dir(self, trainer: Trainer) -> Path:
        self._dir = self._dir or output_dir(self.save_dir, trainer)
        return self._dir

    def _sanity(self, trainer: Trainer, pl_module: LightningModule, when: str) -> None:
        """The model-randomization check at fit ``when`` (rank zero, ``sanity=``)."""
        if when in self.sanity and trainer.is_global_zero and \
                (when == "start" or self._last_epoch is not None):
            model, x, dev = self._inputs(pl_module)
            targets = None if self._targets_mode == "predicted" else self._targets
            with self._context(model, dev):
                run_sanity(when, model, x, targets, method=self.method, layers=self.layers,
                           seed=self.seed, batch_size=self.batch_size,
                           cam_options=self.cam_options, raise_errors=self.on_error == "raise",
                           out_dir=self._out_dir(trainer), writer=tensorboard_writer(trainer),
                           step=int(trainer.global_step))


class _Computed(NamedTuple):
    """One rank's share of an epoch's work, handed from `_compute` to `_write`."""

    maps: LayerMaps                 # every layer's maps of the kept probes
    share: Share | None             # this rank's (layer indices, (l, K) ybROAD) or None
    ebpg: np.ndarray | None         # (L, K) pointing game (rank zero, with masks)
    ranks: torch.Tensor | None      # (L, K, H * W) pixel ranks of the maps (rank zero)
    chance: np.ndarray | None       # (2, K) ROAD of the random map and the blob (rank zero)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
