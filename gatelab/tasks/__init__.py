"""Tasks and offline data: one registry from names to :class:`Task` objects.

>>> task = gatelab.tasks.get("adding", length=100)          # or "ucr:GunPoint", "charlm:shakespeare"
>>> train, val, test = task.splits()                        # Datasets of (x (T, input_size), y)
>>> loader = DataLoader(train, batch_size=32, collate_fn=gatelab.tasks.collate)
>>> task.baseline("test")                                   # {"mse": 0.1667...}

Names: ``adding``, ``adding_1997``, ``copy``, ``digits``, ``ucr:NAME`` (sets shipped inside aeon),
``forecast:NAME`` (Airline, Lynx, ShampooSales, sunspots, co2), ``charlm:shakespeare`` or
``charlm:/path/to/file.txt``. Keyword arguments go to the task's constructor. Nothing here touches
the network; the data packages (aeon, scikit-learn, statsmodels) are the ``data`` extra and are
imported only when a task that needs them is built.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from .base import Batch, MissingExtraError, SequenceDataset, Task, collate, data_dir
from .charlm import CharLMTask
from .digits import ClassificationTask, DigitsTask
from .forecast import SERIES, ForecastTask
from .synthetic import Adding1997Task, AddingTask, CopyTask
from .ucr import UCRClassificationTask, UCRRegressionTask, shipped, ucr_task
from .user import from_datasets

__all__ = [
    "get",
    "available",
    "from_datasets",
    "register",
    "factory",
    "Task",
    "Batch",
    "collate",
    "SequenceDataset",
    "MissingExtraError",
    "data_dir",
    "shipped",
    "AddingTask",
    "Adding1997Task",
    "CopyTask",
    "ClassificationTask",
    "DigitsTask",
    "UCRClassificationTask",
    "UCRRegressionTask",
    "ForecastTask",
    "CharLMTask",
]

# A plain name maps to a factory taking keyword arguments; a "family:" name to one taking the part
# after the colon first.
_TASKS: dict[str, Callable[..., Task]] = {}
_FAMILIES: dict[str, Callable[..., Task]] = {}


def register(name: str, factory: Callable[..., Task], family: bool = False) -> None:
    """Add a task (``family=True``: a ``name:ARG`` family) to the registry."""
    (_FAMILIES if family else _TASKS)[name] = factory


register("adding", AddingTask)
register("adding_1997", Adding1997Task)
register("copy", CopyTask)
register("digits", DigitsTask)
register("ucr", ucr_task, family=True)
register("forecast", ForecastTask, family=True)
register("charlm", CharLMTask, family=True)


def available() -> list[str]:
    """Every task name that :func:`get` accepts here (``ucr:`` names: the sets the installed aeon ships;
    ``charlm:`` also takes any text file path)."""
    return [
        *_TASKS,
        *(f"ucr:{n}" for n in shipped()),
        *(f"forecast:{n}" for n in SERIES),
        "charlm:shakespeare",
    ]


def factory(name: str) -> Callable[..., Task] | None:
    """The callable :func:`get` would build ``name`` with (for ``family:ARG`` names, the family's, called
    as ``factory(ARG, **kwargs)``), or None when no task of that name is registered. Lets a caller check
    keyword arguments against the constructor's signature without loading any data."""
    family, sep, arg = name.partition(":")
    if sep:
        return _FAMILIES.get(family) if arg else None
    return _TASKS.get(name)


def get(name: str, **kwargs) -> Task:
    """Build the task called ``name`` (see :func:`available`) with ``kwargs`` for its constructor.

    Raises :class:`TypeError` when ``name`` is not a string or a keyword is not one the task takes
    (the message lists those it takes), :class:`ValueError` for an unknown name; the constructors check
    the values (see :mod:`gatelab.tasks._checks`).
    """
    if not isinstance(name, str):
        raise TypeError(f"task name must be a str such as 'adding' or 'ucr:GunPoint', got {name!r} ({type(name).__name__})")
    make = factory(name)
    if make is None:
        raise ValueError(
            f"unknown task {name!r}; available: {', '.join(available())}; "
            f"also 'charlm:/path/to/file.txt' for any UTF-8 text file"
        )
    _, sep, arg = name.partition(":")
    args = (arg,) if sep else ()
    _check_keywords(name, make, args, kwargs)
    return make(*args, **kwargs)


def _check_keywords(name: str, make: Callable[..., Task], args: tuple, kwargs: dict) -> None:
    """Refuse keywords the factory does not take before it runs (a family factory may load files first)."""
    try:
        signature = inspect.signature(make)
    except (TypeError, ValueError):  # a builtin or C callable: let the call itself complain
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        params = [p.name for p in signature.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        takes = [p for p in params[len(args):] if p != "self"]
        raise TypeError(f"{name}: {err}; it takes {', '.join(takes) or 'no keyword arguments'}") from None
