"""Argument checks shared by the task constructors and :func:`gatelab.tasks.get`.

Each check returns the value in its plain Python type or raises before any data is generated or read:
:class:`TypeError` for a value of the wrong kind, :class:`ValueError` for one out of range. Messages
read ``"<task>: <argument> must be <what>, got <value!r> (<type>)"``. ``bool`` is refused where a number
is expected (``True`` is an ``int`` to Python, never a length), and only a real ``bool`` is a flag
(the string ``"no"`` is truthy).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["integer", "optional_integer", "real", "flag", "choice", "text", "fractions"]


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def integer(task: str, name: str, value: Any, minimum: int = 0, *, what: str = "") -> int:
    """``value`` as an ``int`` at least ``minimum`` (numpy integers pass; bools, floats and strings do not);
    ``what`` replaces "an int >= minimum" in the message."""
    what = what or f"an int >= {minimum}"
    if not _is_int(value):
        raise TypeError(f"{task}: {name} must be {what}, {_got(value)}")
    if value < minimum:
        raise ValueError(f"{task}: {name} must be {what}, {_got(value)}")
    return int(value)


def optional_integer(task: str, name: str, value: Any, minimum: int = 0) -> int | None:
    """None (the task's default), or :func:`integer`."""
    return None if value is None else integer(task, name, value, minimum, what=f"None or an int >= {minimum}")


def real(task: str, name: str, value: Any, low: float, high: float, *, high_open: bool = True) -> float:
    """``value`` as a finite ``float`` in ``[low, high)`` (``[low, high]`` when not ``high_open``)."""
    what = f"a number in [{low:g}, {high:g}{')' if high_open else ']'}"
    if not _is_real(value):
        raise TypeError(f"{task}: {name} must be {what}, {_got(value)}")
    inside = low <= value < high if high_open else low <= value <= high
    if not (math.isfinite(value) and inside):
        raise ValueError(f"{task}: {name} must be {what}, {_got(value)}")
    return float(value)


def flag(task: str, name: str, value: Any) -> bool:
    """``value`` when it is a ``bool`` (numpy's included); anything else, ``"no"`` or ``0`` too, is refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{task}: {name} must be True or False, {_got(value)}")
    return bool(value)


def choice(task: str, name: str, value: Any, options: Sequence[Any]) -> Any:
    """``value`` when it is one of ``options``: a :class:`TypeError` when its type is not that of any
    option, else a :class:`ValueError`."""
    options = list(options)

    def same_kind(o: Any) -> bool:  # True == 1, and a bool must not pass for a numeric option
        return isinstance(value, type(o)) and isinstance(value, bool) == isinstance(o, bool)

    for o in options:
        if same_kind(o) and value == o:
            return o  # the option itself: a str subclass comes back as the plain str
    error = ValueError if any(map(same_kind, options)) else TypeError
    raise error(f"{task}: {name} must be one of {options}, {_got(value)}")


def text(task: str, name: str, value: Any) -> str:
    """``value`` when it is a non-empty ``str``."""
    if not isinstance(value, str):
        raise TypeError(f"{task}: {name} must be a non-empty str, {_got(value)}")
    if not value:
        raise ValueError(f"{task}: {name} must be a non-empty str, {_got(value)}")
    return value


def fractions(task: str, name: str, value: Any, n: int = 3) -> tuple[float, ...]:
    """``value`` as ``n`` positive finite numbers summing to 1 (a list, tuple or 1-D array; not a string)."""
    what = f"{n} positive numbers summing to 1"
    if not isinstance(value, (Sequence, np.ndarray)) or isinstance(value, (str, bytes)) or not all(map(_is_real, value)):
        raise TypeError(f"{task}: {name} must be {what}, {_got(value)}")
    if len(value) != n or not all(math.isfinite(f) and f > 0 for f in value) or not math.isclose(sum(value), 1.0):
        raise ValueError(f"{task}: {name} must be {what}, {_got(value)}")
    return tuple(float(f) for f in value)
