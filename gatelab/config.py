"""Experiment configuration: frozen dataclasses, TOML files and dotted typed overrides.

An experiment file has three sections (plus optional top-level ``name`` and ``description``)::

    name = "adding-lstm"
    [task]                  # name, then any keyword argument of the task's constructor
    name = "adding"
    length = 100
    [model]                 # ModelConfig
    cell = "lstm"
    hidden_sizes = [128]
    [train]                 # TrainConfig
    optimizer = "rmsprop"
    lr = 1e-3

:func:`load` reads a file and applies overrides such as ``train.lr=1e-3`` or
``model.gate_activation=hard_sigmoid``; a value is read as a TOML literal when it is one
(``1e-3``, ``true``, ``[64, 32]``, ``{f = "sigmoid"}``) and as a bare string otherwise. Unknown keys
and values of the wrong type raise :class:`ConfigError` naming the key, the expected type and what
came. :func:`to_toml` writes the resolved configuration back (the run directory keeps it).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

__all__ = [
    "ConfigError",
    "TaskConfig",
    "ModelConfig",
    "TrainConfig",
    "ExperimentConfig",
    "load",
    "from_dict",
    "to_dict",
    "to_toml",
    "apply_overrides",
    "parse_override_args",
    "HEADS",
    "OPTIMIZERS",
    "SCHEDULES",
]

HEADS = ("auto", "last", "mean", "max", "attention", "every")
# The ModelConfig fields that set activation slots; which of them a cell takes is the cell's fact
# (``registry.get(cell).roles``).
ACTIVATION_KEYS = ("activation", "gate_activation", "candidate_activation", "cell_activation")
OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
SCHEDULES = ("none", "cosine", "step")
LM_EVAL = ("carried", "chunked")


class ConfigError(ValueError):
    """A configuration key is unknown, or its value has the wrong type or is out of range."""


@dataclass(frozen=True)
class TaskConfig:
    """Which task (a :func:`gatelab.tasks.get` name) and the keyword arguments of its constructor."""

    name: str = "adding"
    options: dict[str, Any] = field(default_factory=dict)

    def build(self):
        """The :class:`gatelab.tasks.Task` this configures."""
        from . import tasks

        try:
            return tasks.get(self.name, **self.options)
        except TypeError as err:
            raise ConfigError(f"task {self.name!r}: {err}") from err


@dataclass(frozen=True)
class ModelConfig:
    """Input -> recurrent stack -> head (see :class:`gatelab.models.SequenceModel` for the meaning).

    ``hidden_sizes`` has one entry per stacked layer (``[64, 32]`` is Keras' SimpleRNN(64) ->
    SimpleRNN(32)); ``layers``, if given, has one table per layer whose activation slots and options
    replace the shared ones for that layer (``layers = [{candidate_activation = "relu"}, {}]``: seed 004's
    ReLU in the first LSTM only). The activation slots a cell does not have must stay unset. ``options`` go to every
    recurrent layer unchanged (``peephole``, ``variant``, ``layer_norm``, ``zoneout``,
    ``recurrent_dropout``, ``residual`` ...).
    """

    cell: str = "lstm"
    hidden_sizes: tuple[int, ...] = (64,)
    head: str = "auto"  # auto: "every" for per-step tasks, else "last"
    embedding_dim: int = 0  # > 0: token input through an embedding of this size
    input_projection: int = 0  # > 0: a linear projection of the input to this size
    tie_weights: bool = False
    dropout: float = 0.0
    bidirectional: bool = False
    activation: str | None = None
    gate_activation: str | dict[str, str] | None = None
    candidate_activation: str | None = None
    cell_activation: str | None = None
    backend: str = "auto"
    init: str = "torch"
    forget_bias: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    layers: tuple[dict[str, Any], ...] = ()  # per stacked layer: slots and options replacing the shared ones

    def __post_init__(self) -> None:
        from .cells import registry

        _choice("model.cell", self.cell, registry.available())
        _choice("model.head", self.head, HEADS)
        if not self.hidden_sizes or any(h < 1 for h in self.hidden_sizes):
            raise ConfigError(f"model.hidden_sizes: expected one positive size per layer, got {list(self.hidden_sizes)}")
        for key in ("embedding_dim", "input_projection"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key}: expected a size >= 0 (0 = off), got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: expected a probability in [0, 1), got {self.dropout}")
        from . import engines, init

        _choice("model.backend", self.backend, engines.BACKENDS)
        _choice("model.init", self.init, init.SCHEMES)
        roles = registry.get(self.cell).roles
        _check_slots("model.", self.activation_slots(), self.cell, roles)
        if self.layers and len(self.layers) != len(self.hidden_sizes):
            raise ConfigError(f"model.layers: expected one table per entry of hidden_sizes ({len(self.hidden_sizes)}), "
                              f"got {len(self.layers)}")
        for k, table in enumerate(self.layers):
            _check_slots(f"model.layers[{k}].", table, self.cell, roles)

    def activation_slots(self) -> dict[str, Any]:
        """The activation slots that are set, as layer keyword arguments."""
        return {k: getattr(self, k) for k in ACTIVATION_KEYS if getattr(self, k) is not None}


@dataclass(frozen=True)
class TrainConfig:
    """How to fit: optimiser, schedule, regularisation, BPTT, evaluation, checkpoints, determinism.

    ``steps`` counts optimiser steps; ``epochs > 0`` overrides it with ``epochs`` passes over the
    training data. ``tbptt_k1 > 0`` turns on truncated BPTT: every ``k1`` steps, backpropagate the
    loss of those steps through the last ``k2`` (default ``k1``) steps; the state is carried,
    detached, between windows (language models: over the whole training stream). A task with one
    target per sequence (equal lengths) runs each batch's first ``T − k2`` steps without gradient and
    backpropagates the loss, at the end as always, through the last ``k2`` steps only (a pooled head
    reads those). ``eval_every = 0``
    evaluates once per epoch; ``checkpoint_every = 0`` writes a checkpoint at every evaluation.
    ``patience > 0`` stops after that many evaluations without improvement of ``monitor`` on the
    validation split (default: the task's headline metric). ``weight_decay`` (L2; decoupled for
    AdamW) and ``l1`` apply to weight matrices and embeddings, not to biases or gains.
    """

    seed: int = 0
    steps: int = 1000
    epochs: int = 0
    batch_size: int = 32
    eval_batch_size: int = 256
    optimizer: str = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # SGD only
    alpha: float = 0.99  # RMSprop smoothing constant
    weight_decay: float = 0.0
    l1: float = 0.0
    clip_norm: float = 0.0  # 0 = off
    clip_value: float = 0.0  # 0 = off
    schedule: str = "none"
    warmup_steps: int = 0
    min_lr: float = 0.0  # cosine floor
    step_every: int = 0  # step schedule: multiply by gamma every step_every steps
    gamma: float = 0.1
    tbptt_k1: int = 0
    tbptt_k2: int = 0
    eval_every: int = 0
    eval_items: int = 0  # lm only: validation during training on the first N chunks (0 = all); final scores: all
    score_test: bool = True  # False: the run never reads the test split (choose settings on validation)
    lm_eval: str = "carried"  # lm only: "carried" (state through the whole split) or "chunked" (zero state per chunk)
    patience: int = 0
    monitor: str = ""
    restore_best: bool = True
    checkpoint_every: int = 0
    deterministic: bool = True
    threads: int = 0  # 0 = torch's default
    max_steps: int = 0  # > 0: at most this many optimiser steps (caps steps and epochs alike)
    max_minutes: float = 0.0  # > 0: a wall-time budget; the step count and schedule are fitted to it
    device: str = "cpu"
    log: tuple[str, ...] = ()  # logging callbacks: "tensorboard", "mlflow" (gatelab.callbacks.LOGGERS; optional extras)

    def __post_init__(self) -> None:
        for name in self.log:
            _choice("train.log", name, ("tensorboard", "mlflow"))
        if not 0 <= self.seed < 2**64:  # numpy's SeedSequence takes no negative seed, torch none of 2**64 or more
            raise ConfigError(f"train.seed: expected an integer in [0, 2**64), got {self.seed}")
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _choice("train.schedule", self.schedule, SCHEDULES)
        _choice("train.lm_eval", self.lm_eval, LM_EVAL)
        positive = ("batch_size", "eval_batch_size")
        at_least_zero = ("steps", "epochs", "warmup_steps", "step_every", "tbptt_k1", "tbptt_k2", "eval_every",
                         "eval_items", "patience", "checkpoint_every", "threads", "max_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: expected an integer >= 1, got {getattr(self, key)}")
        for key in at_least_zero:
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: expected an integer >= 0, got {getattr(self, key)}")
        for key in ("lr", "weight_decay", "l1", "clip_norm", "clip_value", "min_lr", "eps", "momentum", "max_minutes"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"train.{key}: expected a finite number >= 0, got {value}")
        if self.steps == 0 and self.epochs == 0:
            raise ConfigError("train.steps: set steps or epochs to a positive number")
        if self.schedule == "step" and self.step_every < 1:
            raise ConfigError("train.step_every: schedule = 'step' needs step_every >= 1")
        if self.tbptt_k2 and not self.tbptt_k1:
            raise ConfigError("train.tbptt_k2: set tbptt_k1 too (k2 alone means nothing)")
        if self.tbptt_k1 and self.tbptt_k2 and self.tbptt_k2 < self.tbptt_k1:
            raise ConfigError(f"train.tbptt_k2: expected k2 >= k1 = {self.tbptt_k1}, got {self.tbptt_k2}")
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", self.device):
            raise ConfigError(f"train.device: expected 'cpu', 'cuda[:N]' or 'auto', got {self.device!r}")

    @property
    def tbptt(self) -> tuple[int, int] | None:
        """``(k1, k2)`` when truncated BPTT is on."""
        return (self.tbptt_k1, self.tbptt_k2 or self.tbptt_k1) if self.tbptt_k1 else None


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: a task, a model and how to train it. ``name`` names the run directory."""

    name: str = "experiment"
    description: str = ""
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def replace(self, **overrides: Any) -> ExperimentConfig:
        """A copy with dotted overrides applied, e.g. ``cfg.replace(**{"train.lr": 1e-2})``."""
        return from_dict(apply_overrides(to_dict(self), overrides))


