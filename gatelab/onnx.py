"""ONNX export with ONNX's own recurrent nodes: :func:`export`, or :func:`translation_table` for
``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``.

The fused engine's operators (``torch.ops.gatelab.lstm``, ``gru``, ``elman``; a traced layer with
torch's default activations runs them too) become one ONNX ``LSTM`` / ``GRU`` / ``RNN`` node per layer
and direction where ONNX's operator can express the layer:

* ONNX's LSTM takes one activation for the i, f and o gates, one for the candidate and one for the
  cell output; its GRU one for both gates and one for the candidate; its RNN one. Each is one of
  ONNX's eleven RNN activations (``Relu``, ``Tanh``, ``Sigmoid``, ``Affine``, ``LeakyRelu``,
  ``ThresholdedRelu``, ``ScaledTanh``, ``HardSigmoid``, ``Elu``, ``Softsign``, ``Softplus``), with
  ``activation_alpha`` / ``activation_beta`` always written out for the activations that take them,
  in order (gatelab's and torch's hard_sigmoid has slope 1/6, ONNX's default is 0.2). gatelab's
  ``identity`` is ``Affine(1, 0)``.
* peepholes (o reading the new cell state, ``peephole_output="current"``), padded ``lengths`` as
  ``sequence_lens``, bidirectional and stacked layers (one node per direction), the GRU in torch's
  reset-after form (``linear_before_reset=1``); T and B stay dynamic.

What ONNX's nodes cannot express (per-gate activation mappings, elliott, gelu, silu and the other
activations ONNX's RNN operators lack, the gated-state cell, the layer-norm LSTM, the reset-before
GRU, projection, learnable activations) raises :class:`NotExpressibleError` naming the reason; a
``Loop`` form for those is not built yet (``backend="reference"`` exports an unrolled graph at a fixed
length meanwhile). Export in eval mode (dropout and zoneout masks are training-time inputs).

Needs ``onnx`` and ``onnxscript`` (and ``onnxruntime`` to run the result): gatelab's onnx extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .engines.fused import cpp
from .engines.fused.ops import save_z
from .tasks.base import MissingExtraError

# ONNX's recurrent-operator activations (onnx.ai LSTM/GRU/RNN "activations")
RNN_ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh", "HardSigmoid",
                   "Elu", "Softsign", "Softplus")


class NotExpressibleError(ValueError):
    """The layer has something ONNX's own recurrent node cannot express."""


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


def _not_expressible(name: str):
    def translate(*args: Any) -> Any:
        node_activations(name, (), ())  # raises, naming the cell

    return translate


def form(layer: Any) -> str:
    """Which ONNX form ``layer`` exports to: ``"ONNX LSTM node"`` (``GRU``, ``RNN``), one per layer and
    direction, or why ONNX's nodes cannot express it. Needs no ONNX package."""
    from .engines.fused import ops

    if any(layer.zoneout):
        return ("not expressible as an ONNX node: zoneout (in eval its constant keep shares still mix old and new "
                "states, which ONNX's nodes cannot)")
    cell = layer.cells[0]
    if blockers := [b for b in cpp.cell_blockers(cell) if not b.startswith((cpp.DEVICE_BLOCKER, cpp.DTYPE_BLOCKER))]:
        return f"not expressible as an ONNX node: {blockers[0]} (only what the C++ loops run maps to ONNX's nodes)"
    op = ops.for_cell(cell)
    kinds, params = zip(*(cpp._kind(a) for a in cell.activation_slots().values()))
    try:
        if op is ops.LSTM and cell.peephole and cell.peephole_output != "current":
            raise NotExpressibleError("ONNX's LSTM peephole on o reads the new cell state "
                                      "(peephole_output='previous' here)")
        acts = node_activations(op.name, kinds, params)
    except NotExpressibleError as err:
        return f"not expressible as an ONNX node: {err}"
    node = {"lstm": "LSTM", "gru": "GRU", "elman": "RNN"}[op.name]
    count = layer.num_layers * layer.num_directions
    return f"ONNX {node} node{'s' if count > 1 else ''} ({count}), activations {', '.join(a[0] for a in acts)}"


def translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: gatelab's operators to ONNX's
    recurrent nodes."""
    _opset()
    ops = torch.ops.gatelab
    return {ops.lstm.default: _lstm, ops.gru.default: _gru, ops.elman.default: _elman,
            ops.lstm_ln.default: _not_expressible("lstm_ln"), ops.gated_state.default: _not_expressible("gated_state")}


def export(model: torch.nn.Module, args: tuple[Any, ...], path: Any = None, *, dynamic_shapes: Any = None,
           **kwargs: Any) -> Any:
    """``torch.onnx.export(model, args, path, dynamo=True, ...)`` with :func:`translation_table`, the
    model in eval mode and without gradients; returns the ONNX program. Every gatelab layer inside is
    checked first (:func:`form`): one ONNX's nodes cannot express raises :class:`NotExpressibleError`
    naming the layer and the reason. ``dynamic_shapes`` as for
    ``torch.onnx.export`` (e.g. ``({0: "T", 1: "B"},)`` for a time-major input)."""
    from .layers.base import RecurrentLayer

    for name, layer in model.named_modules():
        if isinstance(layer, RecurrentLayer) and (how := form(layer)).startswith("not expressible"):
            raise NotExpressibleError(f"{name or type(model).__name__} ({layer.kind_name}): {how}; a Loop form is not "
                                      f"built yet (backend='reference' exports an unrolled graph at a fixed length)")
    kwargs.setdefault("verbose", False)  # the exporter's progress lines
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=dynamic_shapes,
                                     custom_translation_table=translation_table(), **kwargs)
    finally:
        model.train(was_training)


__all__ = ["NotExpressibleError", "RNN_ACTIVATIONS", "export", "form", "onnx_activation", "translation_table"]
