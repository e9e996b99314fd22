"""Sequence layers: drop-in replacements for torch.nn.RNN, LSTM and GRU, and GatedStateRNN."""

from .base import DirectionCall, RecurrentLayer
from .modern import SLSTM, IndRNN, MinGRU, MinLSTM
from .rnn import GRU, LSTM, RNN, GatedStateRNN

__all__ = ["RecurrentLayer", "DirectionCall", "RNN", "LSTM", "GRU", "GatedStateRNN", "MinGRU", "MinLSTM", "IndRNN", "SLSTM"]
