"""The epoch x layer viewer: the data the callback writes for it (`data`),
the TensorBoard "CAManim" tab that serves it (`plugin`) and the one-file
offline HTML report (`report`). The page itself (``static/``) is plain
HTML, JavaScript and CSS shipped as package data: no build step."""

from .data import VIEWER_DIR, read_index, write_viewer_epoch
from .report import write_report

__all__ = ["VIEWER_DIR", "read_index", "write_viewer_epoch", "write_report"]
