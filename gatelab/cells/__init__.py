"""One-step recurrent cells: every activation pluggable, torch's weights and call signatures."""

from . import registry
from .base import RecurrentCell, Slot
from .elman import ElmanCell
from .gated_state import GatedStateCell
from .gru import GRUCell
from .lstm import VARIANTS, LSTMCell

__all__ = ["RecurrentCell", "Slot", "ElmanCell", "LSTMCell", "GRUCell", "GatedStateCell", "VARIANTS", "registry"]
