"""Sequence models: input (embedding or projection) -> a stack of gatelab layers -> a head.

:class:`SequenceModel` has a typed constructor; :func:`build_model` makes one from a
:class:`~gatelab.config.ModelConfig` and a task (sizes, head and objective follow the task's kind).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import ActivationSpec
from .cells import registry
from .cells.base import GateActivationSpec
from .config import ConfigError, ModelConfig
from .tasks import Task
from .tasks.base import IGNORE_INDEX

__all__ = ["SequenceModel", "UserModel", "build_model", "State"]
HEADS = ("last", "mean", "max", "attention", "every")
OBJECTIVES = ("mse", "cross_entropy")

# The recurrent state of the whole stack: one entry per layer, each what that layer returns as its
# state (a tensor, or a tuple such as (h, c)), each tensor (directions, B, size).
State = list[Tensor | tuple[Tensor, ...]]


class SequenceModel(nn.Module):
    """Input -> recurrent stack -> head, for batch-first sequences with optional lengths.

    * Input: with ``embedding_dim > 0`` the input is tokens from a vocabulary of ``input_size`` (ids
      ``(B, T)`` int64, or one-hot rows ``(B, T, input_size)``, which give the same result); without it,
      ``(B, T, input_size)`` features (ids are one-hot encoded). ``input_projection > 0`` adds a linear
      map to that size.
    * Stack: one layer of the registered cell kind ``cell`` (``"lstm"``, ``"gru"``, ``"rnn"``, ``"gated_state"``,
      any name in :func:`gatelab.cells.registry.available`) per entry of
      ``hidden_sizes``, so layers may differ in size; ``dropout`` between layers and before the head.
      The activation slots and ``layer_options`` (peephole, variant, zoneout, ...) go to every layer;
      ``per_layer`` (one mapping per layer) replaces any of them for its layer.
    * Head, a linear map to ``output_size``: ``"last"`` reads each sequence's own last step (from
      ``lengths``; for a bidirectional stack, the backward direction's first step), ``"max"`` the
      elementwise maximum and ``"attention"`` a softmax-weighted sum (a learned query vector
      ``attention_query``, zero at init: the mean) over the real steps, ``"mean"`` the mean
      over the real steps, ``"every"`` every step. ``tie_weights`` shares the embedding matrix with the
      head of a language model.
    * ``objective``: ``"mse"`` (regression, forecasting) or ``"cross_entropy"`` (classes, tokens; targets
      of ``-100`` are ignored).

    ``forward(x, lengths=None, state=None) -> (output, state)``; ``loss(batch)``; ``predict(x, lengths)``.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        cell: str = "lstm",
        hidden_sizes: Sequence[int] = (64,),
        head: str = "last",
        objective: str = "mse",
        embedding_dim: int = 0,
        input_projection: int = 0,
        tie_weights: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        activation: ActivationSpec | None = None,
        gate_activation: GateActivationSpec | None = None,
        candidate_activation: ActivationSpec | None = None,
        cell_activation: ActivationSpec | None = None,
        backend: str = "auto",
        init: str = "torch",
        forget_bias: float | None = None,
        layer_options: Mapping[str, Any] | None = None,
        per_layer: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        layer_class = registry.get(cell).layer
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; valid: {', '.join(HEADS)}")
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
        slots = {"activation": activation, "gate_activation": gate_activation,
                 "candidate_activation": candidate_activation, "cell_activation": cell_activation}
        slots = {k: v for k, v in slots.items() if v is not None}  # the layer's signature checks them
        self.input_size, self.output_size = input_size, output_size
        self.cell, self.head_mode, self.objective = cell, head, objective
        self.hidden_sizes = tuple(hidden_sizes)
        self.bidirectional = bidirectional

        size = input_size
        self.embedding = nn.Embedding(input_size, embedding_dim) if embedding_dim else None
        size = embedding_dim or size
        self.input_projection = nn.Linear(size, input_projection) if input_projection else None
        size = input_projection or size

        options = dict(layer_options or {})
        per_layer = list(per_layer or [{}] * len(self.hidden_sizes))
        if len(per_layer) != len(self.hidden_sizes):
            raise ValueError(f"per_layer: expected one mapping per entry of hidden_sizes ({len(self.hidden_sizes)}), "
                             f"got {len(per_layer)}")
        self.layers = nn.ModuleList()
        for hidden, own in zip(self.hidden_sizes, per_layer):
            layer = layer_class(size, hidden, batch_first=True, bidirectional=bidirectional, backend=backend,
                                init=init, forget_bias=forget_bias, **{**slots, **options, **own})
            self.layers.append(layer)
            size = layer.output_size * layer.num_directions
        self.drop = nn.Dropout(dropout)
        self.attention_query = nn.Parameter(torch.zeros(size)) if head == "attention" else None  # (D·H,): uniform at init
        self.head = nn.Linear(size, output_size)
        if tie_weights:
            if self.embedding is None or head != "every":
                raise ValueError("tie_weights shares the embedding with a language-model head: it needs "
                                 "embedding_dim > 0 and head='every'")
            if self.embedding.weight.shape != self.head.weight.shape:
                raise ValueError(f"tie_weights needs the last layer's output size ({size}) to equal embedding_dim "
                                 f"({embedding_dim}) and output_size to equal input_size")
            self.head.weight = self.embedding.weight

    # -- forward ---------------------------------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        """Input ids ``(B, T)`` or features ``(B, T, I)`` to the stack's input ``(B, T, E)``."""
        if self.embedding is not None:
            x = self.embedding(x) if not x.is_floating_point() else x @ self.embedding.weight  # (B, T, E)
        elif not x.is_floating_point():
            x = F.one_hot(x, self.input_size).to(self.head.weight.dtype)  # (B, T, V)
        if self.input_projection is not None:
            x = self.input_projection(x)
        return x

    def forward(
        self, x: Tensor, lengths: Tensor | None = None, state: State | None = None
    ) -> tuple[Tensor, State]:
        """Run the model on a batch-first batch; returns ``(output, state)``.

        ``output`` is ``(B, output_size)`` for the ``last`` and ``mean`` heads and ``(B, T, output_size)``
        for ``every`` (zero-input rows past each length). ``state`` (one entry per layer) continues a
        previous call, as truncated BPTT and sampling do; ``None`` starts from zeros.
        """
        T = x.shape[1]
        if lengths is not None and not torch.compiler.is_compiling() and bool((lengths == T).all()):
            lengths = None  # every sequence is full: the faster unpadded path (not while tracing: data-dependent)
        h = self.encode(x)
        new_state: State = []
        for k, layer in enumerate(self.layers):
            if k:
                h = self.drop(h)
            h, s = layer(h, None if state is None else state[k], lengths=lengths)  # (B, T, D·H)
            new_state.append(s)
        return self.head(self.drop(self._pool(h, lengths))), new_state

    def _pool(self, h: Tensor, lengths: Tensor | None) -> Tensor:
        """What the head reads from the stack's output ``h (B, T, D·H)``."""
        if self.head_mode == "every":
            return h
        B, T, _ = h.shape
        last = (lengths.to(h.device) - 1) if lengths is not None else torch.full((B,), T - 1, device=h.device)
        real = torch.arange(T, device=h.device)[None, :] <= last[:, None]  # (B, T): the real steps
        if self.head_mode == "mean":
            if lengths is None:
                return h.mean(1)
            return (h * real.unsqueeze(2)).sum(1) / (last + 1).unsqueeze(1).to(h.dtype)
        if self.head_mode == "max":  # over the real steps only; padded steps are -inf
            return h.masked_fill(~real.unsqueeze(2), float("-inf")).amax(1)
        if self.head_mode == "attention":  # a learned query: softmax over the real steps of q · h_t
            scores = (h @ self.attention_query).masked_fill(~real, float("-inf"))  # (B, T)
            return (torch.softmax(scores, 1).unsqueeze(2) * h).sum(1)
        rows = torch.arange(B, device=h.device)
        if not self.bidirectional:
            return h[rows, last]  # (B, H): each sequence's own last step
        fwd, bwd = h.chunk(2, dim=2)
        return torch.cat([fwd[rows, last], bwd[:, 0]], dim=1)  # the backward direction ends at step 0

    # -- objective -------------------------------------------------------------------------------

    def criterion(self, output: Tensor, y: Tensor, lengths: Tensor | None = None, reduction: str = "mean") -> Tensor:
        """The objective of ``output`` against targets ``y`` (padded per-step targets are ignored)."""
        if self.objective == "cross_entropy":
            logits = output.reshape(-1, output.shape[-1])
            return F.cross_entropy(logits, y.reshape(-1).long(), ignore_index=IGNORE_INDEX, reduction=reduction)
        y = y.reshape(output.shape).to(output.dtype)
        if self.head_mode != "every" or lengths is None:
            return F.mse_loss(output, y, reduction=reduction)
        mask = (torch.arange(output.shape[1])[None, :] < lengths[:, None]).to(output.device)  # (B, T)
        se = ((output - y) ** 2)[mask].sum()
        return se if reduction == "sum" else se / (mask.sum() * output.shape[-1])

    def n_targets(self, y: Tensor, lengths: Tensor | None = None) -> int:
        """How many terms :meth:`criterion` averages over for targets ``y``."""
        if self.objective == "cross_entropy":
            return int((y != IGNORE_INDEX).sum())
        if self.head_mode == "every" and lengths is not None:
            return int(lengths.sum()) * self.output_size
        return y.numel()

    def loss(self, batch: Any, state: State | None = None) -> tuple[Tensor, State]:
        """Mean objective on a :class:`gatelab.tasks.Batch` (batch-first); returns ``(loss, state)``."""
        output, state = self(batch.x, batch.lengths, state)
        return self.criterion(output, batch.y, batch.lengths), state

    @torch.no_grad()
    def predict(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Outputs in eval mode without gradients (logits for classification and language models)."""
        was_training = self.training
        self.eval()
        try:
            return self(x, lengths)[0]
        finally:
            self.train(was_training)

    @property
    def engines(self) -> list[str]:
        """The engine each recurrent layer runs in the current mode (``layer.engine_name``)."""
        return [layer.engine_name for layer in self.layers]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class UserModel(nn.Module):
    """A model of your own in gatelab's trainer (:func:`gatelab.fit` wraps it): ``module(x)``, or
    ``module(x, lengths)`` when its ``forward`` takes ``lengths``, with ``x`` batch-first ``(B, T, I)``
    padded past each length, returns the output (or a tuple whose first item is the output): ``(B,
    output_size)`` for a task with one target per sequence (class scores, or the regression target),
    ``(B, T, output_size)`` for one with a target at every step. The objective follows the task
    (cross-entropy for classification, MSE for regression) as for a :class:`SequenceModel`. It
    carries no state between calls, so truncated BPTT needs a SequenceModel."""

    def __init__(self, module: nn.Module, task: Any) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.head_mode = "every" if task.per_step else "last"
        self.objective = "cross_entropy" if task.kind in ("classification", "lm") else "mse"
        self.output_size = task.output_size
        self._takes_lengths = "lengths" in inspect.signature(module.forward).parameters

    def forward(self, x: Tensor, lengths: Tensor | None = None, state: State | None = None) -> tuple[Tensor, None]:
        if state is not None:
            raise ValueError(f"{type(self.module).__name__}: a model of your own carries no state between calls")
        out = self.module(x, lengths) if self._takes_lengths else self.module(x)
        out = out[0] if isinstance(out, tuple) else out
        want = (x.shape[0], self.output_size) if self.head_mode == "last" else (*x.shape[:2], self.output_size)
        if not isinstance(out, Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{type(self.module).__name__}: expected an output of shape {want} (batch, "
                             f"{'steps, ' if self.head_mode == 'every' else ''}task outputs), got {got}")
        return out, None

    criterion = SequenceModel.criterion
    n_targets = SequenceModel.n_targets
    loss = SequenceModel.loss
    predict = SequenceModel.predict

    @property
    def engines(self) -> list[str]:
        """The engine of every gatelab layer inside the module."""
        from .layers.base import RecurrentLayer

        return [m.engine_name for m in self.module.modules() if isinstance(m, RecurrentLayer)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def detach_state(state: State | None) -> State | None:
    """The same state cut from the graph (truncated BPTT carries it into the next window)."""
    if state is None:
        return None
    return [tuple(t.detach() for t in s) if isinstance(s, tuple) else s.detach() for s in state]


def build_model(config: ModelConfig, task: Task) -> SequenceModel:
    """The model ``config`` describes, sized for ``task``: ``head="auto"`` reads every step of per-step
    tasks and the last step otherwise; the objective is cross-entropy for classification and language
    models, MSE for regression and forecasting."""
    head = config.head if config.head != "auto" else ("every" if task.per_step else "last")
    if task.per_step and head != "every":
        raise ConfigError(f"model.head: task {task.name!r} has a target at every step; it needs head 'every' "
                          f"(or 'auto'), got {config.head!r}")
    if task.kind == "lm" and config.bidirectional:
        raise ConfigError(f"model.bidirectional: task {task.name!r} is a language model, and a reverse direction "
                          f"reads the characters it is asked to predict; use a unidirectional stack")
    objective = "cross_entropy" if task.kind in ("classification", "lm") else "mse"
    try:
        return SequenceModel(
            task.input_size, task.output_size, cell=config.cell, hidden_sizes=config.hidden_sizes, head=head,
            objective=objective, embedding_dim=config.embedding_dim, input_projection=config.input_projection,
            tie_weights=config.tie_weights, dropout=config.dropout, bidirectional=config.bidirectional,
            backend=config.backend, init=config.init, forget_bias=config.forget_bias,
            layer_options=config.options, per_layer=config.layers, **config.activation_slots(),
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"[model]: {err}") from err
