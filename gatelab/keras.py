"""Keras 3 interchange: :func:`from_keras` turns a Keras ``LSTM``, ``GRU`` or ``SimpleRNN`` into the
equivalent gatelab layer with its weights; :func:`to_keras` goes the other way where Keras can express
the layer.

The correspondence (Keras' formulas are those of ``keras.layers.LSTMCell`` / ``GRUCell`` /
``SimpleRNNCell``):

* activations: Keras' ``recurrent_activation`` is every gate's (``gate_activation``); its
  ``activation`` is the LSTM's candidate φ *and* cell activation ψ (one argument for both), the GRU's
  candidate, the Elman network's recurrence. Names map as in :data:`ACTIVATIONS`; Keras'
  ``hard_sigmoid`` is ``relu6(x + 3) / 6``, gatelab's (and torch's) ``hard_sigmoid``, and its
  ``leaky_relu`` has slope 0.2.
* weights: Keras' ``kernel (I, G·H)`` and ``recurrent_kernel (H, G·H)`` are torch's ``weight_ih`` and
  ``weight_hh`` transposed. The LSTM's gate order ``i f c o`` is torch's; the GRU's ``z r h`` is torch's
  ``r z n`` reordered. Keras has one input-side bias: it becomes ``bias_ih`` with ``bias_hh = 0``
  (the GRU with ``reset_after=True`` has both, as torch).
* ``reset_after``: both of Keras' GRU forms (``True`` is torch's, ``False`` is Cho et al. 2014's,
  gatelab's ``reset_after=False``).
* ``go_backwards``: the layer reads the sequence from its end and returns its outputs in that order,
  as Keras does (:class:`Backwards`); padded input is not supported there.
* the layer is batch-first like Keras; ``dropout`` and ``recurrent_dropout`` become gatelab's
  ``input_dropout`` and ``recurrent_dropout`` (one mask per sequence, as Keras).

keras is optional (``pip install 'gatelab[keras]'``); the backend does not matter (weights move as
numpy arrays), and ``KERAS_BACKEND`` defaults to ``torch`` when unset.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .layers import GRU, LSTM, RNN, RecurrentLayer
from .tasks.base import MissingExtraError

ACTIVATIONS = {  # Keras name -> gatelab spec
    "sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "hard_sigmoid": "hard_sigmoid", "linear": "identity",
    "softsign": "softsign", "elu": "elu", "selu": "selu", "gelu": "gelu", "silu": "silu", "swish": "silu",
    "softplus": "softplus", "leaky_relu": "leaky_relu:0.2", "hard_tanh": "hardtanh",
}
TO_KERAS = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "hard_sigmoid": "hard_sigmoid",
            "identity": "linear", "softsign": "softsign", "elu": "elu", "selu": "selu", "gelu": "gelu",
            "silu": "silu", "softplus": "softplus", "leaky_relu:0.2": "leaky_relu", "hardtanh": "hard_tanh"}


def _keras() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as err:
        raise MissingExtraError("gatelab.from_keras / to_keras need keras 3, gatelab's keras extra: "
                                "pip install 'gatelab[keras]'") from err
    return keras


class Backwards(nn.Module):
    """A batch-first layer run over the time-reversed sequence, its outputs left in the order it
    produced them (Keras' ``go_backwards=True``). ``layer`` is the gatelab layer inside."""

    def __init__(self, layer: RecurrentLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor, hx: Any = None) -> tuple[Tensor, Any]:
        return self.layer(torch.flip(x, [1]), hx)


def _swap_first_blocks(H: int) -> np.ndarray:
    """Row order that swaps the first two of three H-row gate blocks (its own inverse)."""
    return np.concatenate([np.arange(H, 2 * H), np.arange(0, H), np.arange(2 * H, 3 * H)])


def _activation(name: Any, what: str, layer: str) -> str:
    key = name if isinstance(name, str) else getattr(name, "__name__", repr(name))
    if key not in ACTIVATIONS:
        raise ValueError(f"from_keras: {layer}'s {what} {key!r} has no gatelab counterpart; supported: "
                         f"{', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[key]


def from_keras(layer: Any) -> RecurrentLayer | Backwards:
    """The gatelab layer (batch-first) equal to a built Keras 3 ``LSTM``, ``GRU`` or ``SimpleRNN``, with
    its weights; a ``go_backwards`` layer comes wrapped in :class:`Backwards`. Its outputs equal Keras'
    (``return_sequences=True`` gives ``out``; ``return_state=True`` the final state ``h_n[0]``,
    ``c_n[0]``)."""
    keras = _keras()
    kinds = {keras.layers.LSTM: "LSTM", keras.layers.GRU: "GRU", keras.layers.SimpleRNN: "SimpleRNN"}
    kind = next((k for cls, k in kinds.items() if type(layer) is cls), None)
    if kind is None:
        raise TypeError(f"from_keras: expected a keras.layers.LSTM, GRU or SimpleRNN, got {type(layer).__name__}")
    if not layer.built:
        raise ValueError(f"from_keras: the Keras {kind} is not built yet (call it on an input or build(input_shape) "
                         f"first): its input size is unknown")
    cfg = layer.get_config()
    with warnings.catch_warnings():  # Keras' own numpy-2 deprecation notice, not the caller's to act on
        warnings.simplefilter("ignore", DeprecationWarning)
        weights = [np.asarray(w, dtype=np.float32) for w in layer.get_weights()]
    kernel, recurrent = weights[0], weights[1]
    I, H = kernel.shape[0], cfg["units"]
    bias = cfg["use_bias"]
    common = {"bias": bias, "batch_first": True, "input_dropout": float(cfg.get("dropout", 0.0)),
              "recurrent_dropout": float(cfg.get("recurrent_dropout", 0.0))}
    act = _activation(cfg["activation"], "activation", kind)
    if kind == "LSTM":
        out: RecurrentLayer = LSTM(I, H, gate_activation=_activation(cfg["recurrent_activation"],
                                                                     "recurrent_activation", kind),
                                   candidate_activation=act, cell_activation=act, **common)
        w_ih, w_hh = kernel.T, recurrent.T  # gate order i f c o is torch's
        b_ih, b_hh = (weights[2], np.zeros_like(weights[2])) if bias else (None, None)
    elif kind == "GRU":
        out = GRU(I, H, gate_activation=_activation(cfg["recurrent_activation"], "recurrent_activation", kind),
                  candidate_activation=act, reset_after=cfg["reset_after"], **common)
        order = _swap_first_blocks(H)  # Keras' z r h -> torch's r z n
        w_ih, w_hh = kernel[:, order].T, recurrent[:, order].T
        if not bias:
            b_ih = b_hh = None
        elif cfg["reset_after"]:
            b_ih, b_hh = weights[2][0][order], weights[2][1][order]
        else:
            b_ih, b_hh = weights[2][order], np.zeros(3 * H, dtype=np.float32)
    else:
        out = RNN(I, H, nonlinearity=act, **common)
        w_ih, w_hh = kernel.T, recurrent.T
        b_ih, b_hh = (weights[2], np.zeros_like(weights[2])) if bias else (None, None)
    state = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh}
    if bias:
        state.update(bias_ih_l0=b_ih, bias_hh_l0=b_hh)
    with torch.no_grad():
        for name, value in state.items():
            getattr(out, name).copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return Backwards(out) if cfg.get("go_backwards") else out


def _keras_activation(spec: Any, what: str, owner: str) -> str:
    key = getattr(spec, "key", None)
    if key not in TO_KERAS:
        raise ValueError(f"to_keras: {owner}'s {what} is {key or type(spec).__name__}, which Keras does not have; "
                         f"Keras takes {', '.join(sorted(TO_KERAS))}")
    return TO_KERAS[key]


def to_keras(layer: RecurrentLayer | Backwards, *, return_sequences: bool = True, return_state: bool = False) -> Any:
    """A built Keras 3 layer equal to a one-layer, unidirectional gatelab ``LSTM``, ``GRU`` or ``RNN``
    whose options Keras has (Keras' single ``activation`` is the LSTM's φ and ψ, and all gates share one
    ``recurrent_activation``; no peepholes, projection, layer norm, zoneout or residual); a
    :class:`Backwards` (what :func:`from_keras` gives for ``go_backwards``) becomes ``go_backwards=True``.
    Raises ``ValueError`` naming what Keras cannot express."""
    keras = _keras()
    backwards = isinstance(layer, Backwards)
    if backwards:
        layer = layer.layer
    if not isinstance(layer, (LSTM, GRU, RNN)):
        raise TypeError(f"to_keras: expected a gatelab LSTM, GRU or RNN, got {type(layer).__name__}")
    owner = layer.kind_name
    if layer.num_layers != 1 or layer.bidirectional:
        raise ValueError(f"to_keras: {owner} has {layer.num_layers} layer(s), bidirectional={layer.bidirectional}; "
                         f"Keras' layer is one unidirectional layer (stack them, or wrap in keras.layers.Bidirectional)")
    extras = [e for e in layer.extra_options() if not e.startswith(("input_dropout=", "recurrent_dropout="))]
    if extras:
        raise ValueError(f"to_keras: {owner} has options Keras' layer does not: {', '.join(extras)}")
    cell = layer.cells[0]
    slots = cell.activation_slots()
    # what differs from torch's layer, but for what Keras has too: other activations, reset-before
    differences = [d for d in cell.torch_differences() if "activation" not in d and not d.startswith("reset_after")]
    if differences:
        raise ValueError(f"to_keras: {owner} differs from Keras' layer: {'; '.join(differences)}")
    H, I = layer.hidden_size, layer.input_size
    sd = {k: v.detach().cpu().numpy() for k, v in layer.state_dict().items()}
    common = {"units": H, "use_bias": layer.bias, "return_sequences": return_sequences,
              "return_state": return_state, "dropout": layer.input_dropout, "recurrent_dropout": layer.recurrent_dropout,
              "go_backwards": backwards}
    if isinstance(layer, LSTM):
        gates = {_keras_activation(slots[s], s, owner) for s in ("sigma_i", "sigma_f", "sigma_o")}
        phi, psi = _keras_activation(slots["phi"], "phi", owner), _keras_activation(slots["psi"], "psi", owner)
        if len(gates) != 1 or phi != psi:
            raise ValueError(f"to_keras: {owner}: Keras takes one recurrent_activation for the i, f, o gates and one "
                             f"activation for phi and psi; here gates {sorted(gates)}, phi {phi}, psi {psi}")
        out = keras.layers.LSTM(activation=phi, recurrent_activation=gates.pop(), unit_forget_bias=False, **common)
        weights = [sd["weight_ih_l0"].T, sd["weight_hh_l0"].T]
        if layer.bias:
            weights.append(sd["bias_ih_l0"] + sd["bias_hh_l0"])
    elif isinstance(layer, GRU):
        gates = {_keras_activation(slots[s], s, owner) for s in ("sigma_r", "sigma_z")}
        if len(gates) != 1:
            raise ValueError(f"to_keras: {owner}: Keras takes one recurrent_activation for the r and z gates; here "
                             f"{sorted(gates)}")
        phi = _keras_activation(slots["phi"], "phi", owner)
        reset_after = cell.reset_after
        out = keras.layers.GRU(activation=phi, recurrent_activation=gates.pop(), reset_after=reset_after, **common)
        order = _swap_first_blocks(H)  # torch's r z n -> Keras' z r h
        weights = [sd["weight_ih_l0"][order].T, sd["weight_hh_l0"][order].T]
        if layer.bias:
            b_ih, b_hh = sd["bias_ih_l0"][order], sd["bias_hh_l0"][order]
            # reset-before: b_hn is added after the product with r·h, so it joins the input-side bias
            weights.append(np.stack([b_ih, b_hh]) if reset_after else b_ih + b_hh)
    else:
        out = keras.layers.SimpleRNN(activation=_keras_activation(slots["phi"], "phi", owner), **common)
        weights = [sd["weight_ih_l0"].T, sd["weight_hh_l0"].T]
        if layer.bias:
            weights.append(sd["bias_ih_l0"] + sd["bias_hh_l0"])
    out.build((None, None, I))
    out.set_weights([np.ascontiguousarray(w, dtype=np.float32) for w in weights])
    return out


__all__ = ["ACTIVATIONS", "Backwards", "from_keras", "to_keras"]
