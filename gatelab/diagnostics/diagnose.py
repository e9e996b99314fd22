"""``gatelab diagnose CONFIG_OR_CHECKPOINT``: figures and a JSON summary of a model's gradient flow.

:func:`diagnose_main` takes

* a built-in experiment name (:data:`EXPERIMENTS`, e.g. ``adding-comparison``);
* a diagnose TOML file: a ``[task]`` table (``name`` plus the task's keyword arguments), an optional
  ``[diagnose]`` table (``train_steps``, ``batch_size``, ``lr``, ``optimizer``, ``clip``, ``seed``,
  ``every``, ``title``) and one ``[[model]]`` table per configuration (``label``, ``cell`` = ``rnn`` |
  ``lstm`` | ``gru`` | ``gated_state``, ``hidden_size``, and any layer keyword such as
  ``gate_activation``, ``activation``, ``init``, ``forget_bias``), for example::

      [task]
      name = "adding"
      length = 50

      [diagnose]
      train_steps = 300

      [[model]]
      label = "LSTM, ReLU gates"
      cell = "lstm"
      gate_activation = "relu"

* a workbench experiment TOML (a single ``[model]`` table) or checkpoint, when the workbench
  (``gatelab.config``, ``gatelab.models``, ``gatelab.train``) is installed: the model is diagnosed as
  configured (at initialisation) or as saved; a ``diagnostics.jsonl`` written by
  :class:`~.callback.GradientFlowCallback` beside a checkpoint becomes the heatmap.

It writes PNG figures and ``summary.json`` (atomically) into ``out_dir`` and returns the summary.
"""

from __future__ import annotations

import json
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from .. import tasks as tasks_module
from ..tasks import Task, collate
from ._io import write_json
from .experiment import ADDING_COMPARISON, ConfigResult, ModelSpec, compare, diagnose
from .verdict import layer_verdicts, state_verdicts, verdict

__all__ = ["diagnose_main", "DiagnosePlan", "EXPERIMENTS", "read_plan", "write_report"]

Log = Callable[[str], None] | None


@dataclass(frozen=True)
class DiagnosePlan:
    """A comparison to run: the task, the model specs and the short training (0 steps: init only)."""

    task: str
    task_args: dict[str, Any]
    specs: tuple[ModelSpec, ...]
    train_steps: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    clip: float | None = 1.0
    seed: int = 0
    every: int = 25
    title: str = ""


EXPERIMENTS: dict[str, DiagnosePlan] = {
    # The models of docs/diagnostics.md at initialisation (the doc's full run trains them:
    # benchmarks/diagnostics_experiment.py).
    "adding-comparison": DiagnosePlan("adding", {"length": 50}, ADDING_COMPARISON,
                                      title="adding task, T = 50, at initialisation"),
}

_PLAN_KEYS = {f.name for f in fields(DiagnosePlan)} - {"task", "task_args", "specs"}


def read_plan(data: Mapping[str, Any], source: str = "config") -> DiagnosePlan:
    """A :class:`DiagnosePlan` from a parsed diagnose TOML; unknown keys and wrong types fail loudly."""
    unknown = sorted(set(data) - {"task", "diagnose", "model"})
    if unknown:
        raise ValueError(f"{source}: unknown top-level key(s) {', '.join(unknown)}; a diagnose file has [task], "
                         f"[diagnose] and [[model]]")
    task = dict(data.get("task") or {})
    if "name" not in task:
        raise ValueError(f"{source}: [task] needs a name (e.g. name = \"adding\")")
    name = task.pop("name")
    opts = dict(data.get("diagnose") or {})
    bad = sorted(set(opts) - _PLAN_KEYS)
    if bad:
        raise ValueError(f"{source}: unknown [diagnose] key(s) {', '.join(bad)}; valid: {', '.join(sorted(_PLAN_KEYS))}")
    types = {"train_steps": int, "batch_size": int, "seed": int, "every": int, "lr": (int, float),
             "clip": (int, float), "optimizer": str, "title": str}
    for key, value in opts.items():
        if isinstance(value, bool) or not isinstance(value, types[key]):
            raise ValueError(f"{source}: [diagnose] {key} = {value!r} has the wrong type")
    models = data.get("model")
    if not isinstance(models, list) or not models:
        raise ValueError(f"{source}: give at least one [[model]] table")
    specs = []
    for i, m in enumerate(models):
        m = dict(m)
        if "cell" not in m:
            raise ValueError(f"{source}: [[model]] #{i + 1} needs cell = \"rnn\" | \"lstm\" | \"gru\" | \"gated_state\"")
        cell = m.pop("cell")
        label = str(m.pop("label", cell))
        hidden = m.pop("hidden_size", 64)
        if isinstance(hidden, bool) or not isinstance(hidden, int):
            raise ValueError(f"{source}: [[model]] {label!r}: hidden_size must be an int, got {hidden!r}")
        specs.append(ModelSpec(label, cell, hidden, m))
    return DiagnosePlan(name, task, tuple(specs), **opts)


