"""Study files: base configs, axes, points, exclusions and a budget, expanded into trials.

A study is a TOML file (paths in it are relative to the file)::

    name = "gates"                        # default: the file's stem
    description = "which gate activation on which task"
    bases = ["../demo/adding.toml", "../demo/digits.toml"]   # or base = "one.toml": one task each
    seeds = [0, 1]                        # shorthand for the axis "train.seed"
    reference = "lstm/sigmoid"            # the group the paired comparison is against (default: the first)

    [budget]                              # per trial: steps, epochs, max_steps, max_minutes (train keys)
    max_steps = 300

    [set]                                 # overrides every trial takes
    "train.threads" = 1

    [axes]                                # a grid over any dotted config key
    "model.cell" = ["lstm", "gru"]
    "model.gate_activation" = ["sigmoid", "hard_sigmoid"]

    [[exclude]]                           # drop every trial that matches all keys of one entry
    "model.cell" = "gru"
    "model.gate_activation" = "hard_sigmoid"

    [[points]]                            # a list of points (each crossed with the axes)
    label = "NIG"
    "model.options.variant" = "NIG"

    [report]
    gradient_flow = "first_seed"          # or "none", or a list of group labels

Keys are written quoted (``"model.cell"``) or as TOML dotted keys (``model.cell``); both mean the
config key ``model.cell``. An exclusion may also name ``base`` (a base config's name). Every trial is
the base config with, in this order, ``[set]``, ``[budget]``, its point and its axis values applied:
an ordinary :class:`~gatelab.config.ExperimentConfig`, checked before anything runs. Its key is a
hash of the resolved configuration (name, description and ``train.log`` left out: they do not
change the numbers), so the same trial in two studies, or after the study file gains an axis, has
the same key. Trials that differ only in the seed form one *group*; the report aggregates over it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, ExperimentConfig, load, to_dict

__all__ = ["Study", "Trial", "load_study", "study_from_dict", "expand", "trial_key", "BUDGET_KEYS"]

BUDGET_KEYS = ("steps", "epochs", "max_steps", "max_minutes")
SEED = "train.seed"
_TOP = {"name", "description", "base", "bases", "seeds", "reference", "budget", "set", "axes", "exclude", "points",
        "report", "workers"}
_SECTIONS = ("task", "model", "train")
_NOT_HASHED = (("name",), ("description",), ("train", "log"))


@dataclass(frozen=True)
class Trial:
    """One run of a study: a base config with an assignment of the study's keys."""

    index: int
    base: str  # the base config's name
    assignment: dict[str, Any]  # dotted key -> value (axes and point; the seed included)
    label: str  # the group: every key but the seed
    seed: int
    config: ExperimentConfig
    key: str

    @property
    def group(self) -> tuple[str, str]:
        return (self.base, self.label)


@dataclass(frozen=True)
class Study:
    """A parsed study file; :meth:`trials` expands it."""

    name: str
    bases: tuple[ExperimentConfig, ...]
    description: str = ""
    axes: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    points: tuple[dict[str, Any], ...] = ()
    exclude: tuple[dict[str, Any], ...] = ()
    budget: dict[str, Any] = field(default_factory=dict)
    set: dict[str, Any] = field(default_factory=dict)
    reference: str | None = None
    report: dict[str, Any] = field(default_factory=dict)
    workers: int = 0  # 0: as many as the cores allow
    source: str = ""  # the study file's text, kept in the store

    def trials(self) -> list[Trial]:
        return expand(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what the store keeps beside the trials)."""
        return {"name": self.name, "description": self.description, "bases": [to_dict(b) for b in self.bases],
                "axes": {k: list(v) for k, v in self.axes.items()}, "points": list(self.points),
                "exclude": list(self.exclude), "budget": self.budget, "set": self.set, "reference": self.reference,
                "report": self.report, "workers": self.workers}


def load_study(path: str | Path, overrides: Mapping[str, Any] | Sequence[str] = ()) -> Study:
    """Read a study file; ``overrides`` (dotted ``KEY=VALUE`` strings or a mapping) join its ``[set]``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such study file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a study file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file in UTF-8, as TOML must be") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    data.setdefault("name", path.stem)
    try:
        return study_from_dict(data, root=path.parent, overrides=overrides, source=text)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def study_from_dict(data: Mapping[str, Any], *, root: str | Path = ".", overrides: Mapping[str, Any] | Sequence[str] = (),
                    source: str = "", bases: Sequence[ExperimentConfig] = ()) -> Study:
    """A :class:`Study` from plain data; base paths are read relative to ``root``, or ``bases`` are
    given as configs (then the data names none)."""
    from ..config import parse_override_args

    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown study key; expected one of {', '.join(sorted(_TOP))}")
    if not isinstance(overrides, Mapping):
        overrides = parse_override_args(overrides)
    paths = data.get("bases", [data["base"]] if "base" in data else [])
    if isinstance(paths, str) or not isinstance(paths, list):
        raise ConfigError("bases: expected a list of config files (or base = one file)")
    if "base" in data and "bases" in data:
        raise ConfigError("base, bases: give one of them")
    configs = list(bases) + [load(Path(root) / p) for p in paths]
    if not configs:
        raise ConfigError("bases: a study needs a base config (base = \"config.toml\" or bases = [...])")
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"bases: two base configs share the name {next(n for n in names if names.count(n) > 1)!r}; "
                          f"names tell the tasks apart (set name = ... in them)")
    axes = _flatten(_table(data, "axes"))
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"axes.{key}: expected a non-empty list of values, got {values!r}")
    if "seeds" in data:
        if SEED in axes:
            raise ConfigError(f"seeds: the axis {SEED} is given too; give one of them")
        seeds = data["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
            raise ConfigError(f"seeds: expected a non-empty list of integers >= 0, got {seeds!r}")
        axes[SEED] = seeds
    budget = _table(data, "budget")
    for key in budget:
        if key not in BUDGET_KEYS:
            raise ConfigError(f"budget.{key}: unknown budget key; expected one of {', '.join(BUDGET_KEYS)}")
    points = tuple(_flatten(p, f"points[{i}]") for i, p in enumerate(_tables(data, "points")))
    for i, p in enumerate(points):
        if "label" in p and not isinstance(p["label"], str):
            raise ConfigError(f"points[{i}].label: expected a string, got {p['label']!r}")
    exclude = tuple(_flatten(e, f"exclude[{i}]") for i, e in enumerate(_tables(data, "exclude")))
    for i, e in enumerate(exclude):
        if not e:
            raise ConfigError(f"exclude[{i}]: an empty exclusion would drop every trial")
    report = _table(data, "report")
    reference = data.get("reference", report.get("reference"))
    workers = data.get("workers", 0)
    if not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"workers: expected an integer >= 0 (0: as many as the cores allow), got {workers!r}")
    study = Study(name=str(data.get("name", "study")), description=str(data.get("description", "")), bases=tuple(configs),
                  axes={k: tuple(v) for k, v in axes.items()}, points=points, exclude=exclude, budget=budget,
                  set={**_flatten(_table(data, "set")), **dict(overrides)}, reference=reference, report=report,
                  workers=workers, source=source)
    trials = expand(study)  # every trial resolves (and is checked) before anything runs
    if not trials:
        raise ConfigError("the exclusions drop every trial")
    if reference is not None and reference not in {t.label for t in trials}:
        raise ConfigError(f"reference: {reference!r} is not a group of this study; groups: "
                          f"{', '.join(dict.fromkeys(t.label for t in trials))}")
    return study


