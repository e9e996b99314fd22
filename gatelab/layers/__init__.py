"""Sequence layers: drop-in replacements for torch.nn.RNN, LSTM and GRU, and GatedStateRNN."""

from .base import RecurrentLayer
from .rnn import GRU, LSTM, RNN, GatedStateRNN

__all__ = ["RecurrentLayer", "RNN", "LSTM", "GRU", "GatedStateRNN"]
