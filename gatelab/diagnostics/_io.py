"""Atomic file writes and JSON-ready values for the diagnostics' outputs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import atomic_write


def jsonable(value: Any) -> Any:
    """``value`` with numpy arrays and scalars as lists and floats, and NaN/inf as None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`gatelab.checkpoint.atomic_write`), with the usual
    file permissions rather than the temporary file's 0600."""
    atomic_write(path, text)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(jsonable(value), indent=2, allow_nan=False) + "\n")


def write_jsonl(path: Path, records: list[Any]) -> None:
    write_atomic(path, "".join(json.dumps(jsonable(r), allow_nan=False) + "\n" for r in records))

