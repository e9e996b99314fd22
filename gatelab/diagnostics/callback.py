"""A training callback that records the gradient flow every N steps (STYLE.md 9: diagnostics attach
as callbacks).

It implements the workbench's callback protocol, ``on_train_start(run)``, ``on_step_end(run, step,
loss, batch)``, ``on_eval(run, step, split, metrics)``, ``on_train_end(run)``, where ``run`` has
``.model`` and ``.run_dir``, and needs nothing else from the trainer. It subclasses
:class:`gatelab.callbacks.Callback` when that module is there (the trainer checks the type), and
works with any loop that calls the four hooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import write_jsonl
from .gates import gate_statistics
from .gradients import LossFn, gradient_flow
from .verdict import verdict

try:
    from ..callbacks import Callback as _CallbackBase
except ImportError:  # the workbench is optional for the diagnostics
    _CallbackBase = object  # type: ignore[assignment,misc]

__all__ = ["GradientFlowCallback", "diagnostic_record"]


def diagnostic_record(model: nn.Module, batch: Any, loss_fn: LossFn | None = None, *, gates: bool = True) -> dict[str, Any]:
    """One record: the loss on ``batch``, ‖∂L/∂state_t‖ per key (input order), the verdict per key on
    the curve by lag, and (``gates``) saturation, dead units and W_hh spectra."""
    flow = gradient_flow(model, batch, loss_fn)
    record: dict[str, Any] = {
        "diagnostic_loss": flow.loss,
        "gradient_norms": {k: v.tolist() for k, v in flow.norms.items()},
        "verdict": {k: verdict(flow.by_lag(k)).to_dict() for k in flow.norms},
    }
    if gates:
        stats = gate_statistics(model, batch, loss_fn)
        record.update(saturation=stats.saturation, dead=stats.dead, spectra=stats.spectra)
    return record


class GradientFlowCallback(_CallbackBase):
    """Record :func:`diagnostic_record` on a fixed batch at the first step and every ``every`` steps;
    write the records to ``run_dir/diagnostics.jsonl`` (atomically) when training ends.

    ``batch``: the batch to diagnose; by default the first training batch seen, kept for the whole run
    so that records compare like with like. ``eval_mode``: diagnose with the model in eval mode (no
    dropout noise), then restore its mode. Eval metrics passed to ``on_eval`` are written too, as
    ``{"kind": "eval", ...}`` lines. ``records`` holds everything in memory during training.
    """

    def __init__(
        self,
        every: int = 100,
        *,
        batch: Any = None,
        loss_fn: LossFn | None = None,
        gates: bool = True,
        eval_mode: bool = True,
        filename: str = "diagnostics.jsonl",
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.every = every
        self.batch = batch
        self.loss_fn = loss_fn
        self.gates = gates
        self.eval_mode = eval_mode
        self.filename = filename
        self.records: list[dict[str, Any]] = []
        self._recorded_any = False

    def on_train_start(self, run: Any) -> None:
        self.records = []
        self._recorded_any = False

    def on_step_end(self, run: Any, step: int, loss: Any, batch: Any) -> None:
        if self.batch is None:
            self.batch = batch
        if self._recorded_any and step % self.every:
            return
        self._recorded_any = True
        model = run.model
        was_training = model.training
        if self.eval_mode:
            model.eval()
        try:
            record = diagnostic_record(model, self.batch, self.loss_fn, gates=self.gates)
        finally:
            model.train(was_training)
        train_loss = float(loss.detach()) if isinstance(loss, torch.Tensor) else loss
        self.records.append({"kind": "gradient", "step": int(step), "train_loss": train_loss, **record})

    def on_eval(self, run: Any, step: int, split: str, metrics: dict[str, Any]) -> None:
        self.records.append({"kind": "eval", "step": int(step), "split": split, "metrics": dict(metrics)})

    def on_train_end(self, run: Any) -> None:
        self.save(Path(run.run_dir) / self.filename)

    def save(self, path: Path) -> Path:
        """Write the records as JSON lines to ``path`` (temporary file, then rename)."""
        write_jsonl(Path(path), self.records)
        return Path(path)

    def heatmap(self, key: str | None = None) -> tuple[list[int], list[list[float]]]:
        """``(training steps, rows of ‖∂L/∂state_t‖)`` for ``key`` (default: the first key recorded),
        what :func:`~.plots.plot_gradient_heatmap` draws."""
        grads = [r for r in self.records if r["kind"] == "gradient"]
        if not grads:
            raise ValueError("no gradient records yet")
        key = key or next(iter(grads[0]["gradient_norms"]))
        return [r["step"] for r in grads], [r["gradient_norms"][key] for r in grads]
