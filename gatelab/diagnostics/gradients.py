"""Per-step gradient norms ‖∂L/∂h_t‖ (and ‖∂L/∂c_t‖) for any model built from gatelab layers.

How it works whatever engine a layer runs: the native and fused engines never materialise the
per-step states as autograd nodes (torch's kernels and gatelab's hand-written BPTT keep them inside
one backward function), so the diagnostics *rerun* the model's recurrent layers on the reference
engine's loop, keep every step's state tensors, and ask autograd for ``∂L/∂state_t`` with
``torch.autograd.grad``. The reference loop computes the same function as the other engines (the
engine tests tie them), so the numbers are those of the layer as configured, on any engine. Nothing
accumulates into the parameters' ``.grad``: a diagnostic in the middle of a training step leaves the
optimiser's gradients alone.

:func:`recording` is that rerun as a context manager; :mod:`.jacobian` and :mod:`.gates` use it too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..layers.base import DirectionCall, RecurrentLayer
from ..tasks import Batch

__all__ = ["CellTrace", "GradientFlow", "gradient_flow", "recording", "recurrent_layers", "unpack_batch", "trace_key"]

LossFn = Callable[[Any, Any], Tensor]


def recurrent_layers(model: nn.Module) -> list[tuple[str, RecurrentLayer]]:
    """Every gatelab :class:`~gatelab.layers.RecurrentLayer` in ``model`` (``model`` itself included),
    with its qualified module name (``""`` for ``model`` itself)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RecurrentLayer)]


@dataclass
class CellTrace:
    """What one cell (one stacked layer and direction) received and produced in a recorded forward.

    ``states[t]`` is the state tuple after reading ``x[t]`` (input order, also for the reverse
    direction), before the padding mask; ``initial`` is the state before the first step it reads.
    """

    module: str
    layer: int
    direction: int
    state_names: tuple[str, ...]
    cell: nn.Module
    x: Tensor  # (T, B, I): the cell's input sequence
    initial: tuple[Tensor, ...]  # each (B, size)
    lengths: Tensor | None  # (B,) or None
    states: list[tuple[Tensor, ...]] = field(default_factory=list)
    call: int = 0  # how many earlier recorded calls of the same cell this forward made
    weights: dict[str, Tensor] = field(default_factory=dict)  # the cell's parameters as that call bound them

    @property
    def reverse(self) -> bool:
        return self.direction == 1


def trace_key(trace: CellTrace, state: str | None = None) -> str:
    """``"rnn.l0"`` / ``"l1_reverse.c"``: torch-style names, the module's path in front when it has one."""
    key = f"l{trace.layer}{'_reverse' if trace.reverse else ''}"
    if trace.module:
        key = f"{trace.module}.{key}"
    if trace.call:
        key += f"#{trace.call}"
    return key if state is None else f"{key}.{state}"


@contextlib.contextmanager
def recording(model: nn.Module, *, leaf_states: bool = True) -> Iterator[list[CellTrace]]:
    """Within the block, every recurrent layer of ``model`` runs on the reference loop and appends a
    :class:`CellTrace` per cell and call to the yielded list.

    It attaches through each layer's public step hook
    (:meth:`~gatelab.layers.RecurrentLayer.register_step_hook`), which runs the reference loop while
    registered; the hooks are removed on exit (also after an error). ``leaf_states``: an initial state
    that does not require grad is replaced by a leaf that does, so the states have gradients even when
    the parameters are frozen.
    """
    layers = recurrent_layers(model)
    if not layers:
        raise TypeError(f"{type(model).__name__} contains no gatelab recurrent layer (gatelab.RNN, LSTM, GRU, "
                        f"GatedStateRNN); the diagnostics read the states of those")
    traces: list[CellTrace] = []
    handles = []
    try:
        for name, layer in layers:
            handles.append(layer.register_step_hook(_recorder(name, traces, leaf_states)))
        yield traces
    finally:
        for handle in handles:
            handle.remove()


