"""Files that are complete under their final name, or absent.

Every file camanim writes (MP4, GIF, PNG, NPZ, JSON, CSV) goes to a
temporary name in the same folder, ``.<name>.<pid>.partial<suffix>``, is
flushed to disk (``fsync``) and only then renamed into place; a failure
removes the temporary file. A process killed mid-write leaves its
temporary file behind: `remove_stale` deletes those of processes that no
longer run (called when a run or command starts writing to a folder).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "write_json",
    "save_figure",
    "writable_folder",
    "temp_path",
    "atomic_path",
    "write_bytes",
    "write_text",
    "fsync_path",
    "remove_stale",
    "os_cause",
]

# ours: .<name>.<pid>.partial[.<ext>] (files and PNG-frame folders); older
# versions wrote <name>.png.tmp, <name>.tmp.npz and .<name>.json.partial
_OURS = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.partial(\.[A-Za-z0-9]+)?$")
_LEGACY = re.compile(r"^(.+\.(png\.tmp|json\.tmp|tmp\.npz)|\..+\.json\.partial)$")


def temp_path(path: Path) -> Path:
    """The temporary name of ``path`` (same folder, same suffix, so writers
    that go by the suffix pick the same format)."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial{path.suffix}")


def os_cause(e: BaseException) -> str:
    """A short cause for an OS error: ``No space left on device`` etc."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def fsync_path(path: Path) -> None:
    """Flush a written file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system syncs folders
        fsync_path(folder)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write ``tmp``; on leaving the block
    it is synced and renamed to ``p``; on an error (or a writer that
    produced nothing) it is removed and ``p`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        if not tmp.exists() or (tmp.is_file() and tmp.stat().st_size == 0):
            raise OSError(errno.EIO, f"the writer produced no data for {path.name}")
        if tmp.is_file():
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path | None, obj: object) -> str:
    """``obj`` as indented JSON text; written to ``path`` atomically when given."""
    import json

    text = json.dumps(obj, indent=1)
    if path is not None:
        write_text(path, text)
    return text


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically (format from the suffix) and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


def writable_folder(folder: str | Path, what: str) -> Path:
    """Create ``folder`` and check that a file can be written there now.

    Raises:
        CAManimError: naming ``what`` (e.g. ``--out``), the folder and the cause.
    """
    from ..errors import CAManimError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CAManimError(f"{what} {folder} is a file, not a folder; pass a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".camanim-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CAManimError(f"{what} {folder} cannot be written ({os_cause(e)}); pass a "
                           "writable folder") from None
    return folder


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from before this start: nothing of ours is being written yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folders: Sequence[str | Path]) -> list[Path]:
    """Delete our temporary files (and PNG-frame folders) in ``folders``
    (not recursive) left by processes that no longer run; returns them."""
    removed = []
    for folder in map(Path, folders):
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for p in entries:
            m = _OURS.match(p.name)
            if (m and not _alive(int(m["pid"]))) or _LEGACY.match(p.name):
                _remove(p)
                removed.append(p)
    return removed
