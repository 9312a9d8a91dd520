"""camanim: class activation maps through every layer of a CNN (CAManim),
ROAD for every layer (ybROAD), and both during training."""

from .cam import CAManim
from .errors import CAManimError
from .layers import LayerInfo, LayerTable, list_layers
from .maps import LayerMaps
from .methods import get_method, method_names

__all__ = ["CAManim", "CAManimError", "LayerInfo", "LayerTable", "LayerMaps",
           "get_method", "list_layers", "method_names"]
__version__ = "0.1.0"
