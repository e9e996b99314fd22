"""The comparison behind ``gatelab diagnose`` and docs/diagnostics.md: several recurrent layers on one
task, diagnosed at initialisation, trained briefly with a loop of a few lines, diagnosed again.

It has its own small last-step model and loop so that it does not depend on the workbench; a
workbench model works with every diagnostic directly (anything with ``.loss(batch)``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cells import registry
from ..layers import RecurrentLayer
from ..tasks import Batch, Task, collate
from .callback import GradientFlowCallback
from .gates import GateStatistics, gate_statistics
from .gradients import GradientFlow, gradient_flow, last_step, unpack_batch
from .jacobian import jacobian_norms
from .verdict import state_verdicts, verdict

__all__ = ["ModelSpec", "ADDING_COMPARISON", "LastStepModel", "build_model", "fit", "evaluate", "Diagnosis",
           "diagnose", "ConfigResult", "compare"]


@dataclass(frozen=True)
class ModelSpec:
    """A recurrent layer by name (``rnn``, ``lstm``, ``gru``, ``gated_state``), its size and its
    keyword options (activations, ``init`` ...), under a label."""

    label: str
    cell: str
    hidden_size: int = 64
    options: dict[str, Any] = field(default_factory=dict)


# The experiment of docs/diagnostics.md; seed 004 proposes ReLU gates for the LSTM.
ADDING_COMPARISON: tuple[ModelSpec, ...] = (
    ModelSpec("Elman sigmoid", "rnn", options={"activation": "sigmoid"}),
    ModelSpec("Elman tanh", "rnn", options={"activation": "tanh"}),
    ModelSpec("LSTM", "lstm"),
    ModelSpec("GRU", "gru"),
    ModelSpec("IRNN", "rnn", options={"activation": "relu", "init": "identity"}),
    ModelSpec("LSTM ReLU gates", "lstm", options={"gate_activation": "relu"}),
)


class LastStepModel(nn.Module):
    """``x (B, T, I)`` → recurrent layer → linear head on the last real step; MSE (regression) or
    cross-entropy (classification) as ``loss(batch)``."""

    def __init__(self, rnn: RecurrentLayer, output_size: int, kind: str = "regression") -> None:
        super().__init__()
        if not rnn.batch_first:
            raise ValueError("LastStepModel takes batch-first input; build the layer with batch_first=True")
        if kind not in ("regression", "classification"):
            raise ValueError(f"LastStepModel handles regression and classification tasks, not {kind!r}")
        self.rnn = rnn
        self.kind = kind
        self.head = nn.Linear(rnn.num_directions * rnn.output_size, output_size,
                              dtype=rnn.cells[0].weight_ih.dtype)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        out, _ = self.rnn(x, lengths=lengths)  # (B, T, D·O)
        return self.head(last_step(out, lengths, batch_first=True))  # (B, output_size)

    def loss(self, batch: Any) -> Tensor:
        x, y, lengths = unpack_batch(batch)
        pred = self(x, lengths)
        if self.kind == "classification":
            return F.cross_entropy(pred, y.reshape(-1).long())
        return F.mse_loss(pred, y.to(pred.dtype).reshape(pred.shape))


def build_model(spec: ModelSpec, task: Task, seed: int = 0) -> LastStepModel:
    """The layer of ``spec`` (batch-first) with a last-step head for ``task``, seeded."""
    if getattr(task, "per_step", False):
        raise ValueError(f"task {task.name!r} has a target at every step; the diagnose comparison handles "
                         f"one target per sequence (regression or classification)")
    torch.manual_seed(seed)
    layer = registry.get(spec.cell).layer(task.input_size, spec.hidden_size, batch_first=True, **spec.options)
    return LastStepModel(layer, task.output_size, task.kind)


class _Run:
    """What a callback sees of a run (the workbench's protocol): model, run_dir, step, task."""

    def __init__(self, model: nn.Module, run_dir: Path | None, task: Task) -> None:
        self.model, self.run_dir, self.task, self.step = model, run_dir, task, 0


def fit(
    model: nn.Module, task: Task, *, steps: int, batch_size: int = 64, lr: float = 1e-3, optimizer: str = "adam",
    clip: float | None = 1.0, seed: int = 0, callbacks: Sequence[Any] = (), run_dir: Path | None = None,
) -> list[float]:
    """Train ``model`` for ``steps`` minibatches of the training split; return the loss per step."""
    make = {"adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}
    if optimizer not in make:
        raise ValueError(f"optimizer must be one of {', '.join(make)}, got {optimizer!r}")
    opt = make[optimizer](model.parameters(), lr=lr)
    train = task.splits()[0]
    gen = torch.Generator().manual_seed(seed)
    run = _Run(model, run_dir, task)
    losses: list[float] = []
    model.train()
    for cb in callbacks:
        cb.on_train_start(run)
    for step in range(1, steps + 1):
        batch = collate([train[i] for i in torch.randint(len(train), (batch_size,), generator=gen).tolist()])
        loss = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(float(loss.detach()))
        run.step = step
        for cb in callbacks:
            cb.on_step_end(run, step, loss.detach(), batch)
    for cb in callbacks:
        cb.on_train_end(run)
    return losses


@torch.no_grad()
def evaluate(model: LastStepModel, task: Task, split: str = "test", batch_size: int = 500) -> float:
    """Mean loss of ``model`` over ``split`` (MSE or cross-entropy)."""
    was = model.training
    model.eval()
    data = task.split(split)
    total = 0.0
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        total += float(model.loss(collate(items))) * len(items)
    model.train(was)
    return total / len(data)


@dataclass
class Diagnosis:
    """Everything measured on one model at one moment (see :func:`diagnose`)."""

    flow: GradientFlow
    jacobian: Any  # (T+1,) by lag, or None for variable-length data
    gates: GateStatistics

    def summary(self) -> dict[str, Any]:
        key = self.flow.default_key
        out = {
            "loss": self.flow.loss,
            "gradient": verdict(self.flow.by_lag(key)).to_dict(),
            "gradient_key": key,
            "states": state_verdicts(self.flow).to_dict(),
            "saturation": self.gates.saturation,
            "dead": self.gates.dead,
            "spectra": self.gates.spectra,
        }
        if self.jacobian is not None:
            out["jacobian"] = verdict(self.jacobian).to_dict()
            out["jacobian_norm_at_T"] = float(self.jacobian[-1])
        return out


def diagnose(model: nn.Module, batch: Batch, jacobian_items: int = 8) -> Diagnosis:
    """Gradient flow, Jacobian norms of the first recurrent layer's whole state (first
    ``jacobian_items`` sequences, largest per-sequence norm; skipped when lengths differ) and gate
    statistics of ``model`` (anything with ``.loss(batch)``) on a batch-first ``batch``, in eval mode."""
    was = model.training
    model.eval()
    try:
        flow = gradient_flow(model, batch)
        gates = gate_statistics(model, batch)
        jac = None
        if batch.lengths is None or bool((batch.lengths == batch.x.shape[1]).all()):
            n = jacobian_items
            head = Batch(batch.x[:n], batch.y[:n], None if batch.lengths is None else batch.lengths[:n], True)
            jac = jacobian_norms(model, head, state="all", reduce="max")
    finally:
        model.train(was)
    return Diagnosis(flow, jac, gates)


@dataclass
class ConfigResult:
    """One configuration of :func:`compare`: diagnoses before and after training and the losses."""

    spec: ModelSpec
    engine: str
    initial: Diagnosis
    trained: Diagnosis | None
    heatmap: tuple[list[int], list[list[float]]] | None
    losses: list[float]
    test_loss_initial: float
    test_loss: float | None
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.spec.label, "cell": self.spec.cell, "hidden_size": self.spec.hidden_size,
            "options": self.spec.options, "engine": self.engine, "initial": self.initial.summary(),
            "trained": None if self.trained is None else self.trained.summary(),
            "test_loss_initial": self.test_loss_initial, "test_loss": self.test_loss,
            "train_loss_last50": (sum(self.losses[-50:]) / len(self.losses[-50:])) if self.losses else None,
            "seconds": self.seconds,
        }


def compare(
    specs: Sequence[ModelSpec], task: Task, *, train_steps: int = 0, batch_size: int = 64, lr: float = 1e-3,
    optimizer: str = "adam", clip: float | None = 1.0, seed: int = 0, every: int = 25, diagnostic_items: int = 64,
    log: Any = None,
) -> list[ConfigResult]:
    """Diagnose each spec at initialisation, train it ``train_steps`` steps (recording the gradient flow
    every ``every`` steps), diagnose again; the diagnostic batch is the first ``diagnostic_items``
    test sequences, the same for every configuration and moment."""
    test = task.split("test")
    batch = collate([test[i] for i in range(min(diagnostic_items, len(test)))])
    results = []
    for spec in specs:
        start = time.perf_counter()
        model = build_model(spec, task, seed)
        initial = diagnose(model, batch)
        loss0 = evaluate(model, task)
        trained = heat = None
        losses: list[float] = []
        test_loss = None
        if train_steps > 0:
            cb = GradientFlowCallback(every, batch=batch, gates=False)
            losses = fit(model, task, steps=train_steps, batch_size=batch_size, lr=lr, optimizer=optimizer,
                         clip=clip, seed=seed, callbacks=[_NoSave(cb)])
            trained = diagnose(model, batch)
            test_loss = evaluate(model, task)
            heat = cb.heatmap(initial.flow.default_key)
        result = ConfigResult(spec, model.rnn.engine_name, initial, trained, heat, losses, loss0, test_loss,
                              time.perf_counter() - start)
        results.append(result)
        if log is not None:
            log(f"{spec.label:<18} engine {result.engine:<9} init {state_verdicts(initial.flow)}; "
                + (f"trained {state_verdicts(trained.flow)}; test loss {test_loss:.4f}; " if trained else "")
                + f"{result.seconds:.0f} s")
    return results


class _NoSave:
    """Forwards the callback protocol but keeps the records in memory (compare writes its own files)."""

    def __init__(self, cb: GradientFlowCallback) -> None:
        self.cb = cb

    def on_train_start(self, run: Any) -> None:
        self.cb.on_train_start(run)

    def on_step_end(self, run: Any, step: int, loss: Any, batch: Any) -> None:
        self.cb.on_step_end(run, step, loss, batch)

    def on_train_end(self, run: Any) -> None:
        pass

