"""The native engine: torch's own fused RNN kernels, for configurations that are exactly torch's."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
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
    untraceable = "torch.compile and torch.export do not trace torch's own RNN kernels (_VF.lstm and the rest)"

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


# -- torch's oneDNN LSTM kernel, compiled ---------------------------------------------------------------
# On the CPU torch.nn.LSTM runs oneDNN's LSTM (aten.mkldnn_rnn_layer, one call per layer and direction,
# and aten.mkldnn_rnn_layer_backward). torch.compile cannot trace it for training: torch's meta kernel
# gives it an empty workspace where the real one keeps oneDNN's buffers (12.5 MB at T 100, B 32, H 64),
# and the kernel keeps them only with grad mode on, which a compiled forward runs without. Wrapped as
# gatelab operators whose fake kernel gives the workspace a size known only at run time, the same
# kernel compiles: a default-activation LSTM under torch.compile runs what it runs eagerly.

_ONEDNN_LSTM = 2  # ideep's rnn_kind::LSTM


def _state_shape(x, w_hh):
    return 1, x.shape[1], w_hh.shape[1]  # (one layer-direction, B, H)


def _zero_state(h0, x, w_hh):
    # no initial state given: zeros, made here so that a compiled graph holds no fill kernel for them
    return x.new_zeros(_state_shape(x, w_hh)) if h0 is None else h0


def _onednn_forward(x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse, has_biases, train):
    h0, c0 = _zero_state(h0, x, w_hh), _zero_state(c0, x, w_hh)
    # oneDNN keeps its workspace only with grad mode on (detached inputs: nothing is recorded)
    with torch.set_grad_enabled(train):
        out, hy, cy, workspace = torch.ops.aten.mkldnn_rnn_layer.default(
            *(t.detach() for t in (x, w_ih, w_hh, b_ih, b_hh, h0, c0)), reverse, [], _ONEDNN_LSTM, w_hh.shape[1], 1,
            has_biases, False, False, train)
    return out, hy, cy, workspace if train else x.new_empty(0, dtype=torch.uint8)


def _onednn_fake(x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse, has_biases, train):
    size = torch.library.get_ctx().new_dynamic_size() if train else 0
    state = _state_shape(x, w_hh)
    return (x.new_empty(x.shape[0], x.shape[1], w_hh.shape[1]), x.new_empty(state), x.new_empty(state),
            x.new_empty(size, dtype=torch.uint8))


def _onednn_backward_kernel(x, w_ih, w_hh, b_ih, b_hh, h0, c0, out, hy, cy, dout, dhy, dcy, workspace, reverse,
                            has_biases):
    return torch.ops.aten.mkldnn_rnn_layer_backward.default(
        x, w_ih, w_hh, b_ih, b_hh, _zero_state(h0, x, w_hh), _zero_state(c0, x, w_hh), out, hy, cy, dout, dhy, dcy,
        reverse, _ONEDNN_LSTM, w_hh.shape[1], 1, has_biases, True, False, [], False, workspace)


def _onednn_backward_fake(x, w_ih, w_hh, b_ih, b_hh, h0, c0, out, hy, cy, dout, dhy, dcy, workspace, reverse,
                          has_biases):
    state = _state_shape(x, w_hh)
    return (*(t.new_empty(t.shape) for t in (x, w_ih, w_hh, b_ih, b_hh)), x.new_empty(state), x.new_empty(state))


def _onednn_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7], *output)  # h0, c0: None for zeros
    ctx.reverse, ctx.has_biases, ctx.train = inputs[7], inputs[8], inputs[9]


def _onednn_grad(ctx, dout, dhy, dcy, _dworkspace):
    if not ctx.train:
        raise RuntimeError("gatelab: torch.ops.gatelab.onednn_lstm ran with train=False, which keeps nothing for a "
                           "backward pass")
    x, w_ih, w_hh, b_ih, b_hh, h0, c0, out, hy, cy, workspace = ctx.saved_tensors
    grads = torch.ops.gatelab.onednn_lstm_backward(
        x, w_ih, w_hh, b_ih, b_hh, h0, c0, out, hy, cy, *(torch.zeros_like(t) if g is None else g.contiguous()
                                                          for g, t in ((dout, out), (dhy, hy), (dcy, cy))),
        workspace, ctx.reverse, ctx.has_biases)
    dx, dw_ih, dw_hh, db_ih, db_hh, dh0, dc0 = grads
    keep = ctx.needs_input_grad
    return (*(g if need else None for g, need in zip(grads[:3], keep[:3])),
            *((db_ih, db_hh) if ctx.has_biases else (None, None)), dh0 if keep[5] else None,
            dc0 if keep[6] else None, None, None, None)


torch.library.define("gatelab::onednn_lstm", "(Tensor x, Tensor w_ih, Tensor w_hh, Tensor b_ih, Tensor b_hh, "
                     "Tensor? h0, Tensor? c0, bool reverse, bool has_biases, bool train) -> "
                     "(Tensor out, Tensor hy, Tensor cy, Tensor workspace)")
torch.library.define("gatelab::onednn_lstm_backward", "(Tensor x, Tensor w_ih, Tensor w_hh, Tensor b_ih, Tensor b_hh, "
                     "Tensor? h0, Tensor? c0, Tensor out, Tensor hy, Tensor cy, Tensor dout, Tensor dhy, Tensor dcy, "
                     "Tensor workspace, bool reverse, bool has_biases) -> (Tensor dx, Tensor dw_ih, Tensor dw_hh, "
                     "Tensor db_ih, Tensor db_hh, Tensor dh0, Tensor dc0)")
torch.library.impl("gatelab::onednn_lstm", "cpu", _onednn_forward)
torch.library.register_fake("gatelab::onednn_lstm", _onednn_fake)
torch.library.impl("gatelab::onednn_lstm_backward", "cpu", _onednn_backward_kernel)
torch.library.register_fake("gatelab::onednn_lstm_backward", _onednn_backward_fake)
torch.library.register_autograd("gatelab::onednn_lstm", _onednn_grad, setup_context=_onednn_setup)


@torch.compiler.assume_constant_result  # read at trace time; a constant of the graph
def _onednn_enabled() -> bool:
    return torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()


def onednn_compiles(stack_cell: RecurrentCell, x: Tensor, lengths: Tensor | None, training: bool, dropout: float,
                    num_layers: int) -> str | None:
    """Why a native LSTM cannot run torch's oneDNN kernel under torch.compile (None: it can). Only
    torch.compile (torch.export and torch.func take the fused engine, whose operators they know), on the
    CPU in float32 with oneDNN enabled, without projection, lengths or dropout between layers."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    if not torch.compiler.is_compiling() or exporting is None or exporting() or \
            torch._C._are_functorch_transforms_active():
        return "only under torch.compile"
    if stack_cell.torch_mode != "LSTM" or getattr(stack_cell, "weight_hr", None) is not None:
        return "an LSTM without projection only"
    if x.device.type != "cpu" or x.dtype != torch.float32 or not _onednn_enabled():
        return "float32 on the CPU with oneDNN only"
    if lengths is not None:
        return "not with lengths"
    if training and dropout > 0 and num_layers > 1:
        return "not with dropout between layers"
    return None


