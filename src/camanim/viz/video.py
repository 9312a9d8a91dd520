"""Write CAManim frames to MP4, WebM, GIF or a folder of PNGs.

Frames stream from the renderer to the writer one layer at a time:

* ``.mp4``: H.264, yuv420p, piped to imageio-ffmpeg's bundled ffmpeg;
* ``.webm``: VP9, same pipe;
* ``.gif``: looping GIF through Pillow (Pillow writes a GIF in one go, so
  frames are kept as 8-bit palette images, about H*W bytes each, until the
  end; use MP4 or PNGs for very long runs);
* a path without suffix, or ending in ``/``: a folder of ``frame_0000.png``...

Files are written under a temporary name next to the target
(`camanim.core.files.temp_path`), synced and renamed at the end, so a
failure never leaves a truncated file under the final name. ffmpeg's exit
status is checked and its error output goes into the raised error (not to
the console).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from typing_extensions import override

from ..core.files import fsync_path, os_cause, temp_path
from ..core.maps import LayerMaps
from ..errors import CAManimError
from .render import FrameRenderer

__all__ = ["write_video", "write_frames", "encode_gif", "iter_video", "video_format",
           "VIDEO_FORMATS"]

VIDEO_FORMATS = ("mp4", "webm", "gif", "png")
_SUFFIX = {".mp4": "mp4", ".webm": "webm", ".gif": "gif"}


def video_format(path: str | Path) -> str:
    """``"mp4"``, ``"webm"``, ``"gif"`` or ``"png"`` (a folder) from a path."""
    s = str(path)
    p = Path(s)
    if s.endswith(("/", os.sep)) or p.suffix == "":
        return "png"
    fmt = _SUFFIX.get(p.suffix.lower())
    if fmt is None:
        raise CAManimError(f"cannot write {p.name}: use a .mp4, .webm or .gif file, or a "
                           "folder path (no suffix, or ending in '/') for numbered PNGs")
    return fmt


# ----------------------------------------------------------------- sinks

class _Sink:
    """One output being written; `finish` syncs and renames it into place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(path)
        self.count = 0

    def write(self, frame: np.ndarray) -> None:
        raise NotImplementedError

    def hold(self, frame: np.ndarray, n: int) -> None:
        """Keep ``frame`` (the last one written) on screen ``n`` frames longer."""
        for _ in range(n):
            self.write(frame)

    def finish(self) -> Path:
        if not self.tmp.is_file() or self.tmp.stat().st_size == 0:
            raise CAManimError(f"could not write {self.path}: the encoder wrote nothing")
        fsync_path(self.tmp)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.tmp.unlink(missing_ok=True)