# -- reading ---------------------------------------------------------------------------------------

_SECTIONS = {"task": TaskConfig, "model": ModelConfig, "train": TrainConfig}
_TOP = ("name", "description")


def load(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()) -> ExperimentConfig:
    """Read an experiment TOML file and apply overrides (``"train.lr=1e-3"`` strings or a mapping)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file in UTF-8, as TOML must be (byte {err.start} is "
                          f"{err.object[err.start:err.start + 1]!r})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    data.setdefault("name", path.stem)
    if not isinstance(overrides, Mapping):
        overrides = parse_override_args(overrides)
    try:
        return from_dict(apply_overrides(data, overrides))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def parse_override_args(args: Sequence[str]) -> dict[str, str]:
    """``["--train.lr=1e-3", "model.cell=gru", "--train.steps", "50"]`` -> ``{"train.lr": "1e-3", ...}``."""
    out: dict[str, str] = {}
    items = list(args)
    while items:
        arg = items.pop(0)
        key, sep, value = arg.removeprefix("--").partition("=")
        if not sep:
            if not items:
                raise ConfigError(f"override {arg!r}: expected KEY=VALUE (e.g. --train.lr=1e-3)")
            value = items.pop(0)
        if "." not in key and key not in _TOP:
            raise ConfigError(f"override {arg!r}: expected a dotted key such as train.lr or model.cell")
        out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the nested ``data`` with dotted ``overrides`` set; string values are parsed against
    the key's declared type (so ``"1e-3"`` becomes a float for ``train.lr``)."""
    data = copy.deepcopy(dict(data))
    # task.name first: the task decides which task options exist
    ordered = sorted(overrides.items(), key=lambda kv: kv[0] != "task.name")
    for key, raw in ordered:
        section, _, rest = key.partition(".")
        if key in _TOP:
            data[key] = raw
            continue
        if section not in _SECTIONS or not rest:
            raise ConfigError(_unknown(key, [f"{s}.KEY" for s in _SECTIONS] + list(_TOP)))
        target = data.setdefault(section, {})
        hint = _hint_for(section, rest, target)
        head, _, sub = rest.partition(".")
        if sub:  # e.g. model.options.peephole, model.gate_activation.f
            inner = target.setdefault(head, {})
            if not isinstance(inner, dict):
                raise ConfigError(f"{key}: {section}.{head} is not a table")
            inner[sub] = _parse_value(raw, Any, key) if isinstance(raw, str) else raw
        else:
            target[head] = _parse_value(raw, hint, key) if isinstance(raw, str) else raw
    return data


