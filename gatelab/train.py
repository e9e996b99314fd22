"""Fit and evaluate sequence models; the training loop is :func:`train_loop`, read it top to bottom.

>>> cfg = gatelab.config.load("configs/adding.toml", ["train.steps=500"])
>>> run = gatelab.train.fit(cfg)                 # writes runs/<name>/: config.toml, metrics.jsonl,
>>> run.summary["final"]["test"]                 #   summary.json, last.pt, best.pt

Reproducible: the same config and seed give the same numbers (``train.deterministic`` turns on
``torch.use_deterministic_algorithms``; the data of step ``k`` is a pure function of ``(seed, k)``);
a run resumed from its last checkpoint ends with exactly the numbers of an uninterrupted one.
Under torchrun (``torchrun --nproc_per_node=N -m gatelab train CONFIG``) the same loop runs on every
rank with DistributedDataParallel (:mod:`gatelab.distributed`): ``train.batch_size`` stays the global
batch, each rank trains on its rows of it, rank 0 evaluates and writes the run's files.
A NaN or Inf in the loss or a gradient stops the run with :class:`NonFiniteError`, which names the
step and the tensor and is also written to ``failure.json``. One process at a time trains in a run
directory (:func:`fit` holds its lock, :func:`gatelab.checkpoint.exclusive`), and a run named by its
config lands in ``runs/<name>`` only if the name is one plain folder name.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import shutil
import statistics
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._version import __version__
from .callbacks import Callback, CallbackList, ProgressBar, logging_callbacks
from .checkpoint import (
    CheckpointError,
    atomic_write,
    exclusive,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    safe_child,
    save_checkpoint,
    set_rng_state,
    write_json,
)
from .config import ConfigError, ExperimentConfig, TrainConfig, from_dict, to_dict, to_toml
from .data import Minibatches, StreamWindows, Unit, in_order
from .distributed import Group, main_process, rank_seed, replicate, session, threads_per_rank
from .models import SequenceModel, State, UserModel, build_model, detach_state
from .tasks import Task
from .tasks import metrics as M

__all__ = [
    "Run",
    "NonFiniteError",
    "fit",
    "prepare",
    "run_directory",
    "resolve_device",
    "train_loop",
    "evaluate",
    "evaluate_checkpoint",
    "load_model",
    "learning_rate",
    "make_optimizer",
    "unit_loss",
]

HIGHER_IS_BETTER = {"accuracy"}
# Every file a run writes into its directory (atomically, or appended: metrics.jsonl); diagnostics.jsonl is
# the diagnostics callback's.
RUN_FILES = ("config.toml", "metrics.jsonl", "summary.json", "failure.json", "last.pt", "best.pt", "diagnostics.jsonl")


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became NaN or Inf; ``step`` and ``tensor`` say where."""

    def __init__(self, message: str, step: int, tensor: str):
        super().__init__(message)
        self.step, self.tensor = step, tensor


@dataclass(eq=False)
class Run:
    """Everything a training run holds; callbacks receive it (see :mod:`gatelab.callbacks`)."""

    config: ExperimentConfig
    task: Task
    model: SequenceModel
    optimizer: torch.optim.Optimizer
    run_dir: Path
    units: Minibatches | StreamWindows
    total_steps: int
    eval_every: int
    checkpoint_every: int
    monitor: str
    monitor_split: str
    device: torch.device
    callbacks: CallbackList = field(default_factory=CallbackList)
    step: int = 0
    stop: bool = False
    carry: State | None = None  # the detached state truncated BPTT carries between windows
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"value": None, "step": 0, "bad_evals": 0})
    loss_sum: float = 0.0  # training loss since the last evaluation
    loss_count: int = 0
    grad_norm: float = 0.0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0  # of earlier sessions of this run (before a resume)
    started: float = field(default_factory=lambda: time.perf_counter())
    budget_start_step: int = 0  # train.max_minutes: where this call's timing starts ...
    budget_start: float = 0.0  # ... and when
    budget_fitted: int | None = None  # the step count fitted to the budget, once measured
    summary: dict[str, Any] = field(default_factory=dict)
    own: dict[str, str | None] = field(default_factory=lambda: {"model": None, "task": None})  # fit(model=, task=)
    group: Group = field(default_factory=Group)  # the ranks of a torchrun launch (Group(): one process)
    net: torch.nn.Module | None = None  # what the training forward runs: the model, or its DDP wrapper

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def steps_per_epoch(self) -> int:
        return self.units.steps_per_epoch

    def batch(self, step: int) -> Unit:
        """This rank's rows of the global unit of ``step``, on the run's device."""
        unit = self.group.shard(self.units(step))
        return unit._replace(x=unit.x.to(self.device), y=unit.y.to(self.device))

    def targets(self, step: int) -> int:
        """How many loss terms the global unit of ``step`` has (what each rank's loss sum is divided by)."""
        unit = self.units(step)
        plain = unit.targets is None and not unit.prefix  # the other forms score y without lengths
        return self.model.n_targets(unit.y, unit.lengths if plain else None)

    def better(self, value: float) -> bool:
        best = self.best["value"]
        if best is None:
            return True
        return value > best if self.monitor in HIGHER_IS_BETTER else value < best


