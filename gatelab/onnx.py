"""ONNX export of gatelab layers and models: :func:`export`, or :func:`translation_table` for
``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``, or a plain
``torch.onnx.export(..., dynamo=True)`` after :func:`register_with_torch_onnx`; :func:`form` says
beforehand which form a layer takes.

The fused engine's operators (``torch.ops.gatelab.lstm``, ``lstm_ln``, ``gru``, ``elman``,
``gated_state``; a traced layer with torch's default activations runs them too) and the export-only
``torch.ops.gatelab.recurrence`` (below) become, per layer
and direction, one of two forms; T and B stay dynamic in both, padded ``lengths`` are honoured,
bidirectional and stacked layers are one node per direction:

* **ONNX's own node** (``LSTM`` / ``GRU`` / ``RNN``) where that operator can express the layer. ONNX's
  LSTM takes one activation for the i, f and o gates, one for the candidate and one for the cell
  output; its GRU one for both gates and one for the candidate; its RNN one. Each is one of ONNX's
  eleven RNN activations (``Relu``, ``Tanh``, ``Sigmoid``, ``Affine``, ``LeakyRelu``,
  ``ThresholdedRelu``, ``ScaledTanh``, ``HardSigmoid``, ``Elu``, ``Softsign``, ``Softplus``), with
  ``activation_alpha`` / ``activation_beta`` always written out for the activations that take them,
  in order (gatelab's and torch's hard_sigmoid has slope 1/6, ONNX's default is 0.2); gatelab's
  ``identity`` is ``Affine(1, 0)``. Peepholes (o reading the new cell state), ``lengths`` as
  ``sequence_lens``, the GRU in torch's reset-after form (``linear_before_reset=1``).
* **A** ``Scan`` **over time** for the rest: per-gate activation mappings, the activations ONNX's RNN
  operators lack (elliott, gelu, silu, selu, hardtanh), ``peephole_output="previous"``, the
  layer-norm LSTM, the gated-state cell, zoneout (in eval, the expected mix of old and new state).
  The input projection of all steps is one ``MatMul`` before the ``Scan``; its body is one step
  (the recurrent ``MatMul`` and the cell's update, every activation from elementary ONNX operators:
  ``Sigmoid``, ``HardSigmoid`` with explicit alpha/beta, ``Softsign``, ``Clip``, ``Erf`` ...), and the
  graph does not grow with T. ``export(..., form="scan")`` forces this form on layers ONNX's nodes
  could express too.

Execution providers: onnxruntime's CUDA provider takes an ``LSTM`` / ``GRU`` / ``RNN`` node only with
the default activations (LSTM sigmoid, tanh, tanh; GRU sigmoid, tanh; RNN tanh), no
``activation_alpha`` / ``activation_beta``, clip, peepholes or ``input_forget``, and GRU with
``linear_before_reset=1``; every other such node (hard_sigmoid gates, a relu RNN ...) runs on the CPU
provider. The Scan form is made of standard operators only, so it runs on any provider that
implements them, the CUDA provider included.

The layers the C++ loops do not run (they run the fused engine's PyTorch loop or the reference loop
eagerly): projection ``proj_size``, CIFG ``coupled=True``, removed gates, full gate recurrence, the
reset-before GRU, learnable activations (``prelu``, ``adaptive_sigmoid``, ``adaptive_tanh``), and the
cells of :mod:`gatelab.engines.scan` (``MinGRU``, ``MinLSTM``, ``IndRNN``, ``SLSTM``; sLSTM's
block-diagonal ``R`` becomes one dense matrix, its stabilised exponential gates elementary operators). Inside
:func:`export` (:func:`gatelab.engines.export_op.routing`) each of their directions traces as one
``torch.ops.gatelab.recurrence`` call, whose arguments describe the whole recurrence (the cell's
tensors, a learnable activation's weight among them, and a JSON description of the cell); it becomes
the same kind of Scan, built from the description, or ONNX's ``GRU`` with ``linear_before_reset=0``
for a reset-before GRU whose activations it has. (CIFG stays a Scan: onnxruntime reads the LSTM's
``input_forget`` as f = 1 − i, the opposite coupling.)

Not expressible (:class:`NotExpressibleError`, naming the layer and the reason, before anything is
exported): user activations (a plain callable or an ``nn.Module`` the registry does not know has no
ONNX expression), the layer-norm LSTM the C++ loop cannot run (with peepholes), a layer built with
``backend="reference"`` (that loop traces unrolled at the example's fixed T), and cell kinds the
export operator does not describe (a user's own cell class). And training-time masks (recurrent
dropout, sampled zoneout): export in eval mode, as :func:`export` does. With ``torch.onnx.export``
and :func:`translation_table` directly, open ``export_op.routing()`` around the call for those layers.

Needs ``onnx`` and ``onnxscript`` (and ``onnxruntime`` to run the result): gatelab's onnx extra.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from . import activations
from .engines import export_op
from .engines.fused import cpp
from .engines.fused.ops import forward_arguments, save_z
from .tasks.base import MissingExtraError

# ONNX's recurrent-operator activations (onnx.ai LSTM/GRU/RNN "activations")
RNN_ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh", "HardSigmoid",
                   "Elu", "Softsign", "Softplus")


class NotExpressibleError(ValueError):
    """The layer has something ONNX cannot express (in the form asked for)."""


def _opset() -> Any:
    try:
        from onnxscript import opset18
    except ImportError as err:
        raise MissingExtraError("gatelab.onnx needs onnx and onnxscript (and onnxruntime to run the model), "
                                "gatelab's onnx extra: pip install 'gatelab[onnx]'") from err
    return opset18


def onnx_activation(kind: int, param: float) -> tuple[str, float, float]:
    """``(ONNX name, alpha, beta)`` of a C++ kernel kind; :class:`NotExpressibleError` when ONNX's
    recurrent operators lack it."""
    act = cpp.activation(kind, param)
    if act.onnx == "Identity":
        return "Affine", 1.0, 0.0
    if act.onnx not in RNN_ACTIVATIONS:
        raise NotExpressibleError(f"activation {act.key} has no counterpart among ONNX's recurrent-node "
                                  f"activations ({', '.join(RNN_ACTIVATIONS)})")
    return act.onnx, float(act.onnx_alpha or 0.0), float(act.onnx_beta or 0.0)


def _shared(kinds: Sequence[int], params: Sequence[float], slots: Sequence[int], what: str) -> tuple[str, float, float]:
    found = {(kinds[s], params[s]) for s in slots}
    if len(found) != 1:
        names = ", ".join(sorted(cpp.KINDS[k] for k, _ in found))
        raise NotExpressibleError(f"ONNX's node takes one activation for {what}; this layer has {names}")
    return onnx_activation(*found.pop())


_TAKES_ALPHA = ("Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh", "HardSigmoid", "Elu")
_TAKES_BETA = ("Affine", "ScaledTanh", "HardSigmoid")


def _attributes(acts: Sequence[tuple[str, float, float]]) -> dict[str, Any]:
    """The node's activation attributes. ``activation_alpha`` / ``_beta`` are consumed in order by the
    activations that take them (onnxruntime reads them so), so they list those activations' values
    only, always written out."""
    out: dict[str, Any] = {"activations": [a[0] for a in acts]}
    alpha = [a[1] for a in acts if a[0] in _TAKES_ALPHA]
    beta = [a[2] for a in acts if a[0] in _TAKES_BETA]
    if alpha:
        out["activation_alpha"] = alpha
    if beta:
        out["activation_beta"] = beta
    return out


def node_activations(name: str, kinds: Sequence[int], params: Sequence[float]) -> list[tuple[str, float, float]]:
    """The ``(ONNX name, alpha, beta)`` list of operator ``name``'s ONNX node: LSTM ``[f (i, f, o gates), g,
    h]``, GRU ``[f (r, z gates), g]``, RNN ``[f]``; :class:`NotExpressibleError` when it has none."""
    if name == "lstm":
        return [_shared(kinds, params, (0, 1, 3), "the i, f and o gates"), onnx_activation(kinds[2], params[2]),
                onnx_activation(kinds[4], params[4])]
    if name == "gru":
        return [_shared(kinds, params, (0, 1), "the r and z gates"), onnx_activation(kinds[2], params[2])]
    if name == "elman":
        return [onnx_activation(kinds[0], params[0])]
    what = "the layer-norm LSTM" if name == "lstm_ln" else "the gated-state cell"
    raise NotExpressibleError(f"{what} has no ONNX recurrent node")


def _blocks(op: Any, t: Any, order: Sequence[int], n: int) -> Any:
    """Rows of ``t`` cut into ``n`` gate blocks and put back in ``order``."""
    parts = op.Split(t, num_outputs=n, axis=0)
    return op.Concat(*(parts[k] for k in order), axis=0)


def _zeros(op: Any, x: Any, dims: Sequence[Any]) -> Any:
    """A zero tensor of ``dims`` (ints, or "T"/"B": x's first two sizes) for an operator output the ONNX
    graph does not use (what the PyTorch operator keeps for its backward)."""
    parts = [op.Shape(x, start=0, end=1) if d == "T" else op.Shape(x, start=1, end=2) if d == "B"
             else op.Constant(value_ints=[int(d)]) for d in dims]
    return op.ConstantOfShape(op.Concat(*parts, axis=0))


def _saved(op: Any, x: Any, names: Sequence[str], H: int, G: int, train: bool, keep_z: bool, zoned: bool) -> list[Any]:
    """Zeros shaped as the operator's saved outputs (see ops.py's fake kernels)."""
    keep, rec = ("T", "T") if train else (1, 2)
    dims = {"Z": ("T", "B", G) if keep_z and train else (0,), "A": (keep, "B", G), "C": (keep, "B", H),
            "K": (keep, "B", H), "HR": (rec, "B", H), "GHn": (keep, "B", H), "S": (keep, "B", H),
            "Y": (keep, "B", H), "NH": (keep, "B", G), "NC": (keep, "B", H), "RH": (keep, "B"), "RC": (keep, "B"),
            "CP": (keep, "B", H) if zoned else (0,), "SN": (keep, "B", H) if zoned else (0,)}
    return [_zeros(op, x, dims[n]) for n in names]


def _common(op: Any, name: str, rec_mask: Any, zones: Sequence[Any], lengths: Any) -> Any:
    if rec_mask is not None or any(z is not None for z in zones):
        raise NotExpressibleError(f"{name}: recurrent dropout and zoneout masks are training-time inputs; export the "
                                  f"model in eval mode (model.eval())")
    return None if lengths is None else op.Cast(lengths, to=6)  # sequence_lens: int32


def _lstm(x, W_ih, W_hh, b_ih, b_hh, h0, c0, lengths, rec_mask, zh, zc, w_ci, w_cf, w_co, peep_current, kinds, params,
          reverse, train):
    op = _opset()
    seq = _common(op, "LSTM", rec_mask, (zh, zc), lengths)
    if w_ci is not None and not peep_current:
        raise NotExpressibleError("ONNX's LSTM has the output gate's peephole read the new cell state; this layer "
                                  "has peephole_output='previous'")
    acts = node_activations("lstm", kinds, params)
    iofc = (0, 3, 1, 2)  # torch's i f g o -> ONNX's i o f c
    W = op.Unsqueeze(_blocks(op, W_ih, iofc, 4), [0])
    R = op.Unsqueeze(_blocks(op, W_hh, iofc, 4), [0])
    B = None if b_ih is None else op.Unsqueeze(op.Concat(_blocks(op, b_ih, iofc, 4), _blocks(op, b_hh, iofc, 4),
                                                         axis=0), [0])
    P = None if w_ci is None else op.Unsqueeze(op.Concat(w_ci, w_co, w_cf, axis=0), [0])
    hidden = W_hh.shape[1]
    Y, Y_h, Y_c = op.LSTM(x, W, R, B, seq, op.Unsqueeze(h0, [0]), op.Unsqueeze(c0, [0]), P, hidden_size=hidden,
                          direction="reverse" if reverse else "forward", **_attributes(acts))
    keep_z = save_z(kinds, params, 4)
    saved = _saved(op, x, ("Z", "A", "C", "K", "HR", "CP"), hidden, 4 * hidden, train, keep_z, False)
    return (op.Squeeze(Y, [1]), op.Squeeze(Y_h, [0]), op.Squeeze(Y_c, [0]), *saved)


def _gru(x, W_ih, W_hh, b_ih, b_hh, h0, lengths, rec_mask, zh, kinds, params, reverse, train):
    op = _opset()
    seq = _common(op, "GRU", rec_mask, (zh,), lengths)
    acts = node_activations("gru", kinds, params)
    zrh = (1, 0, 2)  # torch's r z n -> ONNX's z r h
    W = op.Unsqueeze(_blocks(op, W_ih, zrh, 3), [0])
    R = op.Unsqueeze(_blocks(op, W_hh, zrh, 3), [0])
    B = None if b_ih is None else op.Unsqueeze(op.Concat(_blocks(op, b_ih, zrh, 3), _blocks(op, b_hh, zrh, 3),
                                                         axis=0), [0])
    hidden = W_hh.shape[1]
    Y, Y_h = op.GRU(x, W, R, B, seq, op.Unsqueeze(h0, [0]), hidden_size=hidden, linear_before_reset=1,
                    direction="reverse" if reverse else "forward", **_attributes(acts))
    saved = _saved(op, x, ("Z", "A", "GHn", "S", "HR"), hidden, 3 * hidden, train, save_z(kinds, params, 3), False)
    return (op.Squeeze(Y, [1]), op.Squeeze(Y_h, [0]), *saved)


def _elman(x, W_ih, W_hh, b_ih, b_hh, h0, lengths, rec_mask, zh, kinds, params, reverse, train):
    op = _opset()
    seq = _common(op, "RNN", rec_mask, (zh,), lengths)
    B = None if b_ih is None else op.Unsqueeze(op.Concat(b_ih, b_hh, axis=0), [0])
    hidden = W_hh.shape[1]
    Y, Y_h = op.RNN(x, op.Unsqueeze(W_ih, [0]), op.Unsqueeze(W_hh, [0]), B, seq, op.Unsqueeze(h0, [0]),
                    hidden_size=hidden, direction="reverse" if reverse else "forward",
                    **_attributes(node_activations("elman", kinds, params)))
    keep_z = save_z(kinds, params, 1)
    out = op.Squeeze(Y, [1])
    # S: empty when training without lengths (the output itself), one slot in eval, else every step
    s_dims = (1, "B", hidden) if not train else ("T", "B", hidden) if lengths is not None else (0,)
    return (out, op.Squeeze(Y_h, [0]), _zeros(op, x, ("T", "B", hidden) if keep_z and train else (0,)),
            _zeros(op, x, s_dims), _zeros(op, x, ("T", "B", hidden) if train else (2, "B", hidden)))


# -- the Scan form ----------------------------------------------------------------------------------
# One direction of a layer as an ONNX Scan over time: the input projection of every step before it,
# one step in its body. The body is built with onnx_ir (what torch's exporter builds its graphs in)
# and reads the weights from the enclosing graph (ONNX subgraphs see outer-scope values).


class _Body:
    """A Scan body under construction: ``body.Add(a, b)``, ``body.Split(t, num_outputs=4, axis=1)``
    append onnx_ir nodes and return their outputs; every value gets a name unique in the model."""

    _count = itertools.count()

    def __init__(self, what: str, dtype: Any) -> None:
        import onnx_ir as ir

        self.ir, self.dtype, self.nodes, self.inputs = ir, dtype, [], []
        self.prefix = f"gatelab_{what}_step{next(self._count)}"
        self._names = itertools.count()

    def _name(self, what: str) -> str:
        return f"{self.prefix}_{what}{next(self._names)}"

    def input(self, what: str, dims: Sequence[int | None], dtype: Any = None) -> Any:
        ir = self.ir
        value = ir.Value(name=self._name(what), shape=ir.Shape(list(dims)), type=ir.TensorType(dtype or self.dtype))
        self.inputs.append(value)
        return value

    def const(self, v: float) -> Any:
        return self.Constant(value=self.ir.tensor(np.array(v, dtype=self.dtype.numpy())))

    def __getattr__(self, op_type: str) -> Any:
        if not op_type[:1].isupper():
            raise AttributeError(op_type)

        def node(*inputs: Any, num_outputs: int | None = None, **attributes: Any) -> Any:
            if op_type == "Split" and num_outputs is not None:
                attributes["num_outputs"] = num_outputs
            n = self.ir.Node("", op_type, list(inputs), attributes=self.ir.convenience.convert_attributes(attributes),
                             num_outputs=num_outputs or 1, version=_OPSET)
            for v in n.outputs:
                v.name = self._name(op_type.lower())
            self.nodes.append(n)
            return tuple(n.outputs) if num_outputs else n.outputs[0]

        return node

    def graph(self, outputs: Sequence[Any]) -> Any:
        # each graph output its own value (one value listed twice is not a valid graph)
        outs = [self.Identity(v) for v in outputs]
        return self.ir.Graph(self.inputs, outs, nodes=self.nodes, name=self.prefix)


_OPSET = 18

# Every C++ kernel kind (cpp.KINDS) from elementary ONNX operators, exactly as kernels.cpp computes it
# (alpha/beta from the registry entry, never ONNX's defaults).
_EXPRESSIONS: dict[str, Callable[[_Body, Any, Any], Any]] = {
    "identity": lambda b, x, act: x,
    "sigmoid": lambda b, x, act: b.Sigmoid(x),
    "hard_sigmoid": lambda b, x, act: b.HardSigmoid(x, alpha=float(act.onnx_alpha), beta=float(act.onnx_beta)),
    "elliott": lambda b, x, act: b.Add(b.Mul(b.Softsign(x), b.const(0.5)), b.const(0.5)),  # 0.5·x/(1+|x|) + 0.5
    "tanh": lambda b, x, act: b.Tanh(x),
    "hardtanh": lambda b, x, act: b.Clip(x, b.const(-1.0), b.const(1.0)),
    "softsign": lambda b, x, act: b.Softsign(x),
    "relu": lambda b, x, act: b.Relu(x),
    "leaky_relu": lambda b, x, act: b.LeakyRelu(x, alpha=float(act.onnx_alpha)),
    "elu": lambda b, x, act: b.Elu(x, alpha=float(act.onnx_alpha)),
    "selu": lambda b, x, act: b.Selu(x, alpha=float(act.onnx_alpha), gamma=float(act.onnx_beta)),
    "gelu": lambda b, x, act: b.Mul(b.Mul(x, b.const(0.5)),  # x·Φ(x), Φ by erf (opset 18 has no Gelu)
                                    b.Add(b.const(1.0), b.Erf(b.Mul(x, b.const(math.sqrt(0.5)))))),
    "silu": lambda b, x, act: b.Mul(x, b.Sigmoid(x)),
    "softplus": lambda b, x, act: b.Softplus(x),
    "exp": lambda b, x, act: b.Exp(x),
    "min_g": lambda b, x, act: b.Where(b.GreaterOrEqual(x, b.const(0.0)), b.Add(x, b.const(0.5)), b.Sigmoid(x)),
}


def scan_activation(b: _Body, kind: int, param: float, x: Any) -> Any:
    """The activation of C++ kernel kind ``kind`` applied to ``x`` inside a Scan body."""
    act = cpp.activation(kind, param)
    if act.kind not in _EXPRESSIONS:
        raise NotExpressibleError(f"activation {act.key} has no ONNX expression for the Scan form")
    return _EXPRESSIONS[act.kind](b, x, act)


def _lstm_step(b: _Body, pre: Any, state: Sequence[Any], a: dict[str, Any], f: Callable[[int, Any], Any]) -> Any:
    """i, f, g, o = σ_i, σ_f, φ, σ_o of the row blocks (+ peepholes); c' = f c + i g; h' = o ψ(c')
    (ψ of LN(c') in the layer-norm LSTM)."""
    h, c = state
    zi, zf, zg, zo = b.Split(pre, num_outputs=4, axis=1)
    peep = a.get("w_ci") is not None
    if peep:
        zi, zf = b.Add(zi, b.Mul(a["w_ci"], c)), b.Add(zf, b.Mul(a["w_cf"], c))
    i, f_, g = f(0, zi), f(1, zf), f(2, zg)
    c_new = b.Add(b.Mul(f_, c), b.Mul(i, g))
    if peep:
        zo = b.Add(zo, b.Mul(a["w_co"], c_new if a["peep_current"] else c))
    o = f(3, zo)
    c_out = b.LayerNormalization(c_new, a["g_c"], a["b_c"], axis=-1, epsilon=float(a["eps"])) if "g_c" in a else c_new
    h_new = b.Mul(o, f(4, c_out))
    return h_new, (h_new, c_new)


def _gru_step(b: _Body, xw: Any, state: Sequence[Any], a: dict[str, Any], f: Callable[[int, Any], Any]) -> Any:
    """r = σ_r(x_r + h_r), z = σ_z(x_z + h_z), n = φ(x_n + r ⊙ h_n), h' = (1 − z) n + z h (reset-after)."""
    (h,) = state
    gh = b.MatMul(h, a["W_hh_t"])
    if a["b_hh"] is not None:
        gh = b.Add(gh, a["b_hh"])
    xr, xz, xn = b.Split(xw, num_outputs=3, axis=1)
    hr, hz, hn = b.Split(gh, num_outputs=3, axis=1)
    r, z = f(0, b.Add(xr, hr)), f(1, b.Add(xz, hz))
    n = f(2, b.Add(xn, b.Mul(r, hn)))
    h_new = b.Add(b.Mul(b.Sub(b.const(1.0), z), n), b.Mul(z, h))
    return h_new, (h_new,)


def _elman_step(b: _Body, pre: Any, state: Sequence[Any], a: dict[str, Any], f: Callable[[int, Any], Any]) -> Any:
    """h' = φ(W_ih x + b + W_hh h)."""
    h_new = f(0, pre)
    return h_new, (h_new,)


def _gated_state_step(b: _Body, pre: Any, state: Sequence[Any], a: dict[str, Any], f: Callable[[int, Any], Any]
                      ) -> Any:
    """f, i, o = σ of the first three row blocks, s̃ = φ(fourth); s' = f s + i s̃; y = o s'."""
    (s,) = state
    zf, zi, zo, zn = b.Split(pre, num_outputs=4, axis=1)
    s_new = b.Add(b.Mul(f(0, zf), s), b.Mul(f(1, zi), f(3, zn)))
    return b.Mul(f(2, zo), s_new), (s_new,)


_STEPS = {"lstm": _lstm_step, "lstm_ln": _lstm_step, "gru": _gru_step, "elman": _elman_step,
          "gated_state": _gated_state_step}
_OUTPUT_STATE = {"gated_state": None}  # which state is the output (0: h; None: computed, y = o s')


def _scan_call(*inputs: Any, num_outputs: int, **attributes: Any) -> Any:
    """An ONNX Scan node in the graph torch's exporter is building (onnxscript's op.Scan returns one
    output only: its outputs are variadic)."""
    from torch.onnx._internal.exporter._torchlib.ops.hop import call_op

    return call_op("Scan", *inputs, _num_outputs=num_outputs, **attributes)


def _scan(cell_op: Any, a: dict[str, Any]) -> tuple[Any, ...]:
    """One layer direction of operator ``cell_op`` (a :class:`~gatelab.engines.fused.ops.CellOp`) as an
    ONNX Scan; returns what the operator returns (the saved buffers as zeros)."""
    op = _opset()
    name, kinds, params, reverse = cell_op.name, a["kinds"], a["params"], bool(a["reverse"])
    x = a["xw"] if cell_op.layer_norm else a["x"]
    H = a["W_hh"].shape[1]
    G = cell_op.width * H
    dtype = x.dtype
    a = {**a, "W_hh_t": op.Transpose(a["W_hh"], perm=[1, 0])}
    if cell_op.layer_norm:  # the input side (norm and both biases) is done before the operator
        xw = x
    else:  # every step's input projection, one MatMul: (T, B, I) x (I, G)
        xw = op.MatMul(x, op.Transpose(a["W_ih"], perm=[1, 0]))
        if a["b_ih"] is not None:
            xw = op.Add(xw, a["b_ih"] if not cell_op.fold_bias_hh else op.Add(a["b_ih"], a["b_hh"]))
    zones = [a[f"z{s}"] for s in cell_op.states]
    scanned = [xw]
    if a["lengths"] is not None:  # live[t, b] = t < lengths[b]: (T, B, 1)
        T = op.Squeeze(op.Shape(x, start=0, end=1), [0])
        steps = op.Range(op.Constant(value_int=0), T, op.Constant(value_int=1))
        live = op.Less(op.Unsqueeze(steps, [1]), op.Unsqueeze(op.Cast(a["lengths"], to=7), [0]))  # int64
        scanned.append(op.Unsqueeze(live, [2]))
    scanned += [z for z in zones if z is not None]

    b = _Body(name, dtype)
    states = [b.input(s, (None, H)) for s in cell_op.states]
    xw_t = b.input("xw", (None, G))
    live_t = b.input("live", (None, 1), b.ir.DataType.BOOL) if a["lengths"] is not None else None
    zone_t = [None if z is None else b.input(f"z{s}", (None, H)) for s, z in zip(cell_op.states, zones)]

    def act(slot: int, t: Any) -> Any:
        return scan_activation(b, kinds[slot], params[slot], t)

    if name == "gru":
        pre = xw_t
    else:
        gh = b.MatMul(states[0], a["W_hh_t"])  # (B, G)
        if cell_op.layer_norm:  # LN(W_hh h) ⊙ g_hh, no bias (the biases are in xw)
            gh = b.LayerNormalization(gh, a["g_hh"], axis=-1, epsilon=float(a["eps"]))
        pre = b.Add(xw_t, gh)
    out, new = _STEPS[name](b, pre, states, a, act)
    k = _OUTPUT_STATE.get(name, 0)
    if any(z is not None for z in zone_t):  # zoneout in eval: m ⊙ old + (1 − m) ⊙ new, m the keep share
        new = tuple(s if m is None else b.Add(b.Mul(m, old), b.Mul(b.Sub(b.const(1.0), m), s))
                    for old, s, m in zip(states, new, zone_t))
        out = out if k is None else new[k]
    if live_t is not None:  # a dead step holds the state and outputs zero
        new = tuple(b.Where(live_t, s, old) for s, old in zip(new, states))
        out = b.Where(live_t, out, b.const(0.0))
    body = b.graph([*new, out])
    *finals, Y = _scan_call(*(a[f"{s}0"] for s in cell_op.states), *scanned, num_outputs=len(states) + 1, body=body,
                            num_scan_inputs=len(scanned), scan_input_directions=[int(reverse)] * len(scanned),
                            scan_output_directions=[int(reverse)])
    train = bool(a["train"])
    zoned = train and any(z is not None for z in zones)
    if cell_op.name == "elman":  # S: see ops.py's fake kernel
        s_dims = (1, "B", H) if not train else ("T", "B", H) if a["lengths"] is not None or zoned else (0,)
        saved = [_zeros(op, x, ("T", "B", H) if save_z(kinds, params, 1) and train else (0,)), _zeros(op, x, s_dims),
                 _zeros(op, x, ("T", "B", H) if train else (2, "B", H))]
    else:
        saved = _saved(op, x, cell_op.saved, H, G, train, save_z(kinds, params, cell_op.gates), zoned)
    return (Y, *finals, *saved)


# -- the export operator (gatelab.engines.export_op) ---------------------------------------------------
# torch.ops.gatelab.recurrence: one direction of a cell the C++ operators do not take, described by a
# JSON string; a Scan over time built from that description (ONNX's GRU node for a reset-before GRU).


def _learnable_expression(b: _Body, kind: str, w: Any, x: Any) -> Any:
    """A learnable activation with its per-unit weight ``w`` (an initializer of the outer graph)."""
    if kind == "prelu":  # where(x >= 0, x, a x), as PReLU.forward
        return b.Where(b.GreaterOrEqual(x, b.const(0.0)), x, b.Mul(w, x))
    return (b.Sigmoid if kind == "adaptive_sigmoid" else b.Tanh)(b.Mul(w, x))  # σ(βx), tanh(βx)


def _recurrence_native_blocker(d: dict[str, Any]) -> str | None:
    """Why ONNX's own node cannot express a described direction (None: it can); only the reset-before
    GRU (``linear_before_reset=0``) is taken that way: the rest reaching this operator has no node."""
    o, acts = d["options"], d["activations"]
    if d["kind"] in export_op.SCAN_KINDS:
        return f"ONNX has no recurrent node for {_SCAN_TITLES[d['kind']]} (its nodes are LSTM, GRU and RNN)"
    if learnable := [k for k in acts.values() if k in export_op.LEARNABLE]:
        return f"activation {learnable[0]} is learnable (a weight per unit), which ONNX's recurrent nodes lack"
    if d["kind"] == "lstm":
        if o["proj_size"]:
            return "ONNX's LSTM node has no projection (proj_size)"
        if o["full_gate_recurrence"]:
            return "ONNX's LSTM node has no full gate recurrence (FGR)"
        if o["gates"] != "ifo":
            return f"ONNX's LSTM node has every gate (gates={o['gates']!r} removes some)"
        if o["coupled"]:
            return "ONNX's LSTM input_forget couples the other way in onnxruntime (f = 1 − i; CIFG is i = 1 − f)"
    if d["kind"] != "gru" or o["reset_after"]:
        return "the cell runs here on the export operator, which has no ONNX node form for it"
    if any(d["zoneout"]):
        return "zoneout (in eval its constant keep shares still mix old and new states, which ONNX's nodes cannot)"
    try:
        node_activations("gru", *zip(*(cpp._kind(activations.get(acts[s])) for s in ("sigma_r", "sigma_z", "phi"))))
    except NotExpressibleError as err:
        return str(err)
    return None


_SCAN_TITLES = {"min_gru": "minGRU", "min_lstm": "minLSTM", "indrnn": "IndRNN", "slstm": "sLSTM"}


def _recurrence_gru_node(op: Any, d: dict[str, Any], W: dict[str, Any], x: Any, h0: Any, lengths: Any,
                         reverse: bool) -> tuple[Any, Any]:
    """The reset-before GRU as ONNX's GRU with ``linear_before_reset=0`` (n = φ(W_n x + R_n (r ⊙ h) + b))."""
    acts = d["activations"]
    kinds, params = zip(*(cpp._kind(activations.get(acts[s])) for s in ("sigma_r", "sigma_z", "phi")))
    zrh = (1, 0, 2)  # torch's r z n -> ONNX's z r h
    B = None if not d["bias"] else op.Unsqueeze(op.Concat(_blocks(op, W["bias_ih"], zrh, 3),
                                                          _blocks(op, W["bias_hh"], zrh, 3), axis=0), [0])
    seq = None if lengths is None else op.Cast(lengths, to=6)
    Y, Y_h = op.GRU(x, op.Unsqueeze(_blocks(op, W["weight_ih"], zrh, 3), [0]),
                    op.Unsqueeze(_blocks(op, W["weight_hh"], zrh, 3), [0]), B, seq, op.Unsqueeze(h0, [0]),
                    hidden_size=d["hidden_size"], linear_before_reset=0,
                    direction="reverse" if reverse else "forward",
                    **_attributes(node_activations("gru", kinds, params)))
    return op.Squeeze(Y, [1]), op.Squeeze(Y_h, [0])


def _recurrence_step(b: _Body, cell: Any, d: dict[str, Any], W: dict[str, Any], Wt: dict[str, Any], xw: Any,
                     states: Sequence[Any], act: Callable[[str, Any], Any]) -> tuple[Any, tuple[Any, ...]]:
    """One step of the described cell in a Scan body: ``(output, new states)``, as the cell's ``step``."""
    kind = d["kind"]
    if kind in _SCAN_STEPS:
        return _SCAN_STEPS[kind](b, d, W, Wt, xw, states, act)
    if kind == "gru":
        (h,) = states
        xr, xz, xn = b.Split(xw, num_outputs=3, axis=1)
        if d["options"]["reset_after"]:  # n = φ(x_n + r ⊙ (W_hn h + b_hn))
            gh = b.MatMul(h, Wt["weight_hh"])
            if d["bias"]:
                gh = b.Add(gh, W["bias_hh"])
            hr, hz, hn = b.Split(gh, num_outputs=3, axis=1)
            r, z = act("sigma_r", b.Add(xr, hr)), act("sigma_z", b.Add(xz, hz))
            n = act("phi", b.Add(xn, b.Mul(r, hn)))
        else:  # n = φ(x_n + W_hn (r ⊙ h) + b_hn), b_hh folded into xw
            hr, hz = b.Split(b.MatMul(h, Wt["W_hrz"]), num_outputs=2, axis=1)
            r, z = act("sigma_r", b.Add(xr, hr)), act("sigma_z", b.Add(xz, hz))
            n = act("phi", b.Add(xn, b.MatMul(b.Mul(r, h), Wt["W_hn"])))
        h_new = b.Add(b.Mul(b.Sub(b.const(1.0), z), n), b.Mul(z, h))
        return h_new, (h_new,)
    pre = b.Add(xw, b.MatMul(states[0], Wt["weight_hh"]))  # (B, G·H)
    if kind == "rnn":
        h_new = act("phi", pre)
        return h_new, (h_new,)
    if kind == "gated_state":
        (s,) = states
        zf, zi, zo, zn = b.Split(pre, num_outputs=4, axis=1)
        s_new = b.Add(b.Mul(act("sigma_f", zf), s), b.Mul(act("sigma_i", zi), act("phi", zn)))
        return b.Mul(act("sigma_o", zo), s_new), (s_new,)
    # the LSTM: removed gates are the constant 1, CIFG i = 1 − f, FGR adds W_gr (i, f, o)_prev
    h, c, *prev = states
    o = d["options"]
    blocks = cell.blocks
    z = dict(zip(blocks, b.Split(pre, num_outputs=len(blocks), axis=1))) if len(blocks) > 1 else {blocks[0]: pre}
    if o["full_gate_recurrence"]:
        rec = dict(zip("ifo", b.Split(b.MatMul(prev[0], Wt["weight_gr"]), num_outputs=3, axis=1)))
        z = {k: b.Add(v, rec[k]) if k in rec else v for k, v in z.items()}

    def gate(g: str, read: Any) -> Any:
        t = z[g] if f"weight_c{g}" not in W else b.Add(z[g], b.Mul(W[f"weight_c{g}"], read))
        return act(f"sigma_{g}", t)

    f = gate("f", c) if "f" in o["gates"] else None
    i = b.Sub(b.const(1.0), f) if o["coupled"] else gate("i", c) if "i" in o["gates"] else None
    g_ = act("phi", z["g"])
    c_new = b.Add(c if f is None else b.Mul(f, c), g_ if i is None else b.Mul(i, g_))
    out_gate = gate("o", c if o["peephole_output"] == "previous" else c_new) if "o" in o["gates"] else None
    h_new = act("psi", c_new) if out_gate is None else b.Mul(out_gate, act("psi", c_new))
    if o["proj_size"]:
        h_new = b.MatMul(h_new, Wt["weight_hr"])
    if not o["full_gate_recurrence"]:
        return h_new, (h_new, c_new)
    ones = b.Add(b.Mul(c_new, b.const(0.0)), b.const(1.0))  # (B, H) of ones
    return h_new, (h_new, c_new, b.Concat(*(ones if v is None else v for v in (i, f, out_gate)), axis=1))


def _min_gru_step(b: _Body, d: dict[str, Any], W: dict[str, Any], Wt: dict[str, Any], xw: Any,
                  states: Sequence[Any], act: Callable[[str, Any], Any]) -> tuple[Any, tuple[Any, ...]]:
    """minGRU: z = σ_z(x_z), h' = (1 − z) ⊙ h + z ⊙ g(x_h); nothing of h enters a product."""
    (h,) = states
    xz, xh = b.Split(xw, num_outputs=2, axis=1)
    z = act("sigma_z", xz)
    h_new = b.Add(b.Mul(b.Sub(b.const(1.0), z), h), b.Mul(z, act("phi", xh)))
    return h_new, (h_new,)


def _min_lstm_step(b: _Body, d: dict[str, Any], W: dict[str, Any], Wt: dict[str, Any], xw: Any,
                   states: Sequence[Any], act: Callable[[str, Any], Any]) -> tuple[Any, tuple[Any, ...]]:
    """minLSTM: f, i = σ_f(x_f), σ_i(x_i); h' = f/(f + i) ⊙ h + i/(f + i) ⊙ g(x_h)."""
    (h,) = states
    xf, xi, xh = b.Split(xw, num_outputs=3, axis=1)
    f, i = act("sigma_f", xf), act("sigma_i", xi)
    total = b.Add(f, i)
    h_new = b.Add(b.Mul(b.Div(f, total), h), b.Mul(b.Div(i, total), act("phi", xh)))
    return h_new, (h_new,)


def _indrnn_step(b: _Body, d: dict[str, Any], W: dict[str, Any], Wt: dict[str, Any], xw: Any,
                 states: Sequence[Any], act: Callable[[str, Any], Any]) -> tuple[Any, tuple[Any, ...]]:
    """IndRNN: h' = φ(W_ih x + b_ih + u ⊙ h), u the per-unit recurrent weight (H,)."""
    (h,) = states
    h_new = act("phi", b.Add(xw, b.Mul(W["weight_hh"], h)))
    return h_new, (h_new,)


def _slstm_step(b: _Body, d: dict[str, Any], W: dict[str, Any], Wt: dict[str, Any], xw: Any,
                states: Sequence[Any], act: Callable[[str, Any], Any]) -> tuple[Any, tuple[Any, ...]]:
    """sLSTM's stabilised step (SLSTMCell.combine): log i, log f by closed forms for exp and sigmoid;
    m' = max(log f + m, log i); i' = e^(log i − m'), f' = e^(log f + m − m'); c' = f' c + i' φ(z̃),
    n' = f' n + i', h' = σ_o(õ) c' / n'. ``Wt["R"]`` is the block-diagonal R as one dense (H, 4H)."""
    h, c, n, m = states
    pi, pf, pz, po = b.Split(b.Add(xw, b.MatMul(h, Wt["R"])), num_outputs=4, axis=1)

    def log_gate(slot: str, x: Any) -> Any:
        kind = activations.get(d["activations"][slot]).kind
        if kind == "exp":
            return x
        if kind == "sigmoid":  # log σ(x) = −softplus(−x)
            return b.Neg(b.Softplus(b.Neg(x)))
        return b.Log(act(slot, x))

    log_i, log_f = log_gate("sigma_i", pi), log_gate("sigma_f", pf)
    kept = b.Add(log_f, m)
    m_new = b.Max(kept, log_i)
    i, f = b.Exp(b.Sub(log_i, m_new)), b.Exp(b.Sub(kept, m_new))
    c_new = b.Add(b.Mul(f, c), b.Mul(i, act("phi", pz)))
    n_new = b.Add(b.Mul(f, n), i)
    h_new = b.Div(b.Mul(act("sigma_o", po), c_new), n_new)
    return h_new, (h_new, c_new, n_new, m_new)


_SCAN_STEPS = {"min_gru": _min_gru_step, "min_lstm": _min_lstm_step, "indrnn": _indrnn_step, "slstm": _slstm_step}


def _block_diagonal_t(op: Any, d: dict[str, Any], weight_hh: Any, dtype: Any) -> Any:
    """sLSTM's ``weight_hh (4H, H/K)`` (the diagonal blocks of R, rows gate · head · unit) as the dense
    ``Rᵀ (H, 4H)`` a Scan body multiplies ``h`` by: ``R[g·H + k·d + o, k'·d + i] = W[g, k, o, i] δ(k, k')``."""
    K, H = d["options"]["num_heads"], d["hidden_size"]
    if K == 1:
        return op.Transpose(weight_hh, perm=[1, 0])
    import onnx_ir as ir

    dh = H // K
    eye = np.eye(K, dtype=dtype.numpy()).reshape(1, K, 1, K, 1)
    dense = op.Mul(op.Reshape(weight_hh, [4, K, dh, 1, dh]), op.Constant(value=ir.tensor(eye)))  # (4, K, d, K, d)
    return op.Transpose(op.Reshape(dense, [4 * H, H]), perm=[1, 0])


def _recurrence_translation(want: str) -> Callable[..., Any]:
    def translate(x: Any, state: Sequence[Any], weights: Sequence[Any], lengths: Any, cell: str, reverse: bool) -> Any:
        op = _opset()
        d = json.loads(cell)
        W = dict(zip(d["weights"], weights))
        why = _recurrence_native_blocker(d)
        if want == "native" and why is not None:
            raise NotExpressibleError(f"{d['kind']}: {why} (form='native' forbids the Scan form)")
        if want != "scan" and why is None:
            out, hn = _recurrence_gru_node(op, d, W, x, state[0], lengths, bool(reverse))
            return out, hn
        built = export_op.build(d)
        H, kind = d["hidden_size"], d["kind"]
        if kind in export_op.SCAN_KINDS:  # IndRNN's u is (H,); sLSTM's R block-diagonal
            Wt = {"R": _block_diagonal_t(op, d, W["weight_hh"], x.dtype)} if kind == "slstm" else {}
        else:
            Wt = {n: op.Transpose(W[n], perm=[1, 0]) for n in ("weight_hh", "weight_hr", "weight_gr") if n in W}
        reset_before = kind == "gru" and not d["options"]["reset_after"]
        if reset_before:  # W_hh's rows r, z | n: the n block multiplies r ⊙ h
            W_hr, W_hz, W_hn = op.Split(W["weight_hh"], axis=0, num_outputs=3)
            Wt.update(W_hrz=op.Transpose(op.Concat(W_hr, W_hz, axis=0), perm=[1, 0]), W_hn=op.Transpose(W_hn, perm=[1, 0]))
        xw = op.MatMul(x, op.Transpose(W["weight_ih"], perm=[1, 0]))  # every step's input projection
        if d["bias"]:  # b_hh folded in where it is additive (not the reset-after candidate's; the scan cells but
            # sLSTM have none)
            fold = (kind != "gru" or reset_before) and "bias_hh" in W
            xw = op.Add(xw, op.Add(W["bias_ih"], W["bias_hh"]) if fold else W["bias_ih"])
        scanned = [xw]
        if lengths is not None:  # live[t, b] = t < lengths[b]: (T, B, 1)
            T = op.Squeeze(op.Shape(x, start=0, end=1), [0])
            steps = op.Range(op.Constant(value_int=0), T, op.Constant(value_int=1))
            live = op.Less(op.Unsqueeze(steps, [1]), op.Unsqueeze(op.Cast(lengths, to=7), [0]))
            scanned.append(op.Unsqueeze(live, [2]))
        b = _Body(f"recurrence_{kind}", x.dtype)
        states = [b.input(n, (None, size)) for n, size in zip(built.state_names, d["state_sizes"])]
        xw_t = b.input("xw", (None, len(built.blocks) * H))
        live_t = b.input("live", (None, 1), b.ir.DataType.BOOL) if lengths is not None else None

        def act(slot: str, t: Any) -> Any:
            a = activations.get(d["activations"][slot])
            if a.kind in export_op.LEARNABLE:
                return _learnable_expression(b, a.kind, W[f"{slot}.weight"], t)
            if a.kind not in _EXPRESSIONS:
                raise NotExpressibleError(f"activation {a.key} has no ONNX expression for the Scan form")
            return _EXPRESSIONS[a.kind](b, t, a)

        out, new = _recurrence_step(b, built, d, W, Wt, xw_t, states, act)
        if any(d["zoneout"]):  # zoneout in eval: p ⊙ old + (1 − p) ⊙ new
            new = tuple(s if p == 0 else b.Add(b.Mul(b.const(p), old), b.Mul(b.const(1.0 - p), s))
                        for old, s, p in zip(states, new, d["zoneout"]))
            out = out if built.output_state is None else new[built.output_state]
        if live_t is not None:  # a dead step holds the state and outputs zero
            new = tuple(b.Where(live_t, s, old) for s, old in zip(new, states))
            out = b.Where(live_t, out, b.const(0.0))
        body = b.graph([*new, out])
        *finals, Y = _scan_call(*state, *scanned, num_outputs=len(states) + 1, body=body,
                                num_scan_inputs=len(scanned), scan_input_directions=[int(reverse)] * len(scanned),
                                scan_output_directions=[int(reverse)])
        return Y, (finals[0] if len(finals) == 1 else op.Concat(*finals, axis=1))

    return translate


# -- choosing the form ------------------------------------------------------------------------------

FORMS = ("auto", "native", "scan")


def _native_blocker(name: str, kinds: Sequence[int], params: Sequence[float], zoned: bool,
                    peephole_previous: bool) -> str | None:
    """Why ONNX's own node cannot express a direction of operator ``name`` (None: it can)."""
    if zoned:
        return "zoneout (in eval its constant keep shares still mix old and new states, which ONNX's nodes cannot)"
    if peephole_previous:
        return "ONNX's LSTM has the output gate's peephole read the new cell state; this layer has " \
               "peephole_output='previous'"
    try:
        node_activations(name, kinds, params)
    except NotExpressibleError as err:
        return str(err)
    return None


_NATIVE = {"lstm": _lstm, "gru": _gru, "elman": _elman}


def _translation(cell_op: Any, want: str) -> Callable[..., Any]:
    arguments = [n for n, _ in forward_arguments(cell_op)]

    def translate(*args: Any) -> Any:
        a = dict(zip(arguments, args))
        if a["rec_mask"] is not None:
            raise NotExpressibleError(f"{cell_op.name}: recurrent dropout masks are training-time inputs; export the "
                                      f"model in eval mode (model.eval())")
        zoned = any(a[f"z{s}"] is not None for s in cell_op.states)
        why = _native_blocker(cell_op.name, a["kinds"], a["params"], zoned,
                              a.get("w_ci") is not None and not a["peep_current"])
        if want != "scan" and why is None:
            return _NATIVE[cell_op.name](*args)
        if want == "native":
            raise NotExpressibleError(f"{cell_op.name}: {why} (form='native' forbids the Scan form)")
        return _scan(cell_op, a)

    return translate


def _check_form(want: str) -> None:
    if want not in FORMS:
        raise ValueError(f"form must be one of {', '.join(map(repr, FORMS))}, got {want!r}")


def form(layer: Any, want: str = "auto") -> str:
    """Which ONNX form ``layer`` exports to (one per layer and direction): ``"ONNX LSTM nodes (4),
    activations HardSigmoid, Relu, Tanh"`` (``GRU``, ``RNN``: ONNX's own node), ``"ONNX Scan over time
    (2): <why not ONNX's node>"``, or ``"not expressible in ONNX: <why>"``. ``want`` as :func:`export`'s
    ``form``: ``"auto"`` (the node where it can, else Scan), ``"native"`` (the node or nothing),
    ``"scan"``. Needs no ONNX package."""
    from .engines.fused import cell_blockers as fused_blockers
    from .engines.fused import ops

    _check_form(want)
    cell = layer.cells[0]
    count = layer.num_layers * layer.num_directions
    if layer.backend == "reference":
        return ("not expressible in ONNX: backend='reference' was asked for, which traces as a Python loop the "
                "exporter unrolls at a fixed length (build the layer with backend='auto')")
    blockers = [b for b in cpp.cell_blockers(cell) if not b.startswith((cpp.DEVICE_BLOCKER, cpp.DTYPE_BLOCKER))]
    if blockers or fused_blockers(cell):  # not on the C++ loops' operators: the export operator, if it can
        if missing := export_op.blockers(cell):
            return (f"not expressible in ONNX: {missing[0]} (such a layer traces as a Python loop the exporter "
                    f"unrolls at a fixed length)")
        d = json.loads(export_op.describe(cell, layer.zoneout))
        why = _recurrence_native_blocker(d)
        if why is None and want != "scan":
            acts = [cpp._kind(activations.get(d["activations"][s])) for s in ("sigma_r", "sigma_z", "phi")]
            names = ", ".join(a[0] for a in node_activations("gru", *zip(*acts)))
            return f"ONNX GRU node{'s' if count > 1 else ''} ({count}), activations {names}, linear_before_reset=0"
        if want == "native":
            return f"not expressible as an ONNX node: {why}"
        return f"ONNX Scan over time ({count}): {why or 'form=scan asked for'}"
    op = ops.for_cell(cell)
    kinds, params = zip(*(cpp._kind(a) for a in cell.activation_slots().values()))
    why = _native_blocker(op.name, kinds, params, any(layer.zoneout),
                          op is ops.LSTM and cell.peephole and cell.peephole_output != "current")
    if why is None and want != "scan":
        acts = node_activations(op.name, kinds, params)
        node = {"lstm": "LSTM", "gru": "GRU", "elman": "RNN"}[op.name]
        return f"ONNX {node} node{'s' if count > 1 else ''} ({count}), activations {', '.join(a[0] for a in acts)}"
    if want == "native":
        return f"not expressible as an ONNX node: {why}"
    if missing := sorted({cpp.KINDS[k] for k in kinds} - set(_EXPRESSIONS)):
        return f"not expressible in ONNX: activation {missing[0]} has no ONNX expression for the Scan form ({why})"
    return f"ONNX Scan over time ({count}): {why or 'form=scan asked for'}"


def translation_table(form: str = "auto") -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: gatelab's operators to ONNX's
    recurrent nodes where they can express the layer, else to a Scan over time (``form`` as
    :func:`export`'s)."""
    _check_form(form)
    _opset()
    from .engines.fused import ops

    table = {getattr(torch.ops.gatelab, op.name).default: _translation(op, form) for op in ops.CELL_OPS}
    table[torch.ops.gatelab.recurrence.default] = _recurrence_translation(form)
    return table


_registered: list[bool] = []


def register_with_torch_onnx() -> bool:
    """Let a plain ``torch.onnx.export(model, args, dynamo=True)`` translate gatelab's operators (form
    ``"auto"``) without a ``custom_translation_table``; True once done. The layers call it when they see
    ``torch.onnx.is_in_onnx_export()`` while being traced: torch 2.13's exporter builds its table of
    translations after tracing, from a module-level list of its own, to which this appends gatelab's as
    non-custom entries (a ``custom_translation_table`` given to the exporter still wins). That list is
    internal to torch; where it is missing (another torch) this returns False and :func:`export` (or the
    translation table) remains the way."""
    if _registered:
        return True
    try:
        from torch.onnx._internal.exporter import _registration
        from torch.onnx._internal.exporter._torchlib import _torchlib_registry as torchlib

        torchlib.get_torchlib_ops()  # the exporter's own entries first
        entries = [_registration.OnnxDecompMeta(onnx_function=function, fx_target=target, signature=None,
                                                is_custom=False, is_complex=False)
                   for target, function in translation_table().items()]
    except Exception:  # noqa: BLE001 - torch's internals moved, or the onnx extra is missing: not registered
        return False
    torchlib._registry.extend(entries)
    _registered.append(True)
    return True


def traced_by_torch_onnx() -> bool:
    """What a layer calls while ``torch.onnx.export(..., dynamo=True)`` traces it: True when gatelab's
    translations were registered before this export began (then the layers on the PyTorch loop run the
    export operator). Otherwise registers them now (:func:`register_with_torch_onnx`), warns that this
    export began without them (torch built its table first) and the next one has them, and returns
    False: this export goes as it would have without them."""
    if _registered:
        return True
    if not register_with_torch_onnx():
        return False
    # this export keeps the way it had (the layers on the PyTorch loop trace unrolled), the next has them
    warnings.warn("gatelab: torch.onnx.export began before gatelab's ONNX translations were registered, so this "
                  "export cannot translate gatelab's operators; they are registered now and the next "
                  "torch.onnx.export in this process has them. Call gatelab.onnx.register_with_torch_onnx() once "
                  "before torch.onnx.export, or use gatelab.onnx.export", RuntimeWarning, stacklevel=2)
    return False


_layer_form = form


def export(model: torch.nn.Module, args: tuple[Any, ...], path: Any = None, *, dynamic_shapes: Any = None,
           form: str = "auto", **kwargs: Any) -> Any:
    """``torch.onnx.export(model, args, path, dynamo=True, ...)`` with :func:`translation_table`, the
    model in eval mode and without gradients; returns the ONNX program.

    ``form``: ``"auto"`` gives ONNX's own LSTM/GRU/RNN node where it can express the layer and a Scan
    over time elsewhere, ``"native"`` raises rather than use Scan, ``"scan"`` uses Scan everywhere.
    Every gatelab layer inside is checked first (:func:`form`): one that cannot be exported raises
    :class:`NotExpressibleError` naming the layer and the reason. ``dynamic_shapes`` as for
    ``torch.onnx.export`` (e.g. ``({0: "T", 1: "B"},)`` for a time-major input)."""
    from .layers.base import RecurrentLayer

    _check_form(form)
    was_training = model.training
    model.eval()
    try:
        for name, layer in model.named_modules():
            if isinstance(layer, RecurrentLayer) and (how := _layer_form(layer, form)).startswith("not expressible"):
                raise NotExpressibleError(f"{name or type(model).__name__} ({layer.kind_name}): {how}")
        kwargs.setdefault("verbose", False)  # the exporter's progress lines
        with torch.no_grad(), export_op.routing():
            return torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=dynamic_shapes,
                                     custom_translation_table=translation_table(form), **kwargs)
    finally:
        model.train(was_training)


__all__ = ["FORMS", "NotExpressibleError", "RNN_ACTIVATIONS", "export", "form", "onnx_activation", "scan_activation",
           "translation_table"]