def from_dict(data: Mapping[str, Any]) -> ExperimentConfig:
    """Validate nested plain data (as read from TOML) into an :class:`ExperimentConfig`."""
    unknown = [k for k in data if k not in _SECTIONS and k not in _TOP]
    if unknown:
        raise ConfigError(_unknown(unknown[0], [*_TOP, *(f"[{s}]" for s in _SECTIONS)]))
    top = {k: _coerce(data[k], str, k) for k in _TOP if k in data}
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        body = data.get(name, {})
        if not isinstance(body, Mapping):
            raise ConfigError(f"[{name}]: expected a table, got {type(body).__name__}")
        sections[name] = _task_section(body) if cls is TaskConfig else _dataclass_from(cls, body, name)
    return ExperimentConfig(**top, **sections)


def _dataclass_from(cls: type, body: Mapping[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in body.items():
        if key not in names:
            raise ConfigError(_unknown(f"{section}.{key}", [f"{section}.{n}" for n in names]))
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def _task_section(body: Mapping[str, Any]) -> TaskConfig:
    name = _coerce(body.get("name", TaskConfig.name), str, "task.name")
    hints = _task_hints(name)
    options = {}
    for key, value in body.items():
        if key == "name":
            continue
        if key == "options" and isinstance(value, Mapping):  # the to_dict form, tolerated
            raise ConfigError("task.options: write task options directly under [task] (e.g. length = 100)")
        if hints is not None and key not in hints:
            raise ConfigError(_unknown(f"task.{key}", [f"task.{k}" for k in ("name", *hints)], what=f"option of task {name!r}"))
        options[key] = _coerce(value, hints[key], f"task.{key}") if hints is not None else value
    return TaskConfig(name, options)


def _task_hints(name: str) -> dict[str, Any] | None:
    """Keyword arguments (and their types) the task ``name`` takes; None when they cannot be known."""
    from . import tasks

    family, sep, _ = name.partition(":")
    factory = tasks.factory(name)
    if factory is None:
        try:
            tasks.get(name)  # raises the registry's error listing the valid names
        except ValueError as err:
            raise ConfigError(f"task.name: {err}") from None
        return None
    if family == "ucr":  # ucr_task(name, **kwargs) picks a class; both take the same arguments
        factory = tasks.UCRClassificationTask
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    hints = typing.get_type_hints(target)
    skip = {"self", "name", "corpus"} if sep else {"self"}
    return {k: hints.get(k, Any) for k, p in params.items() if k not in skip and p.kind is not p.VAR_POSITIONAL}


def _hint_for(section: str, rest: str, target: Mapping[str, Any]) -> Any:
    head = rest.partition(".")[0]
    if section == "task":
        if head == "name":
            return str
        hints = _task_hints(target.get("name", TaskConfig.name))
        if hints is None:
            return Any
        if head not in hints:
            raise ConfigError(_unknown(f"task.{head}", [f"task.{k}" for k in ("name", *hints)],
                                       what=f"option of task {target.get('name', TaskConfig.name)!r}"))
        return hints[head]
    cls = _SECTIONS[section]
    hints = typing.get_type_hints(cls)
    if head not in hints:
        raise ConfigError(_unknown(f"{section}.{head}", [f"{section}.{n}" for n in hints]))
    return hints[head]


def _unknown(key: str, valid: Sequence[str], what: str = "key") -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {key!r}.{hint} Valid: {', '.join(valid)}"


def _check_slots(prefix: str, given: Mapping[str, Any], cell: str, roles: Mapping[str, str]) -> None:
    """The activation slots set in ``given`` (the model table, or one of ``model.layers``): slots the cell
    has, holding activations the registry knows."""
    from . import activations

    for slot in ACTIVATION_KEYS:
        value = given.get(slot)
        if value is None:
            continue
        if slot not in roles:
            raise ConfigError(f"{prefix}{slot}: cell {cell!r} has no such slot; its activation slots: "
                              f"{', '.join(roles) or 'none'}")
        for name in value.values() if isinstance(value, Mapping) else (value,):
            try:
                activations.get(name)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{prefix}{slot}: {err}") from None


def _choice(key: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, valid))}, got {value!r}")


