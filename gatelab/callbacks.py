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
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .train import Run

__all__ = ["Callback", "CallbackList", "ProgressBar", "TensorBoardLogger", "MLflowLogger", "LOGGERS",
           "logging_callbacks"]


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


class TensorBoardLogger(Callback):
    """Scalars for TensorBoard in ``run_dir/tensorboard`` (``torch.utils.tensorboard``; gatelab's
    ``tensorboard`` extra): the training loss every ``every`` steps, the learning rate and gradient
    norm, and every evaluation's metrics as ``SPLIT/METRIC``. ``train.log = ["tensorboard"]`` adds it."""

    def __init__(self, every: int = 10):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise _missing("tensorboard", "TensorBoard logging (train.log = [\"tensorboard\"])") from err
        self._writer_class, self.every, self.writer = SummaryWriter, every, None

    def on_train_start(self, run: Run) -> None:
        self.writer = self._writer_class(log_dir=str(Path(run.run_dir) / "tensorboard"), purge_step=run.step or None)

    def on_step_end(self, run: Run, step: int, loss: float, batch: Any) -> None:
        if step % self.every == 0:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", run.optimizer.param_groups[0]["lr"], step)
            self.writer.add_scalar("train/grad_norm", run.grad_norm, step)

    def on_eval(self, run: Run, step: int, split: str, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)
        self.writer.flush()

    def on_train_end(self, run: Run) -> None:
        self.writer.close()


class MLflowLogger(Callback):
    """An MLflow run in a file store (``run_dir/mlruns`` unless ``MLFLOW_TRACKING_URI`` says where;
    gatelab's ``mlflow`` extra): the configuration as parameters, the training loss every ``every``
    steps and every evaluation's metrics. ``train.log = ["mlflow"]`` adds it; the experiment is the
    config's name."""

    def __init__(self, every: int = 10, tracking_uri: str | None = None):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise _missing("mlflow", "MLflow logging (train.log = [\"mlflow\"])") from err
        self._client_class, self.every, self.tracking_uri = MlflowClient, every, tracking_uri
        self.client: Any = None
        self.run_id: str | None = None

    def on_train_start(self, run: Run) -> None:
        import os

        from .config import to_dict

        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (Path(run.run_dir).resolve() / "mlruns").as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3.x refuses its file store unless this is set ("maintenance mode"); the file store is what
            # needs no server and no database package, so gatelab opts in for it (a user's own setting wins)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = self._client_class(tracking_uri=uri)
        name = run.config.name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, tags={"gatelab.run_dir": str(run.run_dir)}).info.run_id
        flat = _flatten(to_dict(run.config))
        for key, value in flat.items():
            self.client.log_param(self.run_id, key, str(value)[:500])

    def on_step_end(self, run: Run, step: int, loss: float, batch: Any) -> None:
        if step % self.every == 0:
            self.client.log_metric(self.run_id, "train_loss", loss, step=step)

    def on_eval(self, run: Run, step: int, split: str, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.client.log_metric(self.run_id, f"{split}_{name}", value, step=step)

    def on_train_end(self, run: Run) -> None:
        self.client.set_terminated(self.run_id)


LOGGERS = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger}


def logging_callbacks(names: Sequence[str]) -> list[Callback]:
    """The loggers ``train.log`` names (``"tensorboard"``, ``"mlflow"``); a missing package raises an
    ``ImportError`` naming the extra that installs it."""
    return [LOGGERS[name]() for name in names]


def _missing(extra: str, what: str) -> ImportError:
    from .tasks.base import MissingExtraError

    return MissingExtraError(f"{what} needs the {extra!r} package, gatelab's {extra} extra: pip install 'gatelab[{extra}]'")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
