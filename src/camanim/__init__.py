"""camanim: class activation maps through every layer of a CNN (CAManim),
ROAD for every layer (ybROAD), and both during training."""

from .core.images import IMAGENET_MEAN, IMAGENET_STD, load_image
from .core.layers import LayerInfo, LayerTable, list_layers
from .core.maps import LayerMaps
from .engine import CAManim
from .errors import CAManimError
from .lightning.callback import CAManimCallback
from .lightning.options import ConvergenceOptions, MediaOptions, RoadOptions, VideoOptions
from .methods import get_method, method_names
from .methods.integrated_gradcam import integrated_gradcam
from .methods.sise import ExplanationMaps, ada_sise, sise
from .metrics.pointing import energy_pointing_game
from .metrics.road import RoadSummary, YbRoad, ybroad
from .metrics.sanity import SanityReport, sanity_check
from .runs.study import study
from .viz.figures import contact_sheet, plot_params, run_summary
from .viz.render import render_frames
from .viz.video import encode_gif, write_frames, write_video

__all__ = [
    "CAManim",
    "CAManimCallback",
    "CAManimError",
    "ConvergenceOptions",
    "MediaOptions",
    "RoadOptions",
    "VideoOptions",
    "ExplanationMaps",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LayerInfo",
    "LayerMaps",
    "LayerTable",
    "RoadSummary",
    "SanityReport",
    "YbRoad",
    "ada_sise",
    "contact_sheet",
    "encode_gif",
    "energy_pointing_game",
    "get_method",
    "integrated_gradcam",
    "list_layers",
    "load_image",
    "method_names",
    "plot_params",
    "render_frames",
    "run_summary",
    "sanity_check",
    "sise",
    "study",
    "write_frames",
    "write_video",
    "ybroad",
]
__version__ = "0.1.0"