def _recorder(name: str, traces: list[CellTrace], leaf_states: bool) -> Callable[[DirectionCall], Callable]:
    def hook(call: DirectionCall) -> Callable:
        if leaf_states and torch.is_grad_enabled():
            call.state = tuple(s if s.requires_grad else s.detach().requires_grad_() for s in call.state)
        calls = sum(1 for tr in traces if tr.module == name and (tr.layer, tr.direction) == (call.layer, call.direction))
        trace = CellTrace(name, call.layer, call.direction, tuple(call.cell.state_names), call.cell, call.x,
                          call.state, call.lengths, [()] * call.x.shape[0], calls,
                          {n: p for n, p in call.cell.named_parameters()})
        traces.append(trace)
        return trace.states.__setitem__

    return hook


# -- batches and losses ----------------------------------------------------------------------------


def unpack_batch(batch: Any) -> tuple[Tensor, Any, Tensor | None]:
    """``(x, y, lengths)`` from a tensor, ``(x, y)``, ``(x, y, lengths)``, a :class:`gatelab.tasks.Batch`
    or a mapping with keys ``x``/``input``, ``y``/``target`` and optionally ``lengths``."""
    if isinstance(batch, Tensor):
        return batch, None, None
    if isinstance(batch, Mapping):
        x = batch.get("x", batch.get("input"))
        if x is None:
            raise ValueError(f"a batch mapping needs the key 'x' (or 'input'); got keys {sorted(batch)}")
        return x, batch.get("y", batch.get("target")), batch.get("lengths")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        lengths = batch[2] if len(batch) >= 3 and (batch[2] is None or isinstance(batch[2], Tensor)) else None
        return batch[0], batch[1], lengths
    raise TypeError(f"expected a batch as x, (x, y), (x, y, lengths) or a mapping, got {type(batch).__name__}")


def _layer_input(layer: RecurrentLayer, batch: Any, x: Tensor) -> Tensor:
    """``x`` in the layer's layout: a tasks.Batch says whether it is batch-first."""
    batch_first = getattr(batch, "batch_first", None)
    if batch_first is not None and x.dim() == 3 and bool(batch_first) != layer.batch_first:
        return x.transpose(0, 1)
    return x


def last_step(out: Tensor, lengths: Tensor | None, batch_first: bool) -> Tensor:
    """The output at each sequence's last real step: ``(B, O)`` from ``(T, B, O)`` / ``(B, T, O)``."""
    if out.dim() == 2:  # unbatched (T, O)
        return out[-1:]
    seq = out.transpose(0, 1) if batch_first else out  # (T, B, O)
    if lengths is None:
        return seq[-1]
    idx = (lengths.to(seq.device) - 1).view(1, -1, 1).expand(1, seq.shape[1], seq.shape[2])
    return seq.gather(0, idx)[0]


def compute_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None = None) -> Tensor:
    """The scalar loss the diagnostics differentiate.

    * ``loss_fn`` given: ``loss_fn(output, y)``, where ``output`` is ``model(x)`` (a bare layer gets
      ``lengths`` too and returns ``(out, h_n)`` as usual);
    * else ``model.loss(batch)`` when the model has one (the workbench's models do; a ``(loss, state)``
      return counts as ``loss``, and a plain ``(x, y[, lengths])`` batch is handed over as a
      batch-first :class:`gatelab.tasks.Batch`);
    * else, for a bare layer, the MSE of the last real step's output against ``y`` (broadcast; zero
      when ``y`` is None).
    """
    x, y, lengths = unpack_batch(batch)
    if isinstance(model, RecurrentLayer):
        x = _layer_input(model, batch, x)
        if loss_fn is not None:
            return loss_fn(model(x, lengths=lengths), y)
        out, _ = model(x, lengths=lengths)
        last = last_step(out, lengths, model.batch_first)
        target = torch.zeros_like(last) if y is None else torch.as_tensor(y, dtype=last.dtype, device=last.device)
        return ((last - target) ** 2).mean()
    if loss_fn is not None:
        return loss_fn(model(x), y)
    if callable(getattr(model, "loss", None)):
        if not hasattr(batch, "x"):
            batch = Batch(x, y, lengths, True)
        loss = model.loss(batch)
        return loss[0] if isinstance(loss, tuple) else loss
    raise TypeError(f"{type(model).__name__} has no .loss(batch); pass loss_fn=(output, y) -> loss")


