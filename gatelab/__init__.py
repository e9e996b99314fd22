"""gatelab: gated recurrent networks in which every activation inside every gate is pluggable."""

from . import activations
from .cells import ElmanCell, GatedStateCell, GRUCell, LSTMCell

__version__ = "0.1.0"

__all__ = ["activations", "ElmanCell", "LSTMCell", "GRUCell", "GatedStateCell", "__version__"]
