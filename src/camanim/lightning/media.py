"""The callback's media work, off the training thread.

Once an epoch's maps and scores are on the CPU, everything that turns them
into pictures (frame rendering, GIF and MP4 encoding, heatmaps and curves,
TensorBoard image writes) runs on background threads while training goes on.

`MediaQueue` keeps the epochs in order and bounded: at most ``max_pending``
epochs are in flight; a new one waits (the training thread blocks) until
the oldest is done, so memory stays bounded. Errors of a background job are
kept with their epoch and handed back by `MediaQueue.errors` at the next
callback epoch or at `MediaQueue.drain`, never lost.

Worker threads set their own intra-op thread count to 1 once (OpenMP's
thread count is per thread), so the training thread's setting is never
touched and none of them uses a random stream.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.files import os_cause, remove_stale, writable_folder
from ..core.maps import LayerMaps
from ..errors import CAManimError

__all__ = ["MediaQueue", "EpochMedia", "write_epoch_media", "tensorboard_logger",
           "tensorboard_writer", "add_gif", "events_bytes", "output_dir", "mark_restart",
           "SUBFOLDERS"]

#: the folders under the output folder that the callback writes into
SUBFOLDERS = ("videos", "heatmaps", "maps", "viewer", "viewer/maps")


def _one_thread() -> None:
    torch.set_num_threads(1)


class MediaQueue:
    """Ordered, bounded background execution of per-epoch media jobs.

    Args:
        workers: threads for the parallel parts of one epoch (one video job
            per probe and normalization, the plots).
        max_pending: epochs whose media may be in flight while training goes
            on; ``0`` runs every job on the calling thread (synchronous).
    """

    def __init__(self, workers: int = 2, max_pending: int = 1) -> None:
        self.workers = int(workers)
        self.max_pending = int(max_pending)
        self._epoch_pool: ThreadPoolExecutor | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[int, Future]] = deque()
        self._errors: list[tuple[int, BaseException]] = []
        self._lock = threading.Lock()
        #: seconds the training thread waited in `submit` / `drain`
        self.waited_s = 0.0

    # ---------------------------------------------------------------- pools
    def pool(self) -> ThreadPoolExecutor:
        """The worker pool for the parallel parts of an epoch's job."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers,
                                            thread_name_prefix="camanim-media",
                                            initializer=_one_thread)
        return self._pool

    def _epochs(self) -> ThreadPoolExecutor:
        if self._epoch_pool is None:
            self._epoch_pool = ThreadPoolExecutor(max_workers=1,
                                                  thread_name_prefix="camanim-epoch",
                                                  initializer=_one_thread)
        return self._epoch_pool

    # ---------------------------------------------------------------- jobs
    def submit(self, epoch: int, job: Callable[[], None]) -> None:
        """Run ``job`` (one epoch's media) after the jobs submitted before it.

        Blocks while ``max_pending`` epochs are already in flight.
        """
        if self.max_pending <= 0:
            self._run(epoch, job)
            return
        self._reap()
        t = time.perf_counter()
        while len(self._pending) >= self.max_pending:
            e, fut = self._pending.popleft()
            fut.exception()  # wait; the error itself was recorded by _run
        self.waited_s += time.perf_counter() - t
        self._pending.append((epoch, self._epochs().submit(self._run, epoch, job)))

    def _run(self, epoch: int, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - handed back by errors()
            with self._lock:
                self._errors.append((epoch, e))

    def _reap(self) -> None:
        while self._pending and self._pending[0][1].done():
            self._pending.popleft()

    @property
    def in_flight(self) -> int:
        """Epochs submitted and not finished yet."""
        self._reap()
        return len(self._pending)

    def errors(self) -> list[tuple[int, BaseException]]:
        """The ``(epoch, exception)`` of every failed job so far (taken: each
        error is handed back once)."""
        with self._lock:
            out, self._errors = self._errors, []
        return out

    def drain(self) -> None:
        """Wait for every submitted job (fit end, teardown, exceptions)."""
        t = time.perf_counter()
        while self._pending:
            _, fut = self._pending.popleft()
            fut.exception()
        self.waited_s += time.perf_counter() - t


    def close(self) -> None:
        """Drain, then stop the threads."""
        self.drain()
        for attr in ("_epoch_pool", "_pool"):
            pool = getattr(self, attr)
            if pool is not None:
                pool.shutdown(wait=True)
                setattr(self, attr, None)


# -------------------------------------------------------------- TensorBoard

def tensorboard_logger(trainer: Any) -> Any:
    """The first ``TensorBoardLogger`` among ``trainer.loggers``, or None."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for lg in getattr(trainer, "loggers", []) or []:
        if isinstance(lg, TensorBoardLogger):
            return lg
    return None


def tensorboard_writer(trainer: Any) -> Any:
    """The first TensorBoard logger's ``SummaryWriter`` (``.experiment``), or None."""
    lg = tensorboard_logger(trainer)
    return None if lg is None else lg.experiment


def output_dir(save_dir: Path | None, trainer: Any) -> Path:
    """The folder for files: ``save_dir``, else the TensorBoard logger's
    ``log_dir``, else ``<default_root_dir>/camanim``; created and checked
    to be writable now (before a long epoch, not after it). Temporary files
    a killed run left there are removed."""
    if save_dir is not None:
        d = Path(save_dir)
    else:
        tb = tensorboard_logger(trainer)
        d = Path(tb.log_dir) if tb is not None else Path(trainer.default_root_dir) / "camanim"
    writable_folder(d, "CAManimCallback: the output folder (save_dir=)")
    remove_stale([d, *(d / sub for sub in SUBFOLDERS)])
    return d


def mark_restart(writer: Any, step: int) -> None:
    """Tell TensorBoard that a run restarts at ``step`` (a resumed fit, the
    first step it logs): TensorBoard then drops what a crashed run logged at
    ``step`` and after, which the resumed run logs again, so no step shows
    twice (TensorBoard's SessionLog.START)."""
    if type(writer).__module__.startswith("tensorboardX"):  # pragma: no cover
        from tensorboardX.proto.event_pb2 import Event, SessionLog
    else:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
    writer._get_file_writer().add_event(
        Event(
            wall_time=time.time(), step=int(step), session_log=SessionLog(status=SessionLog.START)
        )
    )
    writer.flush()


def add_gif(writer: Any, tag: str, data: bytes, hw: tuple[int, int], step: int) -> None:
    """An encoded animated GIF as a TensorBoard image summary (no moviepy:
    ``add_video`` needs it and silently logs nothing with moviepy 2)."""
    if type(writer).__module__.startswith("tensorboardX"):  # pragma: no cover
        from tensorboardX.proto.summary_pb2 import Summary
    else:
        from tensorboard.compat.proto.summary_pb2 import Summary
    summary = Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
        height=int(hw[0]), width=int(hw[1]), colorspace=3, encoded_image_string=data))])
    writer._get_file_writer().add_summary(summary, step)


