"""The native engine: torch's own fused RNN kernels, for configurations that are exactly torch's."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from torch import _VF, Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..cells import ElmanCell, GRUCell, LSTMCell

if TYPE_CHECKING:
    from ..layers.base import RecurrentLayer
    from ..layers.sequence import SequenceBatch

name = "native"

# What torch's kernels compute in each activation slot.
_TORCH_SLOTS = {
    LSTMCell: {"sigma_i": "sigmoid", "sigma_f": "sigmoid", "sigma_o": "sigmoid", "phi": "tanh", "psi": "tanh"},
    GRUCell: {"sigma_r": "sigmoid", "sigma_z": "sigmoid", "phi": "tanh"},
}
_SLOT_NAMES = {"sigma": "gate_activation", "phi": "candidate_activation", "psi": "cell_activation"}


def mode(layer: RecurrentLayer) -> str | None:
    """torch's mode string for the layer's cell (``LSTM``, ``GRU``, ``RNN_TANH``, ``RNN_RELU``)."""
    cell = layer.cells[0]
    if isinstance(cell, LSTMCell):
        return "LSTM"
    if isinstance(cell, GRUCell):
        return "GRU"
    if isinstance(cell, ElmanCell):
        return {"tanh": "RNN_TANH", "relu": "RNN_RELU"}.get(getattr(cell.phi, "kind", ""), "RNN_TANH")
    return None


def cell_differences(cell) -> list[str]:
    """How ``cell`` differs from the torch cell of its kind (empty when it is exactly torch's)."""
    if isinstance(cell, ElmanCell):
        kind = getattr(cell.phi, "kind", "")
        return [] if kind in ("tanh", "relu") else [f"activation is {_key(cell.phi)} (torch has tanh or relu)"]
    if type(cell) not in _TORCH_SLOTS:
        return [f"torch has no {type(cell).__name__}"]
    out = []
    if isinstance(cell, LSTMCell):
        if cell.gates != "ifo":
            out.append(f"gates={cell.gates!r} (torch has all of i, f, o)")
        for opt in ("coupled", "peephole", "layer_norm", "full_gate_recurrence"):
            if getattr(cell, opt):
                out.append(f"{opt}=True")
    if isinstance(cell, GRUCell) and not cell.reset_after:
        out.append("reset_after=False (torch's GRU resets after the product)")
    slots = cell.activation_slots()
    for slot, want in _TORCH_SLOTS[type(cell)].items():
        if slot in slots and getattr(slots[slot], "kind", "") != want:
            role = _SLOT_NAMES[slot.split("_")[0]] + (f"[{slot[-1]!r}]" if slot.startswith("sigma") else "")
            out.append(f"{role} is {_key(slots[slot])} (torch has {want})")
    return out


def unsupported(layer: RecurrentLayer) -> list[str]:
    reasons = cell_differences(layer.cells[0])
    reasons += layer.extra_options(runtime=True)
    return reasons


def _key(act) -> str:
    return getattr(act, "key", type(act).__name__)


def flat_weights(layer: RecurrentLayer) -> list[Tensor]:
    """Parameters in torch's ``_flat_weights`` order: per layer and direction w_ih, w_hh, b_ih, b_hh, w_hr."""
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
    return [p for cell in layer.cells for n in names if (p := getattr(cell, n, None)) is not None]


def forward(layer: RecurrentLayer, batch: SequenceBatch, hx: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
    x, lengths = batch.data, batch.lengths
    fn = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}[mode(layer)]
    args = (flat_weights(layer), layer.bias, layer.num_layers, layer.dropout, layer.training, layer.bidirectional)
    h = hx if mode(layer) == "LSTM" else hx[0]
    with warnings.catch_warnings():
        if x.is_cuda:  # cuDNN asks for one contiguous weight buffer; the weights live in the cells
            warnings.filterwarnings("ignore", message=".*contiguous chunk of memory.*")
        if lengths is None:
            result = fn(x, h, *args, False)
            out, hn = result[0], tuple(result[1:])
        else:
            packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
            order = packed.sorted_indices
            h = tuple(t[:, order] for t in h) if isinstance(h, tuple) else h[:, order]
            result = fn(packed.data, packed.batch_sizes, h, *args)
            out, _ = pad_packed_sequence(packed._replace(data=result[0]), total_length=x.shape[0])
            hn = tuple(t[:, packed.unsorted_indices] for t in result[1:])
    return out, hn


__all__ = ["cell_differences", "flat_weights", "forward", "mode", "unsupported"]
