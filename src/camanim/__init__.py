"""camanim: class activation maps through every layer of a CNN (CAManim),
ROAD for every layer (ybROAD), and both during training."""

from .callback import CAManimCallback, energy_pointing_game
from .cam import CAManim
from .errors import CAManimError
from .figures import contact_sheet, plot_params, run_summary
from .images import IMAGENET_MEAN, IMAGENET_STD, load_image
from .layers import LayerInfo, LayerTable, list_layers
from .maps import LayerMaps
from .methods import get_method, method_names
from .methods.integrated_gradcam import integrated_gradcam
from .methods.sise import ExplanationMaps, ada_sise, sise
from .render import render_frames
from .road import RoadSummary, YbRoad, ybroad
from .study import study
from .video import encode_gif, write_frames, write_video

__all__ = [
    "CAManim", "CAManimCallback", "CAManimError", "ExplanationMaps", "IMAGENET_MEAN", "IMAGENET_STD",
    "LayerInfo", "LayerMaps", "LayerTable", "RoadSummary", "YbRoad", "ada_sise",
    "contact_sheet", "encode_gif", "energy_pointing_game", "get_method", "integrated_gradcam", "list_layers",
    "load_image", "method_names", "plot_params", "render_frames", "run_summary", "sise", "study",
    "write_frames", "write_video", "ybroad",
]
__version__ = "0.1.0"