def events_bytes(log_dir: str | Path) -> int:
    """Total size of the TensorBoard event files under ``log_dir``."""
    return sum(p.stat().st_size for p in Path(log_dir).rglob("events.out.tfevents.*"))


# -------------------------------------------------------------- one epoch

@dataclass
class EpochMedia:
    """Everything one epoch's pictures need, on the CPU (made on the
    training thread, consumed by `write_epoch_media` in the background)."""

    epoch: int
    step: int
    images: torch.Tensor                  # (B, C, H, W) probe images, CPU
    maps: LayerMaps                       # on the CPU
    probes: list[str]
    out_dir: Path
    method: str
    road: np.ndarray | None = None        # (L, B)
    ebpg: dict[str, np.ndarray] = field(default_factory=dict)   # probe -> (L,), masked probes
    #: per probe: (epochs, layer names, (E, L) ROAD so far), for the heatmap
    history: dict[str, tuple[list[int], list[str], np.ndarray]] = field(default_factory=dict)
    writer: Any = None                    # TensorBoard SummaryWriter or None
    normalization: tuple[str, ...] = ("local", "global")
    log_videos: bool = True
    save_videos: bool = True
    save_maps: bool = False
    fps: float = 8.0
    render: dict = field(default_factory=dict)   # mean, std, size, class_names
    tb_size: int | tuple[int, int] | None = 128   # TensorBoard GIF panel: long side
    tb_colors: int = 64                   # colours of the TensorBoard GIFs' shared palette
    timing: dict = field(default_factory=dict)
    #: `camanim.lightning.convergence.media_fields`: probe -> (epochs, names,
    #: (E, L) map change); probe -> (E, L) bool, ybROAD not above chance;
    #: probe -> this epoch's random-map ROAD
    convergence: dict = field(default_factory=dict)
    road_mask: dict = field(default_factory=dict)
    chance: dict = field(default_factory=dict)
    viewer: bool = True                   # write the viewer's data (camanim.viewer.data)
    #: `camanim.lightning.loggers` sinks (W&B, MLflow): they get the epoch's pictures
    sinks: list = field(default_factory=list)
    #: what the sinks get, filled while drawing (made by `write_epoch_media`)
    artifacts: Any = None


