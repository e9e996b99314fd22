"""Keras 3 interchange: from_keras on a grid of Keras layers and activations (outputs and final states
equal Keras' to 1e-5, float32), to_keras back, and the errors for what does not carry over."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

import gatelab
from gatelab.keras import ACTIVATIONS, Backwards

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")  # the keras extra (make setup installs it)
# Keras 3.15 itself warns under numpy 2 when its variables are read (get_weights): not gatelab's
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

RNG = np.random.default_rng(0)
X = RNG.normal(size=(3, 9, 4)).astype("float32")

GRID = [  # (Keras class, options)
    *[(keras.layers.LSTM, {"activation": a, "recurrent_activation": r})
      for a, r in (("tanh", "sigmoid"), ("relu", "hard_sigmoid"), ("softsign", "sigmoid"), ("elu", "tanh"),
                   ("linear", "hard_sigmoid"), ("gelu", "sigmoid"), ("silu", "sigmoid"), ("leaky_relu", "sigmoid"))],
    (keras.layers.LSTM, {"use_bias": False}),
    (keras.layers.LSTM, {"go_backwards": True, "activation": "selu"}),
    *[(keras.layers.GRU, {"reset_after": ra, "activation": a, "recurrent_activation": r})
      for ra in (True, False) for a, r in (("tanh", "sigmoid"), ("relu", "hard_sigmoid"), ("softplus", "sigmoid"))],
    (keras.layers.GRU, {"use_bias": False, "reset_after": False}),
    (keras.layers.GRU, {"go_backwards": True}),
    *[(keras.layers.SimpleRNN, {"activation": a}) for a in ("tanh", "relu", "softsign", "hard_tanh", "swish")],
    (keras.layers.SimpleRNN, {"use_bias": False, "go_backwards": True}),
]


def _keras_layer(cls, options, seed):
    layer = cls(5, return_sequences=True, return_state=True, **options)
    layer.build((None, None, X.shape[2]))
    g = np.random.default_rng(seed)  # every weight random, biases too (Keras initialises them to zero)
    layer.set_weights([g.normal(scale=0.4, size=w.shape).astype("float32") for w in layer.get_weights()])
    return layer


def _keras_outputs(layer, x):
    return [np.asarray(o.detach().cpu()) for o in layer(x)]


@pytest.mark.parametrize(("cls", "options"), GRID, ids=lambda v: v.__name__ if isinstance(v, type) else
                         ",".join(f"{k}={w}" for k, w in v.items()) or "defaults")
def test_from_keras_gives_keras_outputs_and_states(cls, options):
    layer = _keras_layer(cls, options, seed=len(options))
    want = _keras_outputs(layer, X)
    ours = gatelab.from_keras(layer)
    assert isinstance(ours, Backwards) == bool(options.get("go_backwards"))
    out, hn = ours(torch.from_numpy(X))
    hn = hn if isinstance(hn, tuple) else (hn,)
    np.testing.assert_allclose(out.detach().numpy(), want[0], rtol=0, atol=1e-5)
    for ours_h, keras_h in zip(hn, want[1:]):
        np.testing.assert_allclose(ours_h[0].detach().numpy(), keras_h, rtol=0, atol=1e-5)
    inner = ours.layer if isinstance(ours, Backwards) else ours
    assert inner.batch_first and inner.bias == options.get("use_bias", True)


@pytest.mark.parametrize(("cls", "options"), GRID[::2] + [g for g in GRID if g[1].get("go_backwards")],
                         ids=lambda v: v.__name__ if isinstance(v, type) else ",".join(f"{k}={w}" for k, w in v.items()))
def test_to_keras_inverts_from_keras(cls, options):
    layer = _keras_layer(cls, options, seed=7)
    want = _keras_outputs(layer, X)
    back = gatelab.to_keras(gatelab.from_keras(layer), return_state=True)
    assert type(back) is cls
    for a, b in zip(_keras_outputs(back, X), want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_to_keras_of_a_gatelab_layer_with_both_biases_equals_it():
    torch.manual_seed(0)
    for ours in (gatelab.LSTM(4, 5, batch_first=True, gate_activation="hard_sigmoid", candidate_activation="relu",
                              cell_activation="relu"),
                 gatelab.GRU(4, 5, batch_first=True, reset_after=False, candidate_activation="softsign"),
                 gatelab.RNN(4, 5, batch_first=True, nonlinearity="relu")):
        back = gatelab.to_keras(ours, return_state=True)
        out, hn = ours(torch.from_numpy(X))
        got = _keras_outputs(back, X)
        np.testing.assert_allclose(got[0], out.detach().numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(got[1], (hn[0] if isinstance(hn, tuple) else hn)[0].detach().numpy(), rtol=0,
                                   atol=1e-5)


def test_what_does_not_carry_over_is_named():
    with pytest.raises(ValueError, match="not built yet"):
        gatelab.from_keras(keras.layers.LSTM(3))
    with pytest.raises(TypeError, match="expected a keras.layers.LSTM, GRU or SimpleRNN, got Dense"):
        gatelab.from_keras(keras.layers.Dense(3))
    odd = keras.layers.SimpleRNN(3, activation="relu6")
    odd.build((None, None, 2))
    with pytest.raises(ValueError, match="SimpleRNN's activation 'relu6' has no gatelab counterpart"):
        gatelab.from_keras(odd)
    with pytest.raises(ValueError, match="Keras takes one recurrent_activation for the i, f, o gates"):
        gatelab.to_keras(gatelab.LSTM(2, 3, gate_activation={"i": "hard_sigmoid"}))
    with pytest.raises(ValueError, match="phi tanh, psi relu"):
        gatelab.to_keras(gatelab.LSTM(2, 3, cell_activation="relu"))
    with pytest.raises(ValueError, match="2 layer"):
        gatelab.to_keras(gatelab.GRU(2, 3, 2))
    with pytest.raises(ValueError, match="elliott, which Keras does not have"):
        gatelab.to_keras(gatelab.RNN(2, 3, nonlinearity="elliott"))
    with pytest.raises(ValueError, match="differs from Keras' layer: peephole"):
        gatelab.to_keras(gatelab.LSTM(2, 3, peephole=True))
    with pytest.raises(ValueError, match="options Keras' layer does not: zoneout"):
        gatelab.to_keras(gatelab.GRU(2, 3, zoneout=0.1))
    assert set(ACTIVATIONS.values()) <= set(gatelab.activations.available()) | {"leaky_relu:0.2"}


def test_without_keras_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras", None)  # import keras raises ImportError
    with pytest.raises(gatelab.tasks.MissingExtraError, match=r"pip install 'gatelab\[keras\]'"):
        gatelab.to_keras(gatelab.GRU(2, 3))