def diagnose_main(target: str, out_dir: Path, quiet: bool = False) -> dict[str, Any]:
    """Diagnose ``target`` (see the module docstring), write the PNGs and ``summary.json`` to
    ``out_dir``, and return the summary. Progress goes to stderr unless ``quiet``."""
    log: Log = None if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    out_dir = Path(out_dir)
    if target in EXPERIMENTS:
        return run_plan(EXPERIMENTS[target], out_dir, log, source=target)
    path = Path(target)
    if not path.exists():
        raise FileNotFoundError(f"{target}: neither a built-in experiment ({', '.join(EXPERIMENTS)}) nor a file")
    if path.suffix == ".toml":
        with path.open("rb") as f:
            data = tomllib.load(f)
        if isinstance(data.get("model"), list):  # [[model]]: a diagnose plan
            return run_plan(read_plan(data, str(path)), out_dir, log, source=str(path))
        model, task, label = _workbench_config(path)
        return run_single(model, task, label, out_dir, log, source=str(path), moment="initialisation")
    model, task, label = _workbench_checkpoint(path)
    return run_single(model, task, label, out_dir, log, source=str(path), moment="checkpoint",
                      history=path.parent / "diagnostics.jsonl")


def run_plan(plan: DiagnosePlan, out_dir: Path, log: Log = None, source: str = "") -> dict[str, Any]:
    """Run :func:`~.experiment.compare` for ``plan`` and write its report."""
    task = tasks_module.get(plan.task, **plan.task_args)
    if log:
        log(f"diagnose: {len(plan.specs)} configuration(s) on {plan.task} {plan.task_args}, "
            f"{plan.train_steps} training steps each")
    results = compare(plan.specs, task, train_steps=plan.train_steps, batch_size=plan.batch_size, lr=plan.lr,
                      optimizer=plan.optimizer, clip=plan.clip, seed=plan.seed, every=plan.every, log=log)
    title = plan.title or f"{plan.task} {plan.task_args}"
    return write_report(results, task, out_dir, title=title, source=source,
                        settings={k: getattr(plan, k) for k in sorted(_PLAN_KEYS)})


