"""One-step recurrent cells: every activation pluggable, torch's weights and call signatures."""

from . import registry
from .base import RecurrentCell, Slot
from .elman import ElmanCell
from .gated_state import GatedStateCell
from .gru import GRUCell
from .indrnn import IndRNNCell
from .lstm import VARIANTS, LSTMCell
from .min_rnn import MinGRUCell, MinLSTMCell
from .slstm import SLSTMCell

__all__ = ["RecurrentCell", "Slot", "ElmanCell", "LSTMCell", "GRUCell", "GatedStateCell", "VARIANTS", "registry",
           "MinGRUCell", "MinLSTMCell", "IndRNNCell", "SLSTMCell"]
