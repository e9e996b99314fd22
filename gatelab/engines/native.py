"""The native engine: torch's own fused RNN kernels, for configurations that are exactly torch's."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from torch import _VF, Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .base import Stack

if TYPE_CHECKING:
    from ..cells import RecurrentCell
    from ..layers.base import RecurrentLayer

_KERNELS = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}
# torch's per-layer-and-direction weight order (its _flat_weights)
WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


class NativeEngine:
    """torch's kernels (cuDNN on CUDA, oneDNN / ATen on the CPU); the cell kind says which
    (:attr:`~gatelab.cells.RecurrentCell.torch_mode`) and how it differs from torch's
    (:meth:`~gatelab.cells.RecurrentCell.torch_differences`)."""

    name = "native"
    title = "torch's kernel"
    whole_stack = True
    traceable = False
    untraceable = "torch.compile and torch.export do not trace torch's own RNN kernels (aten.mkldnn_rnn_layer, _VF.lstm)"

    def unsupported(self, layer: RecurrentLayer) -> list[str]:
        return layer.cells[0].torch_differences() + layer.extra_options(runtime=True)

    def describe(self, layer: RecurrentLayer) -> str:
        return "torch's kernel"

    def run_stack(self, stack: Stack, x: Tensor, lengths: Tensor | None, hx: tuple[Tensor, ...]
                  ) -> tuple[Tensor, tuple[Tensor, ...]]:
        mode = stack.cells[0].torch_mode
        fn = _KERNELS[mode]
        args = (flat_weights(stack.cells), stack.bias, stack.num_layers, stack.dropout, stack.training,
                stack.bidirectional)
        h = hx if mode == "LSTM" else hx[0]
        with warnings.catch_warnings():
            if x.is_cuda:  # cuDNN asks for one contiguous weight buffer; gatelab keeps torch's separate weights
                warnings.filterwarnings("ignore", message=".*contiguous chunk of memory.*")
            if lengths is None:
                result = fn(x, h, *args, False)
                return result[0], tuple(result[1:])
            packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
            order = packed.sorted_indices
            h = tuple(t[:, order] for t in h) if isinstance(h, tuple) else h[:, order]
            result = fn(packed.data, packed.batch_sizes, h, *args)
            out, _ = pad_packed_sequence(packed._replace(data=result[0]), total_length=x.shape[0])
            return out, tuple(t[:, packed.unsorted_indices] for t in result[1:])


ENGINE = NativeEngine()


def flat_weights(cells: tuple[RecurrentCell, ...] | list[RecurrentCell]) -> list[Tensor]:
    """The cells' weights in torch's ``_flat_weights`` order: per layer and direction w_ih, w_hh, b_ih,
    b_hh, w_hr (those present)."""
    out = []
    for cell in cells:  # a plain loop, not a comprehension with :=, which torch.compile cannot trace
        for n in WEIGHT_NAMES:
            p = getattr(cell, n, None)
            if p is not None:
                out.append(p)
    return out


__all__ = ["ENGINE", "NativeEngine", "WEIGHT_NAMES", "flat_weights"]