# -- the loop --------------------------------------------------------------------------------------


def train_loop(run: Run) -> None:
    """Optimiser steps from ``run.step`` to ``run.total_steps``, evaluating and checkpointing on schedule."""
    cfg, model, opt = run.config.train, run.model, run.optimizer
    run.budget_start_step, run.budget_start = run.step, time.perf_counter()
    run.callbacks.on_train_start(run)
    while run.step < run.total_steps and not run.stop:
        unit = run.batch(run.step)  # the data of step k depends on (seed, k) only
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, run.step, run.total_steps)
        model.train()
        t0 = time.perf_counter()
        state = None if unit.fresh else run.carry  # truncated BPTT continues from the previous window
        if run.group.active:  # this rank's share of the global batch's mean; DDP averages the gradients
            loss, carry = unit_loss(run.net, unit, state, reduction="sum")
            loss = loss * (run.group.world / max(run.targets(run.step), 1))
        else:
            loss, carry = unit_loss(model, unit, state)
        run.carry = detach_state(carry)  # ... but gradients never flow back past the window
        objective = loss + cfg.l1 * l1_norm(model) if cfg.l1 else loss
        check_loss(run, objective)
        opt.zero_grad(set_to_none=True)
        objective.backward()
        run.grad_norm = clip_gradients(run)  # raises NonFiniteError naming the parameter
        opt.step()
        run.step += 1
        run.train_seconds += time.perf_counter() - t0
        value = loss.item() if not run.group.active else run.group.sum(loss).item() / run.group.world
        run.loss_sum, run.loss_count = run.loss_sum + value, run.loss_count + 1
        run.callbacks.on_step_end(run, run.step, value, unit)
        if cfg.max_minutes:
            fit_to_budget(run, cfg.max_minutes * 60.0)
            run.total_steps, run.budget_fitted = run.group.broadcast((run.total_steps, run.budget_fitted))
        if run.step % run.eval_every == 0 or run.step == run.total_steps:
            validate(run)  # metrics.jsonl, best.pt, early stopping (may set run.stop)
        if run.step % run.checkpoint_every == 0 or run.step == run.total_steps or run.stop:
            save(run, run.run_dir / "last.pt")
    run.callbacks.on_train_end(run)


BUDGET_CALIBRATION_STEPS = 10  # steps timed before the step count is fitted to a wall-time budget
BUDGET_RESERVE = 0.1  # share of the budget kept for the final evaluation and checkpoints


def fit_to_budget(run: Run, budget_seconds: float) -> None:
    """``train.max_minutes``: once ``BUDGET_CALIBRATION_STEPS`` steps of this call are timed (evaluations
    included), set ``run.total_steps`` to the steps that fit in what is left of the budget (less
    ``BUDGET_RESERVE`` of it for the final evaluation), so that the learning-rate schedule ends where the
    run ends; later, end the run at the step where the budget is spent. The step count depends on the
    machine's speed, so a budgeted run is reproducible only given its recorded ``steps``."""
    elapsed = run.wall_seconds + time.perf_counter() - run.started  # resumed runs count their earlier wall time
    done_here = run.step - run.budget_start_step
    usable = budget_seconds * (1 - BUDGET_RESERVE)
    if run.budget_fitted is None and done_here >= BUDGET_CALIBRATION_STEPS:
        per_step = (time.perf_counter() - run.budget_start) / max(done_here, 1)
        fitted = run.step + int(max(0.0, usable - elapsed) / per_step)
        run.budget_fitted = min(run.total_steps, max(fitted, run.step))
        run.total_steps = run.budget_fitted
    elif elapsed >= usable and run.step < run.total_steps:
        run.total_steps = run.step  # over budget: this step is the last; the loop evaluates and saves it


