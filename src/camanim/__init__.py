"""camanim: class activation maps through every layer of a CNN (CAManim),
ROAD for every layer (ybROAD), and both during training.

The public names are imported on first use (PEP 562), so that
``import camanim`` and ``camanim --help`` do not load torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import CAManimError as CAManimError

# public name -> the module (relative to this package) that defines it
_WHERE = {
    "CAManim": ".engine",
    "CAManimCallback": ".lightning.callback",
    "CheckpointMeta": ".core.checkpoint",
    "ConvergenceOptions": ".lightning.options",
    "ExplanationMaps": ".methods.sise",
    "IMAGENET_MEAN": ".core.images",
    "IMAGENET_STD": ".core.images",
    "LayerInfo": ".core.layers",
    "LayerMaps": ".core.maps",
    "LayerTable": ".core.layers",
    "MediaOptions": ".lightning.options",
    "RoadOptions": ".lightning.options",
    "RoadSummary": ".metrics.road",
    "SanityReport": ".metrics.sanity",
    "VideoOptions": ".lightning.options",
    "YbRoad": ".metrics.road",
    "ada_sise": ".methods.sise",
    "checkpoint_meta": ".core.checkpoint",
    "contact_sheet": ".viz.figures",
    "encode_gif": ".viz.video",
    "energy_pointing_game": ".metrics.pointing",
    "get_method": ".methods",
    "integrated_gradcam": ".methods.integrated_gradcam",
    "list_layers": ".core.layers",
    "load_image": ".core.images",
    "method_names": ".methods",
    "plot_params": ".viz.figures",
    "render_frames": ".viz.render",
    "run_summary": ".viz.figures",
    "sanity_check": ".metrics.sanity",
    "sise": ".methods.sise",
    "study": ".runs.study",
    "write_frames": ".viz.video",
    "write_video": ".viz.video",
    "ybroad": ".metrics.road",
}

__all__ = sorted(["CAManimError", *_WHERE])
__version__ = "0.1.0"


_SUBPACKAGES = ("cli", "core", "engine", "lightning", "methods", "metrics", "runs", "viewer",
                "viz")


def __getattr__(name: str) -> Any:
    """Import a public name on first use (``camanim.CAManim`` loads the
    engine); ``camanim.core`` and the other stages import as attributes too."""
    if name in _SUBPACKAGES:   # as before lazy imports: every stage's public modules loaded
        for public in _WHERE:
            __getattr__(public)
        return importlib.import_module(f".{name}", __name__)
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'camanim' has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value          # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