# -- types -----------------------------------------------------------------------------------------


def _type_name(hint: Any) -> str:
    if hint is Any:
        return "any value"
    if hint is type(None):
        return "none"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin in (list, Sequence, typing.Sequence):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (dict, Mapping, typing.Mapping):
        return f"a table of {_type_name(args[1])}" if args else "a table"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against ``hint`` (ints are accepted for floats, lists for tuples)."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    ok, out = True, value
    if origin in (Union, types.UnionType):
        for a in sorted(args, key=lambda a: a is not type(None)):
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        ok = False
    elif hint is type(None):
        ok = value is None
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        out = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif origin is tuple:
        ok = isinstance(value, (list, tuple))
        if ok and len(args) == 2 and args[1] is Ellipsis:
            out = tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        elif ok:
            ok = len(value) == len(args)
            out = tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))) if ok else value
    elif origin in (list, Sequence, typing.Sequence):
        ok = isinstance(value, (list, tuple))
        out = tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)) if ok and args else value
    elif origin in (dict, Mapping, typing.Mapping):
        ok = isinstance(value, Mapping)
        out = {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()} if ok and args else value
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    return out


def _accepts(hint: Any, kind: type) -> bool:
    if hint is Any or hint is kind:
        return True
    return typing.get_origin(hint) in (Union, types.UnionType) and any(_accepts(a, kind) for a in typing.get_args(hint))


