"""camanim: class activation maps through every layer of a CNN (CAManim),
ROAD for every layer (ybROAD), and both during training."""

from .errors import CAManimError
from .layers import LayerInfo, LayerTable, list_layers
from .maps import LayerMaps

__all__ = ["CAManimError", "LayerInfo", "LayerTable", "LayerMaps", "list_layers"]
__version__ = "0.1.0"
