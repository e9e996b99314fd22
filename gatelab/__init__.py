"""gatelab: gated recurrent networks in which every activation inside every gate is pluggable."""

from . import activations, callbacks, checkpoint, config, data, diagnostics, engines, export, init, models, onnx, tasks, train
from ._version import __version__
from .callbacks import Callback
from .cells import ElmanCell, GatedStateCell, GRUCell, IndRNNCell, LSTMCell, MinGRUCell, MinLSTMCell, SLSTMCell
from .config import ExperimentConfig, ModelConfig, TaskConfig, TrainConfig
from .keras import from_keras, to_keras
from .layers import GRU, LSTM, RNN, SLSTM, GatedStateRNN, IndRNN, MinGRU, MinLSTM
from .models import SequenceModel, build_model
from .train import cross_validate, evaluate, fit

__all__ = [
    "activations", "engines", "init", "tasks",
    "ElmanCell", "LSTMCell", "GRUCell", "GatedStateCell",
    "RNN", "LSTM", "GRU", "GatedStateRNN",
    "MinGRUCell", "MinLSTMCell", "IndRNNCell", "SLSTMCell", "MinGRU", "MinLSTM", "IndRNN", "SLSTM",
    "callbacks", "checkpoint", "config", "data", "diagnostics", "export", "models", "onnx", "train",
    "Callback", "ExperimentConfig", "TaskConfig", "ModelConfig", "TrainConfig",
    "SequenceModel", "build_model", "fit", "cross_validate", "evaluate", "from_keras", "to_keras",
    "__version__",
]