def unit_loss(model: SequenceModel, unit: Unit, state: State | None, reduction: str = "mean") -> tuple[Tensor, State]:
    """The mean (``reduction="sum"``: summed) loss of one unit and the state to carry into the next one.

    A plain batch is one forward pass. A truncated-BPTT window runs in two pieces, split where the
    next window starts (``unit.keep``), and scores only its last ``unit.targets`` steps.
    """
    if unit.prefix:  # one-target truncated BPTT: the prefix only hands on its state, detached
        with torch.no_grad():
            _, state = model(unit.x[:, :unit.prefix], None, state)
        output, end = model(unit.x[:, unit.prefix:], None, detach_state(state))
        return model.criterion(output, unit.y, reduction=reduction), end
    if unit.targets is None:
        output, end = model(unit.x, unit.lengths, state)
        return model.criterion(output, unit.y, unit.lengths, reduction=reduction), end
    T, keep = unit.x.shape[1], unit.keep if unit.keep is not None else unit.x.shape[1]
    pieces, carry = [], state
    if keep > 0:
        out, carry = model(unit.x[:, :keep], None, state)
        pieces.append(out)
    if keep < T:
        out, _ = model(unit.x[:, keep:], None, carry)
        pieces.append(out)
    output = torch.cat(pieces, 1)[:, T - unit.targets :]  # (B, targets, O)
    return model.criterion(output, unit.y, reduction=reduction), carry


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up, then none / cosine / step decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** ((step - cfg.warmup_steps) // cfg.step_every)
    return cfg.lr


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam, AdamW, RMSprop or SGD; weight decay on matrices (weights, embeddings), not on vectors."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def l1_norm(model: torch.nn.Module) -> Tensor:
    """Σ|w| over the matrices (the same parameters weight decay acts on)."""
    return sum(p.abs().sum() for p in model.parameters() if p.dim() >= 2)


def check_loss(run: Run, loss: Tensor) -> None:
    here = bool(torch.isfinite(loss).item())
    # several processes: decided together, so that one rank's bad rows stop every rank at this step
    # (else the others would wait in DDP's gradient all-reduce for it)
    everywhere = here if not run.group.active else \
        int(run.group.sum(torch.tensor(float(here))).item()) == run.group.world
    if everywhere:
        return
    bad = [n for n, p in run.model.named_parameters() if not torch.isfinite(p).all()]
    where = (f"non-finite parameters: {', '.join(bad)}" if bad else
             "every parameter is finite, so the forward pass or the data produced it")
    what = f"the loss is {loss.item()}" if not here else "the loss is not finite on another process"
    _fail(run, "loss", f"{what} ({where})")


def clip_gradients(run: Run) -> float:
    """Check every gradient is finite, then clip by norm and/or value; returns the total norm before."""
    cfg = run.config.train
    named = [(n, p) for n, p in run.model.named_parameters() if p.grad is not None]
    grads = [p.grad for _, p in named]
    norm = torch.nn.utils.get_total_norm(grads)
    if not torch.isfinite(norm).item():
        bad = [(n, int((~torch.isfinite(p.grad)).sum()), p.grad.numel()) for n, p in named
               if not torch.isfinite(p.grad).all()]
        name = bad[0][0]
        detail = "; ".join(f"{n}: {k} of {size} entries" for n, k, size in bad)
        _fail(run, f"grad:{name}", f"the gradient of {name} is not finite (non-finite gradients: {detail})")
    if cfg.clip_norm:
        torch.nn.utils.clip_grads_with_norm_([p for _, p in named], cfg.clip_norm, norm)
    if cfg.clip_value:
        torch.nn.utils.clip_grad_value_([p for _, p in named], cfg.clip_value)
    return float(norm)


def _fail(run: Run, tensor: str, what: str) -> None:
    step = run.step + 1
    last = run.run_dir / "last.pt"
    report = {"step": step, "tensor": tensor, "error": what, "config": run.config.name,
              "last_checkpoint": str(last) if last.exists() else None}
    if run.group.main:  # every rank decides on the same all-reduced finiteness and gradients, so all stop here
        write_json(run.run_dir / "failure.json", report)
    raise NonFiniteError(f"{run.config.name}: stopped at step {step}: {what}. Report: {run.run_dir / 'failure.json'}",
                         step, tensor)


# -- evaluation --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: SequenceModel, task: Task, split: str, *, batch_size: int = 256, limit: int = 0,
             device: torch.device | str = "cpu", lm_eval: str = "carried") -> dict[str, float]:
    """The task's metrics (``task.evaluate``) and the mean objective ``loss`` of ``model`` on ``split``.

    ``limit > 0`` (language models only) scores the first ``limit`` items of the split, each from a zero
    state. A language model on the whole split with ``lm_eval="carried"`` is scored with its state
    carried through the split's text from its first character to its last (:func:`evaluate_stream`,
    the field's convention); ``"chunked"`` scores each ``seq_len`` chunk from a zero state.
    """
    if task.kind == "lm" and not limit and lm_eval == "carried":
        return evaluate_stream(model, task, split, device=device)
    model.eval()
    data = task.split(split)
    outputs: list[Tensor] = []
    total, count = 0.0, 0
    for batch in in_order(data, batch_size, limit):
        x, y = batch.x.to(device), batch.y.to(device)
        out, _ = model(x, batch.lengths)
        total += float(model.criterion(out, y, batch.lengths, reduction="sum"))
        count += model.n_targets(y, batch.lengths)
        out = out.cpu()
        if model.head_mode == "every":
            outputs += [o[:n] for o, n in zip(out, batch.lengths.tolist())]
        else:
            outputs.append(out)
    if limit and limit < len(data):
        if task.kind != "lm":
            raise ValueError("evaluate(limit=...) applies to language-model tasks only")
        targets = torch.cat([data[i][1] for i in range(limit)])
        metrics = {"bpc": M.bits_per_char(targets, torch.cat(outputs))}
    elif model.head_mode == "every":
        same = all(o.shape == outputs[0].shape for o in outputs)
        metrics = task.evaluate(torch.stack(outputs) if same else outputs, split)
    else:
        predictions = torch.cat(outputs)
        metrics = task.evaluate(predictions, split)
        if task.kind == "regression" and "mae" not in metrics:
            metrics["mae"] = M.mae(torch.stack([data[i][1] for i in range(len(data))]), predictions)
    return {**metrics, "loss": total / max(count, 1)}


