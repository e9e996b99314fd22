"""One-step recurrent cells: every activation pluggable, torch's weights and call signatures."""

from .base import RecurrentCell
from .elman import ElmanCell
from .gated_state import GatedStateCell
from .gru import GRUCell
from .lstm import VARIANTS, LSTMCell

__all__ = ["RecurrentCell", "ElmanCell", "LSTMCell", "GRUCell", "GatedStateCell", "VARIANTS"]