def tensorboard_norms(norms: Sequence[str]) -> list[str]:
    """The GIFs logged per probe: local and global become one side-by-side
    ``"both"`` GIF (half the images, one tag to compare them)."""
    out = [n for n in norms if n not in ("local", "global")]
    if "local" in norms and "global" in norms:
        out.insert(0, "both")
    else:
        out[:0] = [n for n in norms if n in ("local", "global")]
    return list(dict.fromkeys(out))


def gif_tag(probe: str, norm: str) -> str:
    return f"camanim/{probe}/" + ("local_global" if norm == "both" else norm)


#: what one background part returns: the outputs that failed inside it, if any
Failures = list[tuple[str, BaseException]]
#: (what and where, the part)
Part = tuple[str, Callable[[], "Failures | None"]]


def write_epoch_media(m: EpochMedia, pool: ThreadPoolExecutor | None = None) -> None:
    """Render, encode and write one epoch's pictures.

    TensorBoard: one GIF per probe (local | global side by side, small
    panels), ``ybroad/<probe>/heatmap`` and ``ybroad/<probe>/curve``.
    Files: full-size MP4s per normalization, ``heatmaps/<probe>.png``,
    ``maps/epochNNN.npz`` and the CAManim tab's ``viewer/`` (docs/VIEWER.md).
    W&B / MLflow sinks get the pictures afterwards. Independent parts run on ``pool``; one part's
    failure (a full disk, a codec) stops no other, and after every part has
    finished one `CAManimError` names each failed output and its cause.
    """
    from .loggers import EpochArtifacts, send_epoch

    t0 = time.perf_counter()
    m.artifacts = EpochArtifacts(m.epoch)
    parts = _video_parts(m)
    if m.road is not None:
        parts.append(("plots", partial(_road_plots, m)))
    if m.convergence:
        parts.append(("convergence heatmaps", partial(_convergence_plots, m)))
    if m.viewer:
        parts.append((f"viewer data {m.out_dir / 'viewer'}", partial(viewer_epoch, m)))
    if m.save_maps:
        npz = m.out_dir / "maps" / f"epoch{m.epoch:03d}.npz"
        parts.append((f"maps {npz}", partial(_save_maps, m.maps, npz)))
    errors: Failures = []
    if pool is None:
        for what, part in parts:
            errors += _run_part(what, part)
    else:
        for fut in [pool.submit(_run_part, what, part) for what, part in parts]:
            errors += fut.result()
    errors += send_epoch(m.sinks, m.artifacts)
    if m.writer is not None:
        try:
            m.writer.flush()
        except Exception as e:  # noqa: BLE001 - reported with the other outputs' failures
            errors.append(("TensorBoard event file", e))
    m.timing["media"] = time.perf_counter() - t0
    if errors:
        raise CAManimError(f"{len(errors)} output(s) failed: " + "; ".join(
            f"{what}: {_cause(e)}" for what, e in errors))


def _run_part(what: str, part: Callable[[], Failures | None]) -> Failures:
    try:
        out = part()
    except Exception as e:  # noqa: BLE001 - one output's failure stops no other
        return [(what, e)]
    return out or []


def _frames(m: EpochMedia, b: int, norm: str,
            size: int | tuple[int, int] | None) -> list[np.ndarray]:
    from ..viz.render import render_frames

    return list(render_frames(m.images, m.maps, normalization=norm, road=m.road, index=b,
                              title=f"epoch {m.epoch}", **{**m.render, "size": size}))


def _gif(m: EpochMedia, b: int, probe: str, norm: str) -> None:
    from ..viz.video import encode_gif

    frames = _frames(m, b, norm, m.tb_size)
    add_gif(m.writer, gif_tag(probe, norm),
            encode_gif(frames, m.fps, colors=m.tb_colors, shared_palette=True),
            frames[0].shape[:2], m.step)


