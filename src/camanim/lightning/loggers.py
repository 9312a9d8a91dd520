"""The callback's pictures for the loggers other than TensorBoard.

Lightning has no common media API for loggers, so each one is met on its own
terms. Detection is by type over ``trainer.loggers``; several loggers at once
each get theirs. Everything here runs on rank zero, on the background media
queue (`camanim.lightning.media`), with the **epoch as the step**:

``WandbLogger``
    One history row per callback epoch holding ``camanim/epoch`` and, under
    the TensorBoard tags, the MP4 files as ``wandb.Video``
    (``camanim/<probe>/<norm>``), the heatmaps and curves as ``wandb.Image``
    (``ybroad/<probe>/heatmap``, ``ybroad/<probe>/curve``,
    ``convergence/<probe>/heatmap``). Every media key is defined with
    ``camanim/epoch`` as its step metric, so a media panel's step slider
    walks the callback epochs. At the end of fit the report
    (``camanim.viewer.report``) goes out as ``wandb.Html`` (``camanim/report``).
``MLFlowLogger``
    Heatmaps and curves through ``MlflowClient.log_image(key=..., step=epoch)``
    (the UI's image grid with its step slider); the MP4s under the artifact
    folder ``camanim/epoch{E:03d}/``, and at the end of fit the report as
    ``camanim/epoch{E:03d}/report.html`` of the last epoch. A resumed fit first
    removes the images a crashed run logged at the epochs it redoes.
``TensorBoardLogger``
    handled by `camanim.lightning.media` itself.
any other logger
    the scalars only; one notice per fit names what it does not get.

A logger that fails (its service down, a full disk) costs one warning for
the epoch; the other loggers and the files go on.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from ..errors import CAManimError

__all__ = ["EpochArtifacts", "MediaSink", "WandbSink", "MLflowSink", "LoggerMedia",
           "logger_sinks", "send_epoch", "send_report", "epoch_folder"]

#: what a logger without a sink misses
_MISSED = "the CAManim videos, ybROAD heatmaps and curves"
_WandbFormat = Literal["gif", "mp4", "webm", "ogg"]  # wandb.Video(format=...)


@dataclass
class EpochArtifacts:
    """One callback epoch's pictures, as the loggers receive them."""

    epoch: int
    #: ``"<probe>/<norm>"`` -> the MP4 file written for it
    videos: dict[str, Path] = field(default_factory=dict)
    #: TensorBoard-style tag (``ybroad/<probe>/heatmap``, ``ybroad/<probe>/curve``,
    #: ``convergence/<probe>/heatmap``) -> ``(H, W, 3)`` uint8 picture
    pictures: dict[str, np.ndarray] = field(default_factory=dict)


def epoch_folder(epoch: int) -> str:
    """The MLflow artifact folder of one callback epoch."""
    return f"camanim/epoch{epoch:03d}"


def video_key(name: str) -> str:
    """``"<probe>/<norm>"`` -> the W&B key ``camanim/<probe>/<norm>``."""
    return f"camanim/{name}"


class MediaSink:
    """One logger's share of the pictures (subclass per logger type)."""

    #: the logger's name in warnings
    name = "logger"

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        #: this fit sent an epoch already (the first one calls `restart`)
        self.started = False

    def epoch(self, art: EpochArtifacts) -> None:
        """Send one callback epoch's pictures."""
        raise NotImplementedError

    def report(self, path: Path, epoch: int) -> None:
        """Send the HTML report written at the end of fit (after ``epoch``)."""
        raise NotImplementedError

    def restart(self, epoch: int) -> None:
        """The fit's first callback epoch is ``epoch``: drop what an earlier
        (crashed, resumed) fit logged there and later, where the logger allows
        it. The schedule is the same, so those are exactly the epochs this fit
        logs again."""


class WandbSink(MediaSink):
    """``WandbLogger``: one row per callback epoch, stepped by ``camanim/epoch``."""

    name = "W&B"
    STEP = "camanim/epoch"

    def __init__(self, logger: Any) -> None:
        super().__init__(logger)
        self._defined: set[str] = set()

    def _log(self, row: dict[str, Any], epoch: int) -> None:
        run = self.logger.experiment
        for key in [k for k in row if k not in self._defined]:
            if not self._defined:
                run.define_metric(self.STEP)
            # an exact definition: the media panels' step slider walks the epochs
            run.define_metric(key, step_metric=self.STEP)
            self._defined.add(key)
        run.log({self.STEP: epoch, **row}, commit=True)

    def epoch(self, art: EpochArtifacts) -> None:
        import wandb

        # the suffix is a format wandb knows (mp4, gif, webm: what write_frames writes)
        row: dict[str, Any] = {
            video_key(k): wandb.Video(str(p), format=cast(_WandbFormat, p.suffix[1:]))
            for k, p in sorted(art.videos.items())}
        row.update({tag: wandb.Image(img) for tag, img in sorted(art.pictures.items())})
        if row:
            self._log(row, art.epoch)

    def report(self, path: Path, epoch: int) -> None:
        import wandb

        self._log({"camanim/report": wandb.Html(str(path))}, epoch)