class _FFmpegSink(_Sink):
    """MP4 (H.264) or WebM (VP9): raw RGB frames piped to ffmpeg, whose exit
    status is checked and whose messages are kept for the error."""

    def __init__(self, path: Path, size: tuple[int, int], fps: float, fmt: str) -> None:
        super().__init__(path)
        from fractions import Fraction

        import imageio_ffmpeg

        h, w = size
        if fmt == "mp4":
            params = ["-vcodec", "libx264", "-crf", "18", "-preset", "veryfast",
                      "-movflags", "+faststart"]
        else:
            params = ["-vcodec", "libvpx-vp9", "-crf", "32", "-b:v", "0", "-deadline",
                      "realtime", "-cpu-used", "8"]
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo",
               "-s", f"{w}x{h}", "-pix_fmt", "rgb24",
               "-r", str(Fraction(float(fps)).limit_denominator()), "-i", "-", "-an",
               *params, "-pix_fmt", "yuv420p", "-v", "error", "-f", fmt, str(self.tmp)]
        # a file, not a pipe: a pipe nobody reads could fill up and stall ffmpeg
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=self._log)

    def _messages(self) -> str:
        self._log.seek(0)
        lines = self._log.read().decode("utf-8", "replace").strip().splitlines()
        return "; ".join(lines[-3:])[:400]

    def _failed(self, what: str) -> CAManimError:
        msg = self._messages()
        return CAManimError(f"could not write {self.path}: ffmpeg {what}"
                            + (f" ({msg})" if msg else ""))

    def write(self, frame: np.ndarray) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(np.ascontiguousarray(frame).tobytes())
        except OSError:  # ffmpeg quit (a full disk, a bad size): its messages say why
            self._proc.kill()
            self._proc.wait()
            raise self._failed(f"stopped with status {self._proc.returncode}") from None
        self.count += 1

    def finish(self) -> Path:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        rc = self._proc.wait()
        try:
            if rc != 0:
                raise self._failed(f"exited with status {rc}")
        finally:
            self._log.close()
        return super().finish()

    def abort(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        with contextlib.suppress(Exception):
            self._log.close()
        super().abort()


class _GifSink(_Sink):
    """Looping GIF: frames quantized to palette images as they come."""

    def __init__(self, path: Path | None, fps: float) -> None:
        if path is not None:
            super().__init__(path)
        self.ms = max(20, int(round(1000.0 / fps)))
        self.frames: list[Any] = []
        self.durations: list[int] = []
        self.count = 0

    def write(self, frame: np.ndarray, colors: int = 256, palette: Any = None) -> None:
        from PIL import Image

        im = Image.fromarray(frame)
        self.frames.append(im.quantize(palette=palette, dither=Image.Dither.NONE)
                           if palette is not None else
                           im.quantize(colors=colors, method=Image.Quantize.FASTOCTREE,
                                       dither=Image.Dither.NONE))
        self.durations.append(self.ms)
        self.count += 1

    @override
    def hold(self, frame: np.ndarray, n: int) -> None:
        # GIF frames carry their own duration: one longer frame, not n copies
        # (Pillow would merge identical copies anyway).
        if self.durations:
            self.durations[-1] += n * self.ms

    def save(self, fp: Any) -> None:
        if not self.frames:
            raise CAManimError("no frames to write")
        first, rest = self.frames[0], self.frames[1:]
        first.save(fp, format="GIF", save_all=True, append_images=rest, loop=0,
                   duration=self.durations if len(self.frames) > 1 else self.durations[0],
                   optimize=False)

    def finish(self) -> Path:
        try:
            self.save(self.tmp)
        except OSError as e:
            raise CAManimError(f"could not write {self.path}: {os_cause(e)}") from None
        self.frames = []
        return super().finish()


class _PngSink(_Sink):
    """A folder of ``frame_0000.png``, ``frame_0001.png``, ..."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        self.tmp.mkdir(parents=True, exist_ok=True)

    def _check_write(self, fn: Any) -> None:
        try:
            fn()
        except OSError as e:
            raise CAManimError(f"could not write {self.path}: {os_cause(e)}") from None

    def write(self, frame: np.ndarray) -> None:
        from PIL import Image

        self._check_write(lambda: Image.fromarray(frame).save(
            self.tmp / f"frame_{self.count:04d}.png", compress_level=3))
        self.count += 1

    @override
    def hold(self, frame: np.ndarray, n: int) -> None:
        pass  # a folder holds one picture per layer

    def finish(self) -> Path:
        if self.path.exists() and not self.path.is_dir():
            raise CAManimError(f"{self.path} exists and is not a folder; pick another path")
        def sync_all() -> None:
            for f in self.tmp.iterdir():
                fsync_path(f)

        self._check_write(sync_all)
        if not self.path.exists():
            os.replace(self.tmp, self.path)
            return self.path
        # Refill an existing folder: drop old frames, move new ones in.
        for old in self.path.glob("frame_*.png"):
            old.unlink()
        for new in sorted(self.tmp.iterdir()):
            os.replace(new, self.path / new.name)
        self.tmp.rmdir()
        return self.path


def _open(path: Path, fmt: str, size: tuple[int, int], fps: float) -> _Sink:
    if fmt in ("mp4", "webm"):
        return _FFmpegSink(path, size, fps, fmt)
    if fmt == "gif":
        return _GifSink(path, fps)
    return _PngSink(path)


def _check_fps(fps: float) -> float:
    try:
        fps = float(fps)
    except (TypeError, ValueError):
        raise CAManimError(f"fps must be a number, got {fps!r}") from None
    if not (0 < fps <= 240):
        raise CAManimError(f"fps must be in (0, 240], got {fps}")
    return fps


def _check_hold(hold_last: int) -> int:
    if int(hold_last) < 0:
        raise CAManimError(f"hold_last must be >= 0, got {hold_last}")
    return int(hold_last)


# ----------------------------------------------------------------- public

def _output_paths(path: Path, fmt: str, n: int) -> list[Path]:
    if n == 1:
        return [path]
    if fmt == "png":
        return [path.with_name(f"{path.name}_{b}") for b in range(n)]
    return [path.with_name(f"{path.stem}_{b}{path.suffix}") for b in range(n)]


def write_video(path: str | Path, images: Any, maps: LayerMaps, normalization: str = "local",
                fps: float = 8, road: Any = None, hold_last: int = 0, grid: bool = False,
                progress: bool = False, **render_kwargs: Any) -> Path | list[Path]:
    """Render every layer's CAM and write the animation.

    Args:
        path: ``*.mp4`` (H.264), ``*.webm`` (VP9), ``*.gif`` (looping), or a
            folder (no suffix or a trailing ``/``) of numbered PNGs.
        images: ``(B, C, H, W)`` images the maps were computed on.
        maps: their `LayerMaps`.
        normalization: ``"local"``, ``"global"``, ``"both"`` (side by side)
            or ``"none"``.
        fps: frames (layers) per second.
        road: ybROAD scores (YbRoad or ``(L, B)`` array) to show per layer.
        hold_last: repeat the last frame this many extra times (videos and
            GIFs), so the final layer stays on screen.
        grid: one video tiling all B images instead of one per image.
        progress: show a progress bar over layers.
        **render_kwargs: ``colormap``, ``alpha``, ``mean``, ``std``,
            ``denormalize``, ``size``, ``class_names``, ``title`` (see
            `camanim.render_frames`).

    Returns:
        The written path; with B > 1 images and no ``grid``, a list of B
        paths named ``<stem>_0<suffix>``, ``<stem>_1<suffix>``, ...
    """
    path = Path(path)
    fmt = video_format(path)
    fps = _check_fps(fps)
    hold_last = _check_hold(hold_last)
    renderer = FrameRenderer(images, maps, normalization=normalization, road=road,
                             grid=grid, **render_kwargs)
    paths = _output_paths(path, fmt, renderer.n_outputs)
    sinks: list[_Sink] = []
    try:
        for p in paths:
            sinks.append(_open(p, fmt, renderer.frame_size, fps))
        layers: Iterable[list[np.ndarray]] = renderer.iter_layers()
        if progress:
            from tqdm.auto import tqdm

            layers = tqdm(layers, total=len(renderer), desc=f"frames -> {path.name}",
                          unit="layer", leave=False)
        last: list[np.ndarray] = []
        for frames in layers:
            for sink, frame in zip(sinks, frames, strict=False):
                sink.write(frame)
            last = frames
        for sink, frame in zip(sinks, last, strict=False):
            sink.hold(frame, hold_last)
        done = [sink.finish() for sink in sinks]
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    return done[0] if renderer.n_outputs == 1 else done


def write_frames(path: str | Path, frames: Iterable[np.ndarray], fps: float = 8,
                 hold_last: int = 0) -> Path:
    """Write any stream of equal-size ``(H, W, 3)`` uint8 frames (even sides
    for MP4/WebM) to ``path`` (same formats as `write_video`)."""
    path = Path(path)
    fmt = video_format(path)
    fps = _check_fps(fps)
    hold_last = _check_hold(hold_last)
    sink: _Sink | None = None
    try:
        last = None
        for frame in frames:
            frame = _check_frame(frame, fmt, None if last is None else last.shape)
            if sink is None:
                sink = _open(path, fmt, frame.shape[:2], fps)
            sink.write(frame)
            last = frame
        if sink is None or last is None:
            raise CAManimError("no frames to write")
        sink.hold(last, hold_last)
        return sink.finish()
    except BaseException:
        if sink is not None:
            sink.abort()
        raise


def _check_frame(frame: np.ndarray, fmt: str, shape: Sequence[int] | None) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise CAManimError(f"frames must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
    if shape is not None and frame.shape != tuple(shape):
        raise CAManimError(f"all frames must have one size: got {frame.shape} after {tuple(shape)}")
    if fmt in ("mp4", "webm") and (frame.shape[0] % 2 or frame.shape[1] % 2):
        raise CAManimError(f"{fmt} needs even frame sides, got {frame.shape[1]}x{frame.shape[0]}")
    return frame


def encode_gif(frames: Iterable[np.ndarray], fps: float = 8, colors: int = 256,
               shared_palette: bool = False) -> bytes:
    """A looping GIF of ``(H, W, 3)`` uint8 frames, in memory (for
    TensorBoard's ``Summary.Image(encoded_image_string=...)``).

    ``colors`` (2..256) per palette; ``shared_palette``: one palette for all
    frames, made from a sample of them (smaller files: fewer colours and one
    palette compress better; a 53-frame 258x222 GIF of CAM overlays drops
    from ~1.8 MB at 256 own colours to ~1.1 MB at 64 shared ones).
    """
    from PIL import Image

    if not 2 <= int(colors) <= 256:
        raise CAManimError(f"colors must be within 2..256, got {colors}")
    sink = _GifSink(None, _check_fps(fps))
    shape = None
    held = []   # RGB frames are kept only until the shared palette is known
    for frame in frames:
        frame = _check_frame(frame, "gif", shape)
        shape = frame.shape
        if shared_palette:
            held.append(frame)
        else:
            sink.write(frame, colors=int(colors), palette=None)
    if shape is None:
        raise CAManimError("no frames to encode")
    if shared_palette:
        sample = np.concatenate(held[::max(1, len(held) // 12)], axis=0)
        palette = Image.fromarray(sample).quantize(colors=int(colors),
                                                   method=Image.Quantize.FASTOCTREE,
                                                   dither=Image.Dither.NONE)
        for frame in held:
            sink.write(frame, colors=int(colors), palette=palette)
    buf = io.BytesIO()
    sink.save(buf)
    return buf.getvalue()


def iter_video(path: str | Path) -> Iterator[np.ndarray]:
    """Decode a written MP4/WebM/GIF back into ``(H, W, 3)`` uint8 frames
    (handy for checks and tests)."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            for f in ImageSequence.Iterator(im):
                yield np.asarray(f.convert("RGB"))
        return
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    w, h = meta["size"]
    for buf in gen:
        yield np.frombuffer(buf, np.uint8).reshape(h, w, 3)