# -- the gradient norms ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GradientFlow:
    """‖∂L/∂state_t‖ per step for every recurrent layer, direction and state tensor.

    ``norms[key]`` is a ``(T,)`` float64 array in input order: entry ``t`` is the Frobenius norm of the
    gradient of the batch loss with respect to the whole ``(B, size)`` state after reading ``x_t``.
    Keys are torch-style: ``"l0.h"``, ``"l1_reverse.c"``, prefixed with the module path inside a model
    (``"rnn.l0.h"``). ``reverse[key]`` tells the direction. ``engines`` maps each layer's module name
    to the engine it runs by itself (the numbers come from the reference loop either way).
    """

    loss: float
    norms: dict[str, np.ndarray]
    reverse: dict[str, bool]
    engines: dict[str, str]
    batch_size: int
    steps: int
    memory: dict[str, str] = field(default_factory=dict)  # layer key ("rnn.l0") -> its cell's memory state

    @property
    def default_key(self) -> str:
        """The last layer's forward direction, first state (``h``; ``s`` for the gated-state cell)."""
        forward = [k for k in self.norms if not self.reverse[k]]
        last_layer = forward[-1].rsplit(".", 1)[0]
        return next(k for k in forward if k.rsplit(".", 1)[0] == last_layer)

    def by_lag(self, key: str | None = None) -> np.ndarray:
        """``norms[key]`` ordered by lag: entry ``k`` is the norm ``k`` steps before the direction's
        last step (the padded end when lengths differ). This is what :func:`~.verdict` reads."""
        key = key or self.default_key
        if key not in self.norms:
            raise KeyError(f"no gradient norms for {key!r}; have {', '.join(self.norms)}")
        n = self.norms[key]
        return n.copy() if self.reverse[key] else n[::-1].copy()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: loss, sizes, engines and every norm series (input order)."""
        return {
            "loss": self.loss, "batch_size": self.batch_size, "steps": self.steps, "engines": dict(self.engines),
            "norms": {k: v.tolist() for k, v in self.norms.items()}, "reverse": dict(self.reverse),
        }


def gradient_flow(model: nn.Module, batch: Any, loss_fn: LossFn | None = None) -> GradientFlow:
    """‖∂L/∂h_t‖ (and ‖∂L/∂c_t‖ for an LSTM) per time step, layer and direction.

    ``model`` is a gatelab layer or any module containing some; ``batch`` is ``x``, ``(x, y)``,
    ``(x, y, lengths)``, a :class:`gatelab.tasks.Batch` or a mapping; the loss is chosen as in
    :func:`compute_loss`. The layers are rerun on the reference loop (see the module docstring), in
    the model's current train/eval mode: in training mode dropout masks are drawn afresh. Parameter
    ``.grad`` fields are not touched.
    """
    engines = {name: layer.engine_name for name, layer in recurrent_layers(model)}
    with torch.enable_grad(), recording(model) as traces:
        loss = compute_loss(model, batch, loss_fn)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"the loss must be a scalar tensor, got {loss!r}")
    if not loss.requires_grad:
        raise ValueError("the loss does not depend on the recurrent states (it does not require grad)")
    tensors = [s for tr in traces for step in tr.states for s in step]
    grads = iter(torch.autograd.grad(loss, tensors, allow_unused=True))
    norms: dict[str, np.ndarray] = {}
    reverse: dict[str, bool] = {}
    for tr in traces:
        per_step = [[next(grads) for _ in step] for step in tr.states]
        for j, name in enumerate(tr.state_names):
            key = trace_key(tr, name)
            norms[key] = np.array([0.0 if g[j] is None else float(g[j].detach().double().norm()) for g in per_step])
            reverse[key] = tr.reverse
    memory = {trace_key(tr): tr.cell.memory_state or tr.state_names[0] for tr in traces}
    first = traces[0]
    return GradientFlow(float(loss.detach()), norms, reverse, engines, int(first.x.shape[1]), int(first.x.shape[0]),
                        memory)