def _video(m: EpochMedia, b: int, path: Path, norm: str) -> None:
    from ..viz.video import write_frames

    write_frames(path, _frames(m, b, norm, m.render.get("size")), fps=m.fps)
    m.artifacts.videos[f"{m.probes[b]}/{norm}"] = path


def _video_parts(m: EpochMedia) -> list[Part]:
    """One part per TensorBoard GIF and per MP4 file."""
    parts: list[Part] = []
    for b, probe in enumerate(m.probes):
        if m.writer is not None and m.log_videos:
            for norm in tensorboard_norms(m.normalization):
                parts.append((f"TensorBoard GIF {gif_tag(probe, norm)}",
                              partial(_gif, m, b, probe, norm)))
        if m.save_videos:
            for norm in m.normalization:
                path = m.out_dir / "videos" / f"{probe}_epoch{m.epoch:03d}_{norm}.mp4"
                parts.append((f"video {path}", partial(_video, m, b, path, norm)))
    return parts


def _road_plots(m: EpochMedia) -> Failures:
    """Every probe's ybROAD heatmap (PNG file, TensorBoard) and curve
    (TensorBoard); the file and the TensorBoard images fail independently."""
    from ..viz.plots import heatmap_image

    failed: Failures = []
    for b, probe in enumerate(m.probes):
        if probe not in m.history:
            continue
        epochs, names, mat = m.history[probe]
        mask = m.road_mask.get(probe)
        img = heatmap_image(mat, epochs, names, mask=mask,
                            title=f"{probe}: ybROAD by epoch ({m.method})"
                            + ("; hatched: <= chance" if mask is not None else ""))
        png = m.out_dir / "heatmaps" / f"{probe}.png"
        failed += _run_part(f"heatmap {png}", partial(_save_png, png, img))
        if m.writer is not None or m.sinks:
            failed += _run_part(f"ybroad/{probe}/curve, TensorBoard ybroad images",
                                partial(_tensorboard_plots, m, b, probe, img))
    return failed


def _tensorboard_plots(m: EpochMedia, b: int, probe: str, heatmap: np.ndarray) -> None:
    from ..viz.plots import curve_image

    assert m.road is not None
    curve = curve_image(m.road[:, b], list(m.maps.names), ebpg=m.ebpg.get(probe),
                        title=f"{probe}: ybROAD, epoch {m.epoch}", chance=m.chance.get(probe))
    m.artifacts.pictures.update({f"ybroad/{probe}/heatmap": heatmap,
                                 f"ybroad/{probe}/curve": curve})
    if m.writer is not None:
        m.writer.add_image(f"ybroad/{probe}/heatmap", heatmap, m.step, dataformats="HWC")
        m.writer.add_image(f"ybroad/{probe}/curve", curve, m.step, dataformats="HWC")


def _convergence_plots(m: EpochMedia) -> None:
    from ..viz.convergence import convergence_image
    from ..viz.plots import save_png

    for probe, (epochs, names, mat) in m.convergence.items():
        img = convergence_image(mat, epochs, names, title=f"{probe}: map change "
                                "(1 - Spearman vs previous)")
        m.artifacts.pictures[f"convergence/{probe}/heatmap"] = img
        save_png(m.out_dir / "heatmaps" / f"{probe}_convergence.png", img)
        if m.writer is not None:
            m.writer.add_image(f"convergence/{probe}/heatmap", img, m.step, dataformats="HWC")


def viewer_epoch(m: EpochMedia) -> None:
    """The epoch's data for the CAManim tab and report (`camanim.viewer.data`)."""
    from ..viewer.data import write_viewer_epoch

    change = {p: mat[-1] for p, (epochs, _, mat) in m.convergence.items()
              if len(epochs) and epochs[-1] == m.epoch}
    write_viewer_epoch(m.out_dir, epoch=m.epoch, step=m.step, images=m.images, maps=m.maps,
                       probes=m.probes, method=m.method, road=m.road, chance=m.chance,
                       change=change, render=m.render, norms=m.normalization)


def _save_png(path: Path, img: np.ndarray) -> None:
    from ..viz.plots import save_png

    save_png(path, img)


def _save_maps(maps: LayerMaps, path: Path) -> None:
    maps.save(path)


def _cause(e: BaseException) -> str:
    if isinstance(e, CAManimError):
        return str(e)
    return os_cause(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
