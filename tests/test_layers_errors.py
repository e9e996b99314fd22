"""Bad input to the layers (SPEC §3; issue 3): clear ValueError/TypeError naming what was expected and what came."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import gatelab

F64 = torch.float64
I, H, T, B = 3, 4, 5, 2
LAYERS = [gatelab.RNN, gatelab.LSTM, gatelab.GRU, gatelab.GatedStateRNN]
IDS = [c.__name__ for c in LAYERS]


def _x(*shape, dtype=F64):
    return torch.randn(*shape, dtype=dtype)


# -- input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("cls", LAYERS, ids=IDS)
@pytest.mark.parametrize("shape", [(I,), (T, B, 1, I)], ids=["1d", "4d"])
def test_wrong_rank(cls, shape, backend):
    layer = _layer(cls, backend)
    with pytest.raises(ValueError, match=rf"{cls.__name__}: expected input of shape \(seq, batch, features\) or "
                                         rf"unbatched \(seq, features\), got {_shape(shape)}"):
        layer(_x(*shape))


def test_wrong_rank_names_batch_first_layout():
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, seq, features\).*got \(5,\)"):
        gatelab.GRU(I, H, batch_first=True, dtype=F64)(_x(T))


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("cls", LAYERS, ids=IDS)
@pytest.mark.parametrize("shape", [(T, B, I + 1), (T, I - 1)], ids=["batched", "unbatched"])
def test_wrong_feature_size(cls, shape, backend):
    layer = _layer(cls, backend)
    with pytest.raises(ValueError, match=rf"{cls.__name__}: expected {I} input features \(input_size\), "
                                         rf"got shape {_shape(shape)}"):
        layer(_x(*shape))


def test_wrong_feature_size_packed():
    packed = pack_padded_sequence(_x(T, B, I + 2), [T, 2], enforce_sorted=False)
    with pytest.raises(ValueError, match=rf"expected {I} input features \(input_size\), got shape \({T}, {B}, {I + 2}\)"):
        gatelab.LSTM(I, H, dtype=F64)(packed)


def test_input_not_a_tensor():
    with pytest.raises(TypeError, match="input must be a Tensor or PackedSequence, got list"):
        gatelab.LSTM(I, H)([[0.0] * I] * T)


@pytest.mark.parametrize("cls", LAYERS, ids=IDS)
def test_input_dtype_mismatch(cls):
    layer = cls(I, H, dtype=F64)
    with pytest.raises(ValueError, match=rf"{cls.__name__}: input is torch.float32 on cpu, parameters are torch.float64"):
        layer(_x(T, B, I, dtype=torch.float32))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_packed_input_dtype_mismatch(backend):
    layer = gatelab.LSTM(I, H, dtype=F64, backend=backend)
    packed = pack_padded_sequence(_x(T, B, I, dtype=torch.float32), [T, 3], enforce_sorted=False)
    with pytest.raises(ValueError, match="input is torch.float32 on cpu, parameters are torch.float64"):
        layer(packed)


# -- initial state --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("cls", [gatelab.RNN, gatelab.GRU], ids=["RNN", "GRU"])
@pytest.mark.parametrize("bad", [(1, B, H), (4, B + 1, H), (4, B, H + 1), (4, H)], ids=["layers", "batch", "size", "rank"])
def test_h0_wrong_shape(cls, bad, backend):
    layer = cls(I, H, 2, bidirectional=True, dtype=F64, backend=backend)
    with pytest.raises(ValueError, match=rf"{cls.__name__}: expected h0 of shape \(4, {B}, {H}\) \(layers·directions, "
                                         rf"batch, {H}\), got {_shape(bad)}"):
        layer(_x(T, B, I), _x(*bad))


def test_gated_state_s0_wrong_shape():
    with pytest.raises(ValueError, match=rf"expected s0 of shape \(1, {B}, {H}\).*got \(1, {B}, {H + 1}\)"):
        gatelab.GatedStateRNN(I, H, dtype=F64)(_x(T, B, I), _x(1, B, H + 1))


def test_h0_of_unbatched_input_is_unbatched():
    with pytest.raises(ValueError, match=rf"expected h0 of shape \(1, {H}\).*got \(1, 1, {H}\)"):
        gatelab.GRU(I, H, dtype=F64)(_x(T, I), _x(1, 1, H))


@pytest.mark.parametrize("which,bad", [("h0", (2, B, H)), ("c0", (2, B, 2))])
def test_lstm_state_wrong_shape_with_proj(which, bad):
    """With proj_size=2, h0 is (L·D, B, 2) and c0 is (L·D, B, H)."""
    layer = gatelab.LSTM(I, H, 2, proj_size=2, dtype=F64)
    h0, c0 = _x(2, B, 2), _x(2, B, H)
    if which == "h0":
        h0 = _x(*bad)
        want = rf"expected h0 of shape \(2, {B}, 2\)"
    else:
        c0 = _x(*bad)
        want = rf"expected c0 of shape \(2, {B}, {H}\)"
    with pytest.raises(ValueError, match=rf"{want} \(layers·directions, batch, \d\), got {_shape(bad)}"):
        layer(_x(T, B, I), (h0, c0))


@pytest.mark.parametrize("hx,got", [
    (lambda: _x(1, B, H), "Tensor"),
    (lambda: (_x(1, B, H),), "tuple of 1"),
    (lambda: (_x(1, B, H), _x(1, B, H), _x(1, B, H)), "tuple of 3"),
    (lambda: [_x(1, B, H)], "list of 1"),
])
def test_lstm_state_wrong_arity(hx, got):
    with pytest.raises(ValueError, match=rf"LSTM: expected the initial state as a tuple \(h, c\), got {got}"):
        gatelab.LSTM(I, H, dtype=F64)(_x(T, B, I), hx())


def test_rnn_state_given_as_pair():
    with pytest.raises(ValueError, match=r"GRU: expected the initial state as h, got tuple of 2"):
        gatelab.GRU(I, H, dtype=F64)(_x(T, B, I), (_x(1, B, H), _x(1, B, H)))


def test_h0_dtype_mismatch():
    with pytest.raises(ValueError, match="LSTM: h0 is torch.float32 on cpu, input is torch.float64 on cpu"):
        gatelab.LSTM(I, H, dtype=F64)(_x(T, B, I), (_x(1, B, H, dtype=torch.float32), _x(1, B, H)))


def test_h0_not_a_tensor():
    with pytest.raises(ValueError, match=r"expected c0 of shape \(1, 2, 4\).*got list"):
        gatelab.LSTM(I, H, dtype=F64)(_x(T, B, I), (_x(1, B, H), [[0.0]]))


# -- lengths --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("lengths,got", [([0, 3], "min 0, max 3"), ([T + 1, 2], f"min 2, max {T + 1}")],
                         ids=["zero", "too_long"])
def test_lengths_out_of_range(lengths, got, backend):
    layer = gatelab.LSTM(I, H, dtype=F64, backend=backend)
    with pytest.raises(ValueError, match=rf"LSTM: every length must be in 1..{T} \(the sequence length\), got {got}"):
        layer(_x(T, B, I), lengths=torch.tensor(lengths))


@pytest.mark.parametrize("lengths,got", [
    (torch.tensor([3]), r"\(1,\) torch.int64"),
    (torch.tensor([3, 2, 1]), r"\(3,\) torch.int64"),
    (torch.tensor([3.0, 2.0]), r"\(2,\) torch.float32"),
    (torch.tensor([[3, 2]]), r"\(1, 2\) torch.int64"),
])
def test_lengths_wrong_count_or_type(lengths, got):
    with pytest.raises(ValueError, match=rf"GRU: expected lengths as {B} integers \(one per sequence\), got {got}"):
        gatelab.GRU(I, H, dtype=F64)(_x(T, B, I), lengths=lengths)


def test_lengths_counted_along_batch_first():
    """With batch_first the sequence length is dim 1: T + 1 is too long even though B > T."""
    layer = gatelab.GRU(I, H, batch_first=True, dtype=F64)
    layer(_x(T + 2, T, I), lengths=torch.full((T + 2,), T))
    with pytest.raises(ValueError, match=rf"every length must be in 1..{T} \(the sequence length\)"):
        layer(_x(T + 2, T, I), lengths=torch.full((T + 2,), T + 1))


def test_lengths_with_packed_sequence():
    packed = pack_padded_sequence(_x(T, B, I), [T, 2], enforce_sorted=False)
    with pytest.raises(ValueError, match="lengths are given by the PackedSequence; do not pass lengths too"):
        gatelab.GRU(I, H, dtype=F64)(packed, lengths=torch.tensor([T, 2]))


# -- constructor ----------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["dropout", "input_dropout", "recurrent_dropout", "weight_dropout", "zoneout"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_rates_outside_unit_interval(option, value):
    with pytest.raises(ValueError, match=rf"LSTM: {option} must be a probability in \[0, 1\), got {value}"):
        gatelab.LSTM(I, H, 2, **{option: value})


@pytest.mark.parametrize("value", ["0.5", True, None])
def test_rate_of_wrong_type(value):
    with pytest.raises(ValueError, match=rf"GRU: dropout must be a probability in \[0, 1\), got {value!r}"):
        gatelab.GRU(I, H, 2, dropout=value)


def test_zoneout_tuple_of_wrong_length():
    with pytest.raises(ValueError, match=r"LSTM: zoneout takes one rate or one per state \(h, c\), got \(0.1, 0.2, 0.3\)"):
        gatelab.LSTM(I, H, zoneout=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match=r"zoneout must be a probability in \[0, 1\), got 1.2"):
        gatelab.LSTM(I, H, zoneout=(0.1, 1.2))


def test_dropout_with_one_layer_warns_like_torch():
    with pytest.warns(UserWarning, match="dropout=0.5 acts between layers and num_layers=1"):
        gatelab.GRU(I, H, dropout=0.5)


@pytest.mark.parametrize("proj", [H, H + 1])
def test_proj_size_not_below_hidden_size(proj):
    with pytest.raises(ValueError, match=rf"proj_size must be smaller than hidden_size \({H}\), got {proj}"):
        gatelab.LSTM(I, H, proj_size=proj)


def test_proj_size_negative():
    with pytest.raises(ValueError, match=r"proj_size must be positive, got -1"):
        gatelab.LSTM(I, H, proj_size=-1)


@pytest.mark.parametrize("name,value,exc,msg", [
    ("input_size", 0, ValueError, "input_size must be positive, got 0"),
    ("hidden_size", -2, ValueError, "hidden_size must be positive, got -2"),
    ("num_layers", 0, ValueError, "num_layers must be positive, got 0"),
    ("hidden_size", 4.0, TypeError, "hidden_size must be an int, got float"),
])
def test_sizes(name, value, exc, msg):
    kw = {"input_size": I, "hidden_size": H, "num_layers": 1} | {name: value}
    with pytest.raises(exc, match=msg):
        gatelab.GRU(**kw)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_residual_mismatch_without_projection(bidirectional):
    D = 2 if bidirectional else 1
    with pytest.raises(ValueError, match=rf"GRU: residual=True adds each layer's input to its output; layer 0's input "
                                         rf"has {I} features and its output {D * H}"):
        gatelab.GRU(I, H, 2, bidirectional=bidirectional, residual=True, residual_projection=False)
    gatelab.GRU(D * H, H, 2, bidirectional=bidirectional, residual=True, residual_projection=False)  # sizes match


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"LSTM: unknown backend 'cudnn'; valid: auto, (?=.*native)(?=.*reference)"):
        gatelab.LSTM(I, H, backend="cudnn")


def test_unknown_init():
    with pytest.raises(ValueError, match=r"GRU: unknown init 'xavier'; valid: torch, orthogonal, identity, chrono"):
        gatelab.GRU(I, H, init="xavier")


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown activation 'swishy'; valid names: .*hard_sigmoid.*sigmoid.*tanh"):
        gatelab.LSTM(I, H, gate_activation="swishy")


def test_unknown_gate_name():
    with pytest.raises(ValueError, match=r"GRUCell has gates r, z; gate_activation names 'f'"):
        gatelab.GRU(I, H, gate_activation={"f": "sigmoid"})


def test_init_identity_with_projection():
    with pytest.raises(ValueError, match=r"init='identity' needs square recurrent blocks; this cell's are 4x2 \(proj_size\)"):
        gatelab.LSTM(I, H, proj_size=2, init="identity")


@pytest.mark.parametrize("length,got", [(None, "None"), (2, "2")])
def test_chrono_needs_a_max_length(length, got):
    with pytest.raises(ValueError, match=rf"init='chrono' needs chrono_max_length >= 3 \(the longest dependency\), got {got}"):
        gatelab.LSTM(I, H, init="chrono", chrono_max_length=length)


def test_chrono_and_forget_bias_need_a_forget_gate():
    with pytest.raises(ValueError, match="init='chrono' needs a forget gate; ElmanCell has none"):
        gatelab.RNN(I, H, init="chrono", chrono_max_length=10)
    with pytest.raises(ValueError, match="forget_bias needs a forget gate; ElmanCell"):
        gatelab.RNN(I, H, forget_bias=1.0)
    with pytest.raises(ValueError, match="forget_bias sets a bias, but the cell has bias=False"):
        gatelab.LSTM(I, H, bias=False, forget_bias=1.0)


def test_strict_native_raises_for_options():
    with pytest.raises(ValueError, match=r"LSTM: backend='native' cannot run this layer: recurrent_dropout=0.2 \(strict=True\)"):
        gatelab.LSTM(I, H, recurrent_dropout=0.2, backend="native", strict=True)


def test_from_torch_wrong_module():
    with pytest.raises(TypeError, match="LSTM.from_torch expects a torch.nn.LSTM, got GRU"):
        gatelab.LSTM.from_torch(nn.GRU(I, H))


def test_variant_contradiction():
    with pytest.raises(ValueError, match=r"variant='CIFG' sets coupled=True, but coupled=False was passed"):
        gatelab.LSTM(I, H, variant="CIFG", coupled=False)


# -- helpers --------------------------------------------------------------------------------------


def _layer(cls, backend):
    if cls is gatelab.GatedStateRNN and backend == "native":
        with pytest.warns(UserWarning, match="falling back"):
            return cls(I, H, dtype=F64, backend=backend)
    return cls(I, H, dtype=F64, backend=backend)


def _shape(shape) -> str:
    """The regex for ``tuple(shape)`` as Python prints it."""
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


def test_an_option_the_cell_does_not_take_is_named():
    import gatelab as gl

    # explicit keyword-only constructors: Python names the option the layer does not take
    with pytest.raises(TypeError, match=r"GRU.__init__\(\) got an unexpected keyword argument 'layer_norm'"):
        gl.GRU(3, 4, layer_norm=True)