def write_report(
    results: Sequence[ConfigResult], task: Task, out_dir: Path, *, title: str = "", source: str = "",
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Figures and ``summary.json`` for a comparison; returns the summary (figures listed in it)."""
    from . import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = all(r.trained is not None for r in results)
    moments = [("initialisation", "initial")] + ([("after training", "trained")] if trained else [])
    figures = []
    grad = {f"{m} ({title})" if len(moments) == 1 else m: {r.spec.label: getattr(r, a).flow.by_lag() for r in results}
            for m, a in moments}
    figures.append(plots.plot_norm_vs_lag(grad, out_dir / "gradient_vs_lag.png", ylabel="‖∂L/∂h_t‖"))
    if all(r.initial.jacobian is not None for r in results):
        jac = {m: {r.spec.label: getattr(r, a).jacobian for r in results} for m, a in moments}
        figures.append(plots.plot_norm_vs_lag(jac, out_dir / "jacobian_vs_lag.png", ylabel="‖∂s_T/∂s_t‖₂ (whole state)",
                                              title=title))
    for m, a in moments:
        name = "gate_saturation.png" if a == "initial" else "gate_saturation_trained.png"
        stats = {r.spec.label: getattr(r, a).gates for r in results}
        if any(s.saturation or s.dead for s in stats.values()):
            figures.append(plots.plot_gate_histograms(stats, out_dir / name, title=f"{title}, {m}"))
    if trained:
        panels = {r.spec.label: r.heatmap for r in results if r.heatmap is not None}
        figures.append(plots.plot_gradient_heatmap(panels, out_dir / "gradient_heatmap.png", title=title))
    summary = {
        "source": source, "title": title, "task": task.name, "baseline": _baseline(task),
        "settings": dict(settings or {}), "configurations": [r.summary() for r in results],
        "figures": [str(p) for p in figures],
    }
    write_json(out_dir / "summary.json", summary)
    return summary


def run_single(
    model: nn.Module, task: Task, label: str, out_dir: Path, log: Log = None, *, source: str = "",
    moment: str = "", history: Path | None = None, items: int = 64,
) -> dict[str, Any]:
    """Diagnose one model (a workbench model, or any module with ``.loss(batch)``) on the first
    ``items`` test sequences of ``task`` and write its report."""
    from . import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    test = task.split("test")
    batch = collate([test[i] for i in range(min(items, len(test)))])
    d = diagnose(model, batch)
    figures = [plots.plot_norm_vs_lag({k: d.flow.by_lag(k) for k in d.flow.norms}, out_dir / "gradient_vs_lag.png",
                                      ylabel="‖∂L/∂state_t‖", title=f"{label} ({moment})")]
    if d.jacobian is not None:
        figures.append(plots.plot_norm_vs_lag({label: d.jacobian}, out_dir / "jacobian_vs_lag.png",
                                              ylabel="‖∂s_T/∂s_t‖₂ (whole state)", title=f"{label} ({moment})"))
    if d.gates.saturation or d.gates.dead:
        figures.append(plots.plot_gate_histograms({label: d.gates}, out_dir / "gate_saturation.png"))
    if history is not None and history.is_file():
        steps, rows = _history(history, d.flow.default_key)
        if rows:
            figures.append(plots.plot_gradient_heatmap({label: (steps, rows)}, out_dir / "gradient_heatmap.png"))
    summary = {
        "source": source, "moment": moment, "task": task.name, "baseline": _baseline(task), "label": label,
        "diagnosis": d.summary(),
        "verdicts": {k: verdict(d.flow.by_lag(k)).to_dict() for k in d.flow.norms},
        "state_verdicts": {layer: v.to_dict() for layer, v in layer_verdicts(d.flow).items()},
        "gradient_norms": {k: v.tolist() for k, v in d.flow.norms.items()},
        "figures": [str(p) for p in figures],
    }
    write_json(out_dir / "summary.json", summary)
    if log:
        log(f"{label}: {state_verdicts(d.flow)} -> {out_dir}")
    return summary


def _history(path: Path, key: str) -> tuple[list[int], list[list[float]]]:
    steps, rows = [], []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "gradient" and key in rec.get("gradient_norms", {}):
            steps.append(rec["step"])
            rows.append(rec["gradient_norms"][key])
    return steps, rows


def _baseline(task: Task) -> dict[str, float] | None:
    try:
        return task.baseline("test")
    except (NotImplementedError, ValueError):
        return None


def _workbench_config(path: Path) -> tuple[nn.Module, Task, str]:
    try:
        from .. import config as config_module
        from .. import models as models_module

        load = getattr(config_module, "load_config", None) or config_module.load
        build = models_module.build_model
    except (ImportError, AttributeError) as err:
        raise RuntimeError(f"{path}: a workbench experiment file needs gatelab.config and gatelab.models, which "
                           f"this installation lacks ({err}); give a diagnose file ([task] and [[model]] tables) "
                           f"or a built-in experiment: {', '.join(EXPERIMENTS)}") from err
    config = load(path)
    task = config.task.build()
    return build(config.model, task), task, getattr(config, "name", path.stem)


def _workbench_checkpoint(path: Path) -> tuple[nn.Module, Task, str]:
    try:
        from .. import train as train_module

        load_model = train_module.load_model
    except (ImportError, AttributeError) as err:
        raise RuntimeError(f"{path}: reading a checkpoint needs the workbench (gatelab.train.load_model), which "
                           f"this installation lacks ({err}); give a diagnose file ([task] and [[model]] tables) "
                           f"or a built-in experiment: {', '.join(EXPERIMENTS)}") from err
    model, config, _ = load_model(path)
    return model, config.task.build(), getattr(config, "name", path.stem)