class MLflowSink(MediaSink):
    """``MLFlowLogger``: stepped images and one artifact folder per epoch."""

    name = "MLflow"

    def _client(self) -> tuple[Any, str]:
        return self.logger.experiment, self.logger.run_id

    def epoch(self, art: EpochArtifacts) -> None:
        client, run_id = self._client()
        for tag, img in sorted(art.pictures.items()):
            client.log_image(run_id, img, key=tag, step=art.epoch)
        folder = epoch_folder(art.epoch)
        for _, path in sorted(art.videos.items()):
            # the file's own name says probe, epoch and normalization
            client.log_artifact(run_id, str(path), folder)

    def report(self, path: Path, epoch: int) -> None:
        client, run_id = self._client()
        client.log_artifact(run_id, str(path), epoch_folder(epoch))

    def restart(self, epoch: int) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        client, run_id = self._client()
        repo = get_artifact_repository(client.get_run(run_id).info.artifact_uri)
        stale = [f.path for f in client.list_artifacts(run_id, "images")
                 if _mlflow_step(f.path) >= epoch]
        stale += [f.path for f in client.list_artifacts(run_id, "camanim")
                  if f.is_dir and _folder_epoch(f.path) >= epoch]
        for path in stale:
            repo.delete_artifacts(path)


def _mlflow_step(path: str) -> int:
    """The step in the file name of an image the callback logged
    (``images/ybroad~<probe>~heatmap+step+<n>+timestamp+...``; older releases
    wrote ``#`` and ``%``); -1 for any other file (the user's own images)."""
    m = re.fullmatch(r"images/(?:ybroad|convergence)[~#][^/]*?[+%]step[+%](\d+)[+%].*", path)
    return int(m.group(1)) if m else -1


def _folder_epoch(path: str) -> int:
    m = re.fullmatch(r"camanim/epoch(\d+)", path)
    return int(m.group(1)) if m else -1


def _is(logger: Any, cls_name: str, module_tail: str) -> bool:
    """``logger`` is an instance of Lightning's ``cls_name`` (by its class
    hierarchy, so that checking imports no logger package)."""
    return any(c.__name__ == cls_name and c.__module__.endswith(module_tail)
               for c in type(logger).__mro__)


def logger_sinks(loggers: Sequence[Any]) -> tuple[list[MediaSink], list[str]]:
    """``(sinks, names of loggers that get scalars only)`` for ``trainer.loggers``.
    TensorBoard loggers are neither: `camanim.lightning.media` writes to them."""
    sinks: list[MediaSink] = []
    plain: list[str] = []
    for lg in loggers:
        if _is(lg, "WandbLogger", "loggers.wandb"):
            sinks.append(WandbSink(lg))
        elif _is(lg, "MLFlowLogger", "loggers.mlflow"):
            sinks.append(MLflowSink(lg))
        elif not _is(lg, "TensorBoardLogger", "loggers.tensorboard"):
            plain.append(type(lg).__name__)
    return sinks, plain


def _each(sinks: Sequence[MediaSink], what: str, call: Any) -> list[tuple[str, BaseException]]:
    errors: list[tuple[str, BaseException]] = []
    for sink in sinks:
        try:
            call(sink)
        except Exception as e:  # noqa: BLE001 - one logger's failure stops no other
            errors.append((f"{sink.name} logger ({what})", e))
    return errors


def send_epoch(sinks: Sequence[MediaSink],
               art: EpochArtifacts) -> list[tuple[str, BaseException]]:
    """Each sink gets the epoch (its first of this fit after a `restart`);
    ``(what, error)`` of every sink that failed."""
    def send(sink: MediaSink) -> None:
        if not sink.started:
            sink.restart(art.epoch)
            sink.started = True
        sink.epoch(art)

    return _each(sinks, f"epoch {art.epoch}", send)


def send_report(sinks: Sequence[MediaSink], run_dir: Path,
                epoch: int) -> list[tuple[str, BaseException]]:
    """Write the run's HTML report and hand it to each sink; nothing when
    the viewer is not installed."""
    if not sinks:
        return []
    try:
        # the viewer (camanim.viewer) lands in the same release as this
        # module; a build without it still sends every epoch's pictures
        from ..viewer.report import write_report
    except ImportError:
        return []
    with tempfile.TemporaryDirectory(prefix="camanim-report-") as tmp:
        try:
            path = Path(write_report(run_dir, Path(tmp) / "report.html"))
        except Exception as e:  # noqa: BLE001 - reported with the loggers' errors
            return [("report", e)]
        return _each(sinks, "report", lambda s: s.report(path, epoch))


class LoggerMedia:
    """The callback's side of the sinks: found at the first callback epoch of
    each fit (rank zero), a notice for the loggers that get scalars only, the
    report at the end of fit."""

    def __init__(self) -> None:
        self._trainer: Any = None
        self._sinks: list[MediaSink] = []

    def sinks(self, trainer: Any) -> list[MediaSink]:
        """The sinks of ``trainer.loggers`` (found once per trainer)."""
        if trainer is not self._trainer:
            self._trainer = trainer
            self._sinks, plain = logger_sinks(getattr(trainer, "loggers", []) or [])
            if plain:
                warnings.warn(f"CAManimCallback: {', '.join(plain)} gets the scalars only, "
                              f"not {_MISSED}: they are files in the output folder (add a "
                              "TensorBoardLogger, WandbLogger or MLFlowLogger to see them "
                              "there)", UserWarning, stacklevel=3)
        return self._sinks

    def finish(self, trainer: Any, queue: Any, run_dir: Path | None,
               epochs: Sequence[int]) -> None:
        """At the end of fit (rank zero), after the last epoch's pictures: the
        report to each sink, on the media ``queue`` (its errors come back with
        the queue's). Nothing when this fit made no pictures."""
        if trainer is not self._trainer or queue is None or run_dir is None or not epochs \
                or not self._sinks or not trainer.is_global_zero:
            return
        sinks, epoch = self._sinks, int(epochs[-1])

        def job() -> None:
            errors = send_report(sinks, run_dir, epoch)
            if errors:
                raise CAManimError(f"{len(errors)} output(s) failed: " + "; ".join(
                    f"{what}: {type(e).__name__}: {e}" for what, e in errors))

        queue.submit(epoch, job)
