"""Training callbacks: the small protocol the trainer calls, and the progress bar.

A callback subclasses :class:`Callback` and overrides any of:

* ``on_train_start(run)``: before the first step (also after a resume);
* ``on_step_end(run, step, loss, batch)``: after optimiser step ``step`` (1-based, equal to
  ``run.step``); ``loss`` is that step's training loss as a float, ``batch`` the
  :class:`gatelab.data.Unit` it trained on (``x``, ``y``, ``lengths``, batch-first);
* ``on_eval(run, step, split, metrics)``: after each evaluation, ``metrics`` a dict of floats;
* ``on_train_end(run)``: after training, before the final evaluation is written.

``run`` is the :class:`gatelab.train.Run`: ``.model``, ``.optimizer``, ``.config``, ``.run_dir``,
``.step``, ``.task``, ``.history`` (the evaluations so far). Setting ``run.stop = True`` ends the
training after the current step. Callbacks are called in the order given; diagnostics
(:mod:`gatelab.diagnostics`) attach this way.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .train import Run

__all__ = ["Callback", "CallbackList", "ProgressBar"]


class Callback:
    """Base class: every hook does nothing."""

    def on_train_start(self, run: Run) -> None:
        pass

    def on_step_end(self, run: Run, step: int, loss: float, batch: Any) -> None:
        pass

    def on_eval(self, run: Run, step: int, split: str, metrics: dict[str, float]) -> None:
        pass

    def on_train_end(self, run: Run) -> None:
        pass


class CallbackList(Callback):
    """Calls each callback's hook in order."""

    def __init__(self, callbacks: Sequence[Callback] = ()):
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must subclass gatelab.callbacks.Callback, got {type(cb).__name__}")
        self.callbacks = list(callbacks)

    def on_train_start(self, run: Run) -> None:
        for cb in self.callbacks:
            cb.on_train_start(run)

    def on_step_end(self, run: Run, step: int, loss: float, batch: Any) -> None:
        for cb in self.callbacks:
            cb.on_step_end(run, step, loss, batch)

    def on_eval(self, run: Run, step: int, split: str, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_eval(run, step, split, metrics)

    def on_train_end(self, run: Run) -> None:
        for cb in self.callbacks:
            cb.on_train_end(run)


class ProgressBar(Callback):
    """One status line on stderr: step, smoothed loss, the last evaluation's metric and the step it was
    taken at (``val mse 0.01 @ step 400``), speed, time left.

    On a terminal the line is redrawn in place (at most ``refresh`` times a second); otherwise a
    line is printed every tenth of the run.
    """

    def __init__(self, stream: TextIO | None = None, width: int = 24, refresh: float = 5.0):
        self.stream = stream or sys.stderr
        self.width, self.interval = width, 1.0 / refresh
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def on_train_start(self, run: Run) -> None:
        self.t0, self.last_draw, self.first = time.perf_counter(), 0.0, run.step
        self.loss: float | None = None
        self.metric = ""
        self.next_line = run.step + max(1, run.total_steps // 10)

    def on_step_end(self, run: Run, step: int, loss: float, batch: Any) -> None:
        self.loss = loss if self.loss is None else 0.95 * self.loss + 0.05 * loss
        now = time.perf_counter()
        if self.tty and (now - self.last_draw >= self.interval or step == run.total_steps):
            self.last_draw = now
            self.stream.write("\r" + self._line(run, step, now) + "\033[K")
            self.stream.flush()
        elif not self.tty and step >= self.next_line:
            self.next_line += max(1, run.total_steps // 10)
            self.stream.write(self._line(run, step, now) + "\n")
            self.stream.flush()

    def on_eval(self, run: Run, step: int, split: str, metrics: dict[str, float]) -> None:
        name = run.monitor
        if name in metrics:
            self.metric = f" {split} {name} {metrics[name]:.4g} @ step {step}"  # it stays up until the next evaluation

    def on_train_end(self, run: Run) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self, run: Run, step: int, now: float) -> str:
        total = max(run.total_steps, 1)
        filled = int(self.width * step / total)
        rate = (step - self.first) / max(now - self.t0, 1e-9)
        left = (total - step) / rate if rate > 0 else float("inf")
        loss = f" loss {self.loss:.4g}" if self.loss is not None else ""
        eta = f"{left:.0f}s" if left != float("inf") else "?"
        bar = "#" * filled + "." * (self.width - filled)
        return f"{run.config.name} [{bar}] {step}/{total}{loss}{self.metric} {rate:.1f} step/s, {eta} left"