class OneDNNCompiled:
    """A default-activation LSTM under torch.compile on the CPU: torch's oneDNN kernel per layer and
    direction, through ``torch.ops.gatelab.onednn_lstm`` (see above). An empty ``hx`` stands for a zero
    initial state, which the operator makes itself."""

    name = "native"
    title = "torch's oneDNN LSTM kernel, as gatelab operators"
    whole_stack = True

    def run_stack(self, stack: Stack, x: Tensor, lengths: Tensor | None, hx: tuple[Tensor, ...]
                  ) -> tuple[Tensor, tuple[Tensor, ...]]:
        D = 2 if stack.bidirectional else 1
        train = torch.is_grad_enabled()
        finals_h, finals_c = [], []
        layer_in = x.contiguous()
        for layer in range(stack.num_layers):
            outs = []
            for d in range(D):
                k = layer * D + d
                cell = stack.cells[k]
                if stack.bias:
                    b_ih, b_hh = cell.bias_ih, cell.bias_hh
                else:  # oneDNN ignores them then, but takes tensors
                    b_ih = b_hh = cell.weight_hh.new_zeros(cell.weight_hh.shape[0])
                h0, c0 = (hx[0][k:k + 1].contiguous(), hx[1][k:k + 1].contiguous()) if hx else (None, None)
                out, hy, cy, _ = torch.ops.gatelab.onednn_lstm(
                    layer_in, cell.weight_ih, cell.weight_hh, b_ih, b_hh, h0, c0, d == 1, stack.bias, train)
                outs.append(out)
                finals_h.append(hy)
                finals_c.append(cy)
            layer_in = outs[0] if D == 1 else torch.cat(outs, 2)
        return layer_in, (torch.cat(finals_h), torch.cat(finals_c))


ONEDNN_COMPILED = OneDNNCompiled()


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


__all__ = ["ENGINE", "NativeEngine", "ONEDNN_COMPILED", "OneDNNCompiled", "WEIGHT_NAMES", "flat_weights",
           "onednn_compiles"]