def evaluate_stream(model: SequenceModel, task: Task, split: str, *, chunk: int = 1000,
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """Bits per character of a language model on the whole of ``split`` with the state carried through it.

    The split's text (``task.stream(split)``) runs as one sequence, ``chunk`` characters per call with
    the state passed on, so the result is that of one pass over the whole text (the chunk length only
    bounds memory). Every character but the first is a target exactly once.
    """
    model.eval()
    ids = task.stream(split)
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for i in range(0, len(ids) - 1, chunk):
            j = min(i + chunk, len(ids) - 1)
            x = task.one_hot(ids[i:j]).unsqueeze(0).to(device)  # (1, T, V), as the split's items
            out, state = model(x, None, state)
            total += float(F.cross_entropy(out[0], ids[i + 1 : j + 1].to(device), reduction="sum"))
            count += j - i
    return {"bpc": total / count / math.log(2), "loss": total / count}


def validate(run: Run) -> dict[str, float]:
    """Evaluate on the monitored split, log a line to metrics.jsonl, track the best, stop early."""
    cfg = run.config.train
    metrics = run.group.first(lambda: evaluate(run.model, run.task, run.monitor_split, batch_size=cfg.eval_batch_size,
                                               limit=cfg.eval_items, device=run.device, lm_eval=cfg.lm_eval))
    line = {"step": run.step, "epoch": round(run.step / run.steps_per_epoch, 4), "split": run.monitor_split,
            "lr": run.optimizer.param_groups[0]["lr"], "train_loss": run.loss_sum / max(run.loss_count, 1),
            "grad_norm": run.grad_norm, **metrics, "train_seconds": round(run.train_seconds, 3)}
    run.loss_sum, run.loss_count = 0.0, 0
    run.history.append(line)
    if run.group.main:
        with (run.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")
    value = metrics[run.monitor]
    if run.better(value):
        run.best = {"value": value, "step": run.step, "bad_evals": 0}
        if cfg.restore_best:
            save(run, run.run_dir / "best.pt")
    else:
        run.best["bad_evals"] += 1
        if cfg.patience and run.best["bad_evals"] >= cfg.patience:
            run.stop = True
    run.callbacks.on_eval(run, run.step, run.monitor_split, metrics)
    return metrics


# -- building, saving, resuming ------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _determinism(cfg: TrainConfig, threads_now: int | None = None) -> Iterator[None]:
    """Deterministic algorithms and the thread count (``threads_now``, else ``cfg.threads``) for the duration
    of a run, restored afterwards."""
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS asks for
    torch.use_deterministic_algorithms(cfg.deterministic)
    if threads_now or cfg.threads:
        torch.set_num_threads(threads_now or cfg.threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def _task_shape(task: Task) -> dict[str, Any]:
    shape = {k: getattr(task, k) for k in ("name", "kind", "per_step", "input_size", "output_size")}
    if task.kind == "lm":
        shape["vocab"] = task.vocab
    return shape


def save(run: Run, path: Path) -> None:
    """Write the run's state to ``path`` (atomically). Under torchrun every rank calls it: rank 0 writes,
    with every rank's RNG state and the carried state of all rows of the global batch; if that write
    fails, rank 0 raises it and the other ranks raise :class:`~gatelab.distributed.DistributedError`."""
    carry = run.carry
    if run.group.active:
        rngs = run.group.gather(rng_state())
        if run.config.train.tbptt:  # each rank carries its rows: (dirs, B / world, H) -> (dirs, B, H)
            parts = run.group.gather(None if carry is None else [
                tuple(t.cpu() for t in s) if isinstance(s, tuple) else s.cpu() for s in carry])
            carry = None if parts[0] is None else [_join(layer) for layer in zip(*parts)]

    def write() -> None:  # rank 0 alone; a failure stops every rank (Group.first), none waits for it
        trainer = {
            "best": dict(run.best), "stop": run.stop, "loss_sum": run.loss_sum, "loss_count": run.loss_count,
            "grad_norm": run.grad_norm, "train_seconds": run.train_seconds, "task": _task_shape(run.task),
            "wall_seconds": run.wall_seconds + time.perf_counter() - run.started,
            "carry": carry if run.config.train.tbptt else None,
            "user_model": run.own["model"], "user_task": run.own["task"],
        }
        if run.group.active:
            trainer["ranks"] = {"world_size": run.group.world, "rng": rngs}
        save_checkpoint(path, step=run.step, config=to_dict(run.config), model=run.model, optimizer=run.optimizer,
                        scheduler={"kind": run.config.train.schedule, "last_lr": run.optimizer.param_groups[0]["lr"]},
                        trainer=trainer)

    run.group.first(write)


def _join(states: Sequence[Any]) -> Any:
    """One layer's state from every rank's rows, joined along the batch dimension (dim 1)."""
    if isinstance(states[0], tuple):
        return tuple(torch.cat(parts, 1) for parts in zip(*states))
    return torch.cat(list(states), 1)


def _rows(state: Any, rows: slice) -> Any:
    return tuple(t[:, rows] for t in state) if isinstance(state, tuple) else state[:, rows]


def _restore(run: Run, path: Path) -> None:
    """Continue from ``path``; under torchrun rank 0 reads it and every rank continues from its content."""
    payload, lines = run.group.first(lambda: (load_checkpoint(path), _logged(run.run_dir / "metrics.jsonl")))
    try:  # a run saved before a config key existed resumes with that key at its default
        saved = to_dict(from_dict(payload["config"]))
    except ConfigError:
        saved = payload["config"]
    if saved != to_dict(run.config):
        diff = _differences(saved, to_dict(run.config))
        raise ConfigError(f"{path} was written by another configuration ({diff}); resume with the same config, "
                          f"or start a new run with --name")
    trainer = payload.get("trainer", {})
    for what in ("model", "task"):
        saved_own, given = trainer.get(f"user_{what}"), run.own[what]
        if saved_own != given:
            was, now = (f"a {what} of your own ({n})" if n else f"the config's {what}" for n in (saved_own, given))
            raise ConfigError(f"{path} was trained with {was} and is resumed with {now}: resume with the same {what}")
    run.model.load_state_dict(payload["model"])
    run.optimizer.load_state_dict(payload["optimizer"])
    t = payload["trainer"]
    ranks = t.get("ranks")
    if run.group.rank == 0:
        set_rng_state(payload["rng"])
    elif ranks is not None and ranks["world_size"] == run.group.world:
        set_rng_state(ranks["rng"][run.group.rank])
    else:  # another number of ranks wrote it: this rank's randomness (dropout) starts afresh
        _seed_everything(rank_seed(run.config.train.seed + payload["step"], run.group.rank))
    run.step, run.stop, run.best = payload["step"], t["stop"], dict(t["best"])
    run.loss_sum, run.loss_count, run.grad_norm = t["loss_sum"], t["loss_count"], t["grad_norm"]
    run.train_seconds, run.wall_seconds = t["train_seconds"], t["wall_seconds"]
    carry = t["carry"] if t["carry"] is None else [
        tuple(x.to(run.device) for x in s) if isinstance(s, (tuple, list)) else s.to(run.device) for s in t["carry"]]
    if carry is not None and run.group.active:  # the checkpoint holds every row; this rank carries its own
        carry = [_rows(s, run.group.shard_rows(_batch_of(s))) for s in carry]
    run.carry = carry
    # keep the evaluations up to the checkpoint; later ones will be redone
    run.history = [line for line in lines if line["step"] <= run.step]
    if run.group.main:
        atomic_write(run.run_dir / "metrics.jsonl", "".join(json.dumps(line) + "\n" for line in run.history))


def _batch_of(state: Any) -> int:
    return (state[0] if isinstance(state, tuple) else state).shape[1]


def _logged(log: Path) -> list[dict[str, Any]]:
    return [json.loads(s) for s in log.read_text().splitlines() if s.strip()] if log.exists() else []


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            inner = _differences(va, vb, f"{prefix}{key}.")
            out += [inner] if inner else []
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return "; ".join(out)


def run_directory(config: ExperimentConfig, run_dir: str | Path | None = None) -> Path:
    """``run_dir`` as given, else ``runs/<config.name>``; a name that could reach outside ``runs`` (empty,
    ``.``, ``..``, a path) raises :class:`ConfigError` naming the key ``name``."""
    return Path(run_dir) if run_dir is not None else safe_child("runs", config.name, "name")


def resolve_device(cfg: TrainConfig) -> torch.device:
    """The device ``train.device`` names; :class:`ConfigError` when it names CUDA and there is none."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {cfg.device!r}, but CUDA is not available to this torch "
                              f"({torch.__version__}); use 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device: {cfg.device!r}, but there are {torch.cuda.device_count()} CUDA devices")
    return device


def prepare(config: ExperimentConfig, *, run_dir: str | Path | None = None, callbacks: Sequence[Callback] = (),
            quiet: bool = False, resume: bool = False, overwrite: bool = False, model: torch.nn.Module | None = None,
            task: Task | None = None, group: Group | None = None) -> Run:
    """Build the task, model, optimiser and data of a run, and its directory (resuming if asked).

    It deletes and rewrites the run's files: the caller holds the directory's lock (:func:`fit` does).
    ``group``: the ranks of a torchrun launch (:func:`gatelab.distributed.session`); rank 0 alone
    touches the directory, every rank builds the same model (DDP) and trains on its rows of each batch."""
    cfg, group = config.train, group or Group()
    run_dir = run_directory(config, run_dir)

    def check() -> None:
        if not resume and (run_dir / "last.pt").exists() and not overwrite:
            raise FileExistsError(f"{run_dir} already holds a run; resume it (--resume), overwrite it (--overwrite) "
                                  f"or choose another name (--name)")
        if resume and not (run_dir / "last.pt").exists():
            raise CheckpointError(f"{run_dir / 'last.pt'}: nothing to resume (no checkpoint)")

    group.first(check)
    _seed_everything(cfg.seed)  # the same on every rank: the same data order and initial weights
    device = resolve_device(cfg)
    if group.active and device.type == "cuda":
        device = torch.device("cuda", group.local_rank)
    own = {"model": None if model is None else type(model).__qualname__, "task": None if task is None else task.name}
    task = task if task is not None else config.task.build()
    if model is None:
        model = build_model(config.model, task)
    elif not isinstance(model, SequenceModel):
        if cfg.tbptt:
            raise ConfigError("train.tbptt_k1: truncated BPTT carries a state between windows, which a model of "
                              "your own does not return; use a gatelab SequenceModel or full BPTT")
        if task.kind == "lm":
            raise ConfigError(f"task {task.name!r} is a language model, scored with its state carried through the "
                              f"text, which a model of your own does not return; use a gatelab SequenceModel")
        model = UserModel(model, task)
    model = model.to(device)
    if cfg.tbptt and task.kind == "lm":
        units: Minibatches | StreamWindows = StreamWindows(task.stream("train"), cfg.batch_size, *cfg.tbptt)
    else:  # one target per sequence: the last tbptt_k2 (default k1) steps are backpropagated
        units = Minibatches(task.split("train"), cfg.batch_size, cfg.seed, cfg.tbptt, one_target=not task.per_step)
    if group.active:
        _check_shards(cfg.batch_size, len(task.split("train")) if isinstance(units, Minibatches) else 0, group.world)
    if cfg.eval_items and task.kind != "lm":
        raise ConfigError(f"train.eval_items: applies to language-model tasks only; task {task.name!r} is "
                          f"{task.kind}")
    valid = [*task.metrics, "loss"] + (["mae"] if task.kind == "regression" else [])
    monitor = cfg.monitor or task.metrics[0]
    if monitor not in valid:
        raise ConfigError(f"train.monitor: expected one of {', '.join(valid)} for task {task.name!r}, got {monitor!r}")
    total = cfg.epochs * units.steps_per_epoch if cfg.epochs else cfg.steps
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    eval_every = cfg.eval_every or units.steps_per_epoch
    # the progress bar and the loggers are rank 0's; callbacks of your own run on every rank (run.rank)
    hooks = (([] if quiet else [ProgressBar()]) + logging_callbacks(cfg.log) if group.main else []) + list(callbacks)
    run = Run(config, task, model, make_optimizer(model, cfg), run_dir, units, total, eval_every,
              cfg.checkpoint_every or eval_every, monitor, "val" if len(task.split("val")) else "train", device,
              CallbackList(hooks), own=own, group=group, net=replicate(model, group, device))
    if group.rank:  # a rank's own randomness (dropout) must not repeat rank 0's
        _seed_everything(rank_seed(cfg.seed, group.rank))

    def start() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            for name in ("metrics.jsonl", "summary.json", "failure.json", "last.pt", "best.pt"):
                (run_dir / name).unlink(missing_ok=True)

    group.first(start)
    if resume:
        _restore(run, run_dir / "last.pt")
    note = "".join(f"# trained with a {what} of your own ({name}) through gatelab.fit({what}=...): this file alone "
                   f"does not rebuild the run\n" for what, name in own.items() if name)
    if group.main:
        atomic_write(run_dir / "config.toml", note + to_toml(config))
    return run


def _check_shards(batch_size: int, n_train: int, world: int) -> None:
    """A global batch must split into equal shards, and an epoch's last, shorter batch must leave every
    rank a row (``n_train = 0``: the batches are all full)."""
    if batch_size % world:
        raise ConfigError(f"train.batch_size: {batch_size} is the global batch, split over {world} processes, so it "
                          f"must be a multiple of {world} (each process trains on batch_size / {world} rows)")
    tail = n_train % batch_size
    if tail and tail < world:
        raise ConfigError(f"train.batch_size: {batch_size} leaves a last batch of {tail} of the {n_train} training "
                          f"sequences in each epoch, fewer than the {world} processes; choose a batch size that "
                          f"leaves at least {world} (or none)")


def fit(config: ExperimentConfig | torch.nn.Module | None = None, *, model: torch.nn.Module | None = None,
        task: Task | None = None, run_dir: str | Path | None = None, callbacks: Sequence[Callback] = (),
        quiet: bool = False, resume: bool = False, overwrite: bool = False) -> Run:
    """Train ``config`` in ``run_dir`` (default ``runs/<name>``), then evaluate on val and test and write
    ``summary.json``. Returns the :class:`Run` (``run.summary`` holds the summary).

    ``model``: a module of your own instead of the one ``config.model`` describes (see
    :class:`gatelab.models.UserModel` for what it is called with; it is trained in place); ``task``: a
    task of your own (``gatelab.tasks.from_datasets(train, val, test)`` for plain datasets) instead of
    ``config.task``. ``fit(my_module, task=...)`` is ``fit(config=None, model=my_module, ...)``; without
    a config the defaults of :class:`gatelab.config.ExperimentConfig` train it (name ``"fit"``). The
    same checkpoints, early stopping with the best weights, callbacks and summary apply.

    The run holds an exclusive lock on ``run_dir`` throughout (:class:`~gatelab.checkpoint.LockedError`
    at once if another process has it) and first removes the temporary files a killed write left there."""
    if isinstance(config, torch.nn.Module):
        if model is not None:
            raise TypeError("fit: a module was given both as the first argument and as model=")
        config, model = None, config
    if config is None:
        if model is not None and task is None:
            raise TypeError("fit(model): say what to train it on: task=gatelab.tasks.from_datasets(train, val, test) "
                            "(or a task of gatelab's), or a config whose [task] names one")
        config = ExperimentConfig(name="fit")
    if not isinstance(config, ExperimentConfig):
        raise TypeError(f"fit takes an ExperimentConfig (gatelab.config.load('my.toml') or gatelab.config.from_dict"
                        f"({{...}})) and/or model= (a torch.nn.Module) and task= (gatelab.tasks.from_datasets(...)), "
                        f"got {type(config).__name__}")
    if task is not None:
        if not isinstance(task, Task):
            raise TypeError(f"fit: task must be a gatelab Task (gatelab.tasks.from_datasets(train, val, test) wraps "
                            f"datasets), got {type(task).__name__}")
    run_dir = run_directory(config, run_dir)
    device = resolve_device(config.train)  # a device that is not there fails before the run directory is made
    with session(device) as group, contextlib.ExitStack() as stack:
        threads, capped = threads_per_rank(config.train.threads, group)
        if capped and group.main:
            warnings.warn(capped, RuntimeWarning, stacklevel=2)

        def hold() -> None:  # rank 0 holds the directory for all ranks
            stack.enter_context(exclusive(run_dir))
            remove_stale_temporaries(run_dir, RUN_FILES)

        group.first(hold)
        stack.enter_context(_determinism(config.train, threads))
        run = prepare(config, run_dir=run_dir, callbacks=callbacks, quiet=quiet, resume=resume, overwrite=overwrite,
                      model=model, task=task, group=group)
        try:
            train_loop(run)
            finish(run)
        finally:  # a DDP wrapper outliving its process group hangs when it is freed
            run.net = run.model
            if group.active:
                gc.collect()
    return run


def cross_validate(config: ExperimentConfig, *, run_dir: str | Path | None = None, callbacks: Sequence[Callback] = (),
                   quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """k-fold validation for small training sets: one run per fold of ``task.val_folds = k`` (``k >= 2``;
    each in ``run_dir/fold_I``, fold ``I`` held out as the validation split), none of them reading the
    test split. Returns, and writes to ``run_dir/cv.json``, every fold's final validation metrics and per
    metric their mean, standard deviation (n - 1), minimum and maximum."""
    if not isinstance(config, ExperimentConfig):
        raise TypeError(f"cross_validate takes an ExperimentConfig, got {type(config).__name__}")
    options = dict(config.task.options)
    k = options.get("val_folds", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise ConfigError(f"cross_validate: set task.val_folds to the number of folds (at least 2), got {k!r}")
    if "fold" in options:
        raise ConfigError(f"cross_validate runs every fold: leave task.fold unset (got {options['fold']!r})")
    base = run_directory(config, run_dir)
    main = main_process()  # under torchrun every rank runs every fold; rank 0 alone removes and writes
    if overwrite and main:  # a k-fold run of another k left more folds here: they are not this run's
        stale = [d for d in base.glob("fold_*") if d.is_dir() and d.name.removeprefix("fold_").isdigit()
                 and int(d.name.removeprefix("fold_")) >= k]
        for d in stale:
            shutil.rmtree(d)
        (base / "cv.json").unlink(missing_ok=True)
    folds = []
    for fold in range(k):
        cfg = replace(config, task=replace(config.task, options={**options, "fold": fold}),
                      train=replace(config.train, score_test=False))
        if not quiet and main:
            print(f"fold {fold + 1}/{k}", flush=True)
        run = fit(cfg, run_dir=base / f"fold_{fold}", callbacks=callbacks, quiet=quiet, overwrite=overwrite)
        folds.append({"fold": fold, "val": run.summary["final"]["val"], "steps": run.step,
                      "best_step": run.best.get("step")})
    spread = {}
    for metric in folds[0]["val"]:
        values = [f["val"][metric] for f in folds]
        spread[metric] = {"mean": statistics.fmean(values), "std": statistics.stdev(values), "min": min(values),
                          "max": max(values)}
    result = {"name": config.name, "task": config.task.name, "val_folds": k, "folds": folds, "val": spread,
              "config": to_dict(config)}
    if main:
        write_json(base / "cv.json", result)
    return result


def finish(run: Run) -> dict[str, Any]:
    """Final evaluation on val and test (with the best weights when ``restore_best``) and summary.json.
    Under torchrun rank 0 evaluates and writes; every rank gets the summary and the final weights."""
    if not run.group.active:
        return _summarise(run)
    run.summary = run.group.first(lambda: _summarise(run))
    weights = run.group.broadcast(run.model.state_dict() if run.group.main and run.summary["weights"] != "last"
                                  else None)
    if weights is not None and not run.group.main:
        run.model.load_state_dict(weights)
    return run.summary


def beats_baseline(metric: str, value: float, baseline: float) -> bool:
    """Whether ``value`` is strictly better than the trivial ``baseline`` on ``metric``: higher for the
    metrics in :data:`HIGHER_IS_BETTER` (accuracy ...), lower for the rest (losses, MSE, bpc)."""
    return bool((value - baseline) * (1 if metric in HIGHER_IS_BETTER else -1) > 0)


def _summarise(run: Run) -> dict[str, Any]:
    cfg, task = run.config.train, run.task
    best = run.run_dir / "best.pt"
    weights = "last"
    if cfg.restore_best and best.exists() and run.best["step"] != run.step:
        run.model.load_state_dict(load_checkpoint(best)["model"])
        weights = f"best.pt (step {run.best['step']})"
    scored = ("val", "test") if cfg.score_test else ("val",)  # score_test=False: test is never read
    final = {s: evaluate(run.model, task, s, batch_size=cfg.eval_batch_size, device=run.device, lm_eval=cfg.lm_eval)
             for s in scored if len(task.split(s))}
    baseline = {s: task.baseline(s) for s in scored if len(task.split(s))}
    head = task.metrics[0]
    epochs = run.step / run.steps_per_epoch
    wall = run.wall_seconds + time.perf_counter() - run.started
    run.summary = {
        "name": run.config.name, "task": task.name, "kind": task.kind, "headline": head,
        "final": final, "baseline": baseline,
        "beats_baseline": beats_baseline(head, final["test"][head], baseline["test"][head]) if "test" in final else None,
        "weights": weights, "best": {"metric": run.monitor, "split": run.monitor_split, **run.best},
        "stopped_early": run.step < run.total_steps, "steps": run.step, "epochs": round(epochs, 3),
        "budget": {"max_minutes": cfg.max_minutes, "fitted_steps": run.budget_fitted, "max_steps": cfg.max_steps}
        if cfg.max_minutes or cfg.max_steps else None,
        "parameters": run.model.num_parameters(), "engines": run.model.engines,
        "seconds_per_epoch": run.train_seconds / epochs if epochs else None,
        "train_seconds": round(run.train_seconds, 3), "wall_seconds": round(wall, 3),
        "evaluated_items": "all", "device": str(run.device),
        "threads": torch.get_num_threads(), "processes": run.group.world, "deterministic": cfg.deterministic,
        "torch": torch.__version__, "gatelab": __version__,
    }
    if task.kind == "lm":  # say how the figure was scored, and give the chunked form beside the carried one
        run.summary["lm_eval"] = cfg.lm_eval
        if cfg.lm_eval == "carried":
            run.summary["final_chunked"] = {s: evaluate(run.model, task, s, batch_size=cfg.eval_batch_size,
                                                        device=run.device, lm_eval="chunked") for s in final}
    write_json(run.run_dir / "summary.json", run.summary)
    return run.summary


# -- checkpoints as models ---------------------------------------------------------------------------


def load_model(path: str | Path) -> tuple[SequenceModel, ExperimentConfig, dict[str, Any]]:
    """The model stored in a checkpoint (eval mode), its configuration and the raw checkpoint."""
    payload = load_checkpoint(path)
    if (own := payload.get("trainer", {}).get("user_model")) is not None:  # fit(model=...): any module of yours
        raise CheckpointError(f"{path}: holds a model of your own ({own}), which gatelab cannot rebuild; build it "
                              f"and load the weights: module.load_state_dict({{k.removeprefix('module.'): v for k, v "
                              f"in checkpoint['model'].items()}})")
    try:
        config = from_dict(payload["config"])
        shape = SimpleNamespace(**payload["trainer"]["task"])
        model = build_model(config.model, shape)
        model.load_state_dict(payload["model"])
    except (ConfigError, KeyError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"{path}: the checkpoint does not describe a model this gatelab can build ({err})") from err
    return model.eval(), config, payload


def evaluate_checkpoint(path: str | Path, splits: Sequence[str] = ("val", "test")) -> dict[str, dict[str, float]]:
    """Metrics of a checkpoint's model on ``splits`` of its task, next to the task's baselines."""
    model, config, payload = load_model(path)
    if (own := payload.get("trainer", {}).get("user_task")) is not None:
        raise CheckpointError(f"{path}: was trained on a task of your own ({own}), which gatelab cannot rebuild; score "
                              f"it with gatelab.train.evaluate(model, your_task, split)")
    task = config.task.build()
    with _determinism(config.train):
        out = {s: evaluate(model, task, s, batch_size=config.train.eval_batch_size, lm_eval=config.train.lm_eval)
               for s in splits if len(task.split(s))}
    out.update({f"baseline_{s}": task.baseline(s) for s in splits if len(task.split(s))})
    return out
