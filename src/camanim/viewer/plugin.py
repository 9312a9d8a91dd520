"""TensorBoard's "CAManim" tab: a dynamic plugin (``tensorboard_plugins``
entry point) that serves the page in ``static/`` and the viewer data the
callback wrote under ``--logdir``.

It reads files, not event data: ``context.logdir`` is walked for
``viewer/`` folders (one run each, named by its folder relative to the
logdir), so it works the same with the Rust data server (where
``context.multiplexer`` is None) and the Python loader.

Safe to serve with ``--bind_all``: a request names a run (which must be one
found under the logdir, given as a plain relative path: no ``..``, no
absolute path, no backslash, no ``%`` or control character), an epoch and a
probe number (digits); the file name is built here, and a file whose real
path leads out of the logdir (a symlink) is refused. Every refusal is an
error status with an empty body.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from werkzeug import wrappers

from .data import VIEWER_DIR, background_path, find_runs, read_index, sprite_path

__all__ = ["CAManimPlugin", "STATIC", "safe_run"]

STATIC = Path(__file__).resolve().parent / "static"
#: the static files served, with their content types
STATIC_TYPES = {"index.js": "text/javascript", "viewer.js": "text/javascript",
                "viewer.css": "text/css"}
_DIGITS = re.compile(r"^[0-9]{1,6}$")


def safe_run(run: str) -> bool:
    """Whether ``run`` is a plain relative folder name (checked before any lookup)."""
    if not run or len(run) > 1000 or run.startswith(("/", "~")) or "\\" in run or "%" in run:
        return False
    if any(ord(c) < 32 for c in run) or re.match(r"^[A-Za-z]:", run):
        return False
    return all(part not in ("", "..") for part in run.split("/"))


def _respond(body: bytes | str, content_type: str, code: int = 200) -> wrappers.Response:
    data = body.encode("utf-8") if isinstance(body, str) else body
    resp = wrappers.Response(data, status=code, content_type=content_type)
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _refuse(code: int) -> wrappers.Response:
    return _respond(b"", "text/plain", code)


try:
    from tensorboard.plugins import base_plugin
except ImportError:  # pragma: no cover - TensorBoard is a dependency; the report works without
    base_plugin = None

_Base: Any = base_plugin.TBPlugin if base_plugin is not None else object


class CAManimPlugin(_Base):
    """The "CAManim" tab: epoch x layer ybROAD heatmap, maps, curves, compare."""

    plugin_name = "camanim"

    def __init__(self, context: Any) -> None:
        """Serve the runs under ``context.logdir`` (a local folder)."""
        logdir = getattr(context, "logdir", None) or ""
        self._root = Path(logdir).resolve() if logdir and "://" not in logdir else None
        self._runs: tuple[float, list[str]] = (0.0, [])

    # ............................................................ TBPlugin
    def get_plugin_apps(self) -> dict[str, Callable]:
        """The routes, relative to ``/data/plugin/camanim``."""
        handlers: dict[str, Callable[[Any], wrappers.Response]] = {
            f"/{name}": self._static for name in STATIC_TYPES}
        handlers.update({"/runs": self._serve_runs, "/index": self._serve_index,
                         "/sprite": self._serve_sprite, "/background": self._serve_background})
        return {route: wrappers.Request.application(h) for route, h in handlers.items()}

    def is_active(self) -> bool:
        """Active when some run under the logdir has viewer data."""
        return bool(self.runs())

    def frontend_metadata(self) -> Any:
        """An ES module entry point (``index.js``), the tab named "CAManim"."""
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="CAManim",
                                            disable_reload=True)

    # ............................................................ data
    def runs(self) -> list[str]:
        """The runs with a ``viewer/`` folder (cached for two seconds)."""
        if self._root is None:
            return []
        t, runs = self._runs
        if time.monotonic() - t > 2.0:
            runs = find_runs(self._root) if self._root.is_dir() else []
            self._runs = (time.monotonic(), runs)
        return runs

    def _viewer_dir(self, request: Any) -> Path | int:
        """The run's ``viewer/`` folder, or the error status to answer."""
        run = request.args.get("run", "")
        if not safe_run(run):
            return 400
        if run not in self.runs() and run not in self._fresh_runs():
            return 404
        return self._root / run / VIEWER_DIR

    def _fresh_runs(self) -> list[str]:
        self._runs = (0.0, [])
        return self.runs()

    def _stamp(self, run: str) -> str:
        """Changes when the run's ``index.json`` does (the page polls this, not the index)."""
        try:
            st = (self._root / run / VIEWER_DIR / "index.json").stat()  # type: ignore[operator]
        except OSError:
            return ""
        return f"{st.st_mtime_ns}-{st.st_size}"

    def _inside(self, path: Path) -> bool:
        """Whether ``path``'s real location lies under the logdir."""
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return False
        return self._root is not None and real.is_relative_to(self._root) and real.is_file()

    def _file(self, path: Path, content_type: str) -> wrappers.Response:
        if not self._inside(path):
            return _refuse(404 if not os.path.lexists(path) else 403)
        return _respond(path.read_bytes(), content_type)

    # ............................................................ routes
    def _static(self, request: Any) -> wrappers.Response:
        name = request.path.rsplit("/", 1)[-1]
        if name not in STATIC_TYPES:
            return _refuse(404)
        return _respond((STATIC / name).read_bytes(), STATIC_TYPES[name])

    def _serve_runs(self, request: Any) -> wrappers.Response:  # noqa: ARG002 - werkzeug app
        body: dict[str, Any] = {"runs": self._fresh_runs()}
        body["stamps"] = {run: self._stamp(run) for run in body["runs"]}
        if self._root is None:
            body["message"] = ("the CAManim tab reads the files under --logdir (a local folder); "
                               "this TensorBoard has none")
        elif not body["runs"]:
            body["message"] = (f"no run under {self._root} has viewer data yet: it appears "
                               "after the first CAManimCallback epoch "
                               "(MediaOptions.viewer, on by default)")
        return _respond(json.dumps(body), "application/json")

    def _serve_index(self, request: Any) -> wrappers.Response:
        vdir = self._viewer_dir(request)
        if isinstance(vdir, int):
            return _refuse(vdir)
        if not self._inside(vdir / "index.json") and os.path.lexists(vdir / "index.json"):
            return _refuse(403)
        from ..errors import CAManimError

        try:
            index = read_index(vdir)
        except CAManimError as e:   # missing or malformed: a message on the page
            return _respond(json.dumps({"error": str(e).replace(str(self._root), "<logdir>")}),
                            "application/json")
        return _respond(json.dumps(index), "application/json")

    def _numbers(self, request: Any, *keys: str) -> list[int] | None:
        vals = [request.args.get(k, "") for k in keys]
        return [int(v) for v in vals] if all(_DIGITS.match(v) for v in vals) else None

    def _serve_sprite(self, request: Any) -> wrappers.Response:
        vdir, nums = self._viewer_dir(request), self._numbers(request, "epoch", "probe")
        if isinstance(vdir, int) or nums is None:
            return _refuse(vdir if isinstance(vdir, int) else 400)
        return self._file(sprite_path(vdir, *nums), "image/png")

    def _serve_background(self, request: Any) -> wrappers.Response:
        vdir, nums = self._viewer_dir(request), self._numbers(request, "probe")
        if isinstance(vdir, int) or nums is None:
            return _refuse(vdir if isinstance(vdir, int) else 400)
        return self._file(background_path(vdir, *nums), "application/octet-stream")