def _parse_value(raw: str, hint: Any, key: str) -> Any:
    """An override's text as a value of type ``hint``: a TOML literal if it is one, else a bare string."""
    text = raw.strip()
    if text.lower() in ("none", "null") and _accepts(hint, type(None)):
        return None
    candidates = []
    for wrapped in (text, f"[{text}]"):
        try:
            candidates.append(tomllib.loads(f"v = {wrapped}")["v"])
        except tomllib.TOMLDecodeError:
            continue
    for value in candidates:
        try:
            return _coerce(value, hint, key)
        except ConfigError:
            continue
    if _accepts(hint, str):
        return raw
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {raw!r}")


# -- writing ---------------------------------------------------------------------------------------


def to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """Nested plain data (the TOML layout: task options directly under ``task``); None values dropped."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v

    out: dict[str, Any] = {"name": config.name, "description": config.description}
    out["task"] = {"name": config.task.name, **plain(config.task.options)}
    for section in ("model", "train"):
        obj = getattr(config, section)
        out[section] = {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                        if getattr(obj, f.name) is not None}
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise ConfigError(f"cannot write {v!r} ({type(v).__name__}) to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def to_toml(config: ExperimentConfig) -> str:
    """The configuration as a TOML document that :func:`load` reads back to an equal config."""
    data = to_dict(config)
    lines = [f"{k} = {_toml_value(data[k])}" for k in _TOP]
    for section in _SECTIONS:
        lines += ["", f"[{section}]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data[section].items() if v is not None]
    return "\n".join(lines) + "\n"
