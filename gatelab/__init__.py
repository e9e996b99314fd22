"""gatelab: gated recurrent networks in which every activation inside every gate is pluggable."""

from . import activations, engines, init, tasks
from .cells import ElmanCell, GatedStateCell, GRUCell, LSTMCell
from .layers import GRU, LSTM, RNN, GatedStateRNN

__version__ = "0.1.0"

__all__ = [
    "activations", "engines", "init", "tasks",
    "ElmanCell", "LSTMCell", "GRUCell", "GatedStateCell",
    "RNN", "LSTM", "GRU", "GatedStateRNN",
    "__version__",
]