def expand(study: Study) -> list[Trial]:
    """Every trial of the study: bases x points x the axes' grid, less the excluded combinations, in
    that nesting order (the seed varies fastest when it is the last axis)."""
    keys = list(study.axes)
    if SEED in keys:  # the seed varies fastest: a group's seeds run next to each other
        keys.remove(SEED)
        keys.append(SEED)
    grid = [dict(zip(keys, values)) for values in itertools.product(*(study.axes[k] for k in keys))]
    points = study.points or ({},)
    trials: list[Trial] = []
    names: set[str] = set()
    for base in study.bases:
        for point in points:
            for cell in grid:
                assignment = {**{k: v for k, v in point.items() if k != "label"}, **cell}
                if any(_matches(e, assignment, base.name) for e in study.exclude):
                    continue
                label = _label(point, cell)
                overrides = {**study.set, **{f"train.{k}": v for k, v in study.budget.items()}, **assignment}
                try:
                    cfg = base.replace(**overrides)
                except ConfigError as err:
                    raise ConfigError(f"trial {base.name} / {label or 'base'}: {err}") from None
                key = trial_key(cfg)
                name = _name(base.name, label, cfg.train.seed, key, names)
                cfg = cfg.replace(name=name)
                trials.append(Trial(len(trials), base.name, assignment, label, cfg.train.seed, cfg, key))
    keys_seen = [t.key for t in trials]
    if len(set(keys_seen)) != len(keys_seen):
        dup = next(t for t in trials if keys_seen.count(t.key) > 1)
        raise ConfigError(f"two trials resolve to the same configuration ({dup.base} / {dup.label}, seed {dup.seed}); "
                          f"an axis or point changes nothing, or points repeat")
    return trials


def trial_key(config: ExperimentConfig) -> str:
    """A hash of the resolved configuration (16 hex digits), without the keys that do not change the
    numbers (name, description, train.log)."""
    data = to_dict(config)
    for path in _NOT_HASHED:
        node = data
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _table(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
    return value


def _tables(data: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{key}: expected an array of tables ([[{key}]])")
    return value


def _flatten(table: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """``{"model": {"cell": ...}}`` and ``{"model.cell": ...}`` alike to dotted keys; ``model.options``
    one level further, since its entries are keys of their own."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        if k in _SECTIONS and isinstance(v, dict):
            for k2, v2 in v.items():
                if (k, k2) == ("model", "options") and isinstance(v2, dict):
                    out.update({f"model.options.{k3}": v3 for k3, v3 in v2.items()})
                else:
                    out[f"{k}.{k2}"] = v2
        elif "." in k or k in ("label", "name", "base"):
            out[k] = v
        else:
            raise ConfigError(f"{where + '.' if where else ''}{k}: expected a dotted config key such as model.cell")
    return out


def _matches(exclusion: Mapping[str, Any], assignment: Mapping[str, Any], base: str) -> bool:
    for key, value in exclusion.items():
        have = base if key == "base" else assignment.get(key, _MISSING)
        if have != value:
            return False
    return True


_MISSING = object()


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={_show(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "x".join(_show(v) for v in value)
    if value is None:
        return "none"
    return str(value)


def _label(point: Mapping[str, Any], cell: Mapping[str, Any]) -> str:
    parts = [point["label"]] if "label" in point else [_show(v) for k, v in point.items() if v is not None]
    parts += [_show(v) for k, v in cell.items() if k != SEED]
    return "/".join(parts)


def _name(base: str, label: str, seed: int, key: str, taken: set[str]) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.=,+-]+", "-", "-".join(p for p in (base, label.replace("/", "-")) if p)).strip("-.")
    slug = slug[:80] + f"-s{seed}"
    name = slug if slug not in taken else f"{slug}-{key[:8]}"
    taken.add(name)
    return name
