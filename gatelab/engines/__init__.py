"""Engines run a recurrent layer over a sequence; the layer chooses one and can say why.

* ``native``: torch's own fused kernels (cuDNN, oneDNN, ATen), for configurations that are exactly
  torch's.
* ``fused``: gatelab's engine for any registered activation: one input GEMM, one fused elementwise
  step per time step, hand-written backpropagation through time (its loops: :data:`fused.LOOPS`).
* ``reference``: a plain autograd loop over the cell's ``step``; the readable specification.

:data:`ENGINES` is ordered: ``backend="auto"`` runs the first engine with nothing unsupported
(:func:`choose`). An engine is an object with ``name``, ``title``, ``unsupported(layer)``,
``describe(layer)`` and ``run_direction`` (or, running the whole stack at once, ``run_stack``); see
:mod:`.base`. A new engine is one class and one entry here (or :func:`register`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from . import fused, native, reference
from .base import DirectionEngine, Engine, Stack, StackEngine

if TYPE_CHECKING:
    from ..layers.base import RecurrentLayer

ENGINES: tuple[Engine, ...] = (native.ENGINE, fused.ENGINE, reference.ENGINE)
BACKENDS = ("auto", *(e.name for e in ENGINES))


def register(engine: Engine, *, before: str | None = None) -> None:
    """Add ``engine`` to :data:`ENGINES`, before the engine called ``before`` (default: before
    ``reference``, which runs everything and so must stay last). ``backend=engine.name`` then selects
    it and ``auto`` tries it in that place."""
    global ENGINES, BACKENDS
    if not isinstance(engine, Engine) or not hasattr(engine, "run_stack" if engine.whole_stack else "run_direction"):
        raise TypeError(f"register: {engine!r} lacks the engine protocol (gatelab.engines.base)")
    if any(e.name == engine.name for e in ENGINES):
        raise ValueError(f"register: an engine named {engine.name!r} exists already")
    names = [e.name for e in ENGINES]
    target = before or reference.ENGINE.name
    if target not in names:
        raise ValueError(f"register: no engine named {before!r}; have {', '.join(names)}")
    at = names.index(target)
    ENGINES = (*ENGINES[:at], engine, *ENGINES[at:])
    BACKENDS = ("auto", *(e.name for e in ENGINES))


def unregister(name: str) -> None:
    """Remove the engine called ``name`` (not ``reference``)."""
    global ENGINES, BACKENDS
    if name == reference.ENGINE.name:
        raise ValueError("the reference engine cannot be removed: auto falls back to it")
    ENGINES = tuple(e for e in ENGINES if e.name != name)
    BACKENDS = ("auto", *(e.name for e in ENGINES))


def get(name: str) -> Engine:
    """The engine called ``name``; ``ValueError`` listing the names otherwise."""
    for engine in ENGINES:
        if engine.name == name:
            return engine
    raise ValueError(f"unknown engine {name!r}; valid: {', '.join(e.name for e in ENGINES)}")


def choose(layer: RecurrentLayer, backend: str, strict: bool) -> tuple[Engine, str]:
    """The engine for ``layer`` in its current mode, and why (the text of ``explain()``).

    ``"auto"``: the first of :data:`ENGINES` with nothing unsupported. A named backend that cannot run
    the layer falls back to ``reference`` with a warning, or raises ``ValueError`` when ``strict``.
    """
    owner = layer.kind_name
    if backend == "auto":
        why = "backend='auto'"
        for engine in ENGINES:
            blockers = engine.unsupported(layer)
            if not blockers:
                return engine, why + (f": activations and options are exactly torch's, so {engine.describe(layer)} runs"
                                      if engine is ENGINES[0] else f". Runs {engine.describe(layer)}")
            why += f"; {engine.title} does not apply{' either' if engine is not ENGINES[0] else ''}: " + "; ".join(blockers)
        raise AssertionError("the reference engine runs every layer")
    engine = get(backend)
    blockers = engine.unsupported(layer)
    if not blockers:
        return engine, f"backend={backend!r} was asked for. Runs {engine.describe(layer)}"
    message = f"backend={backend!r} cannot run this layer: " + "; ".join(blockers)
    if strict:
        raise ValueError(f"{owner}: {message} (strict=True)")
    warnings.warn(f"{owner}: {message}; falling back to 'reference'", UserWarning, stacklevel=4)
    return reference.ENGINE, message + "; fell back to 'reference'"


def traceable(layer: RecurrentLayer, engine: Engine) -> Engine:
    """What runs ``layer`` under ``torch.compile`` and ``torch.export`` in place of ``engine``: the engine
    itself unless it declares ``traceable = False`` (with the reason in ``untraceable``), else the
    first engine after it in :data:`ENGINES` that traces and runs the layer."""
    if getattr(engine, "traceable", True):
        return engine
    names = [e.name for e in ENGINES]
    later = ENGINES[names.index(engine.name) + 1:] if engine.name in names else ENGINES
    return next((e for e in later if getattr(e, "traceable", True) and not e.unsupported(layer)), reference.ENGINE)


__all__ = ["ENGINES", "BACKENDS", "Engine", "DirectionEngine", "StackEngine", "Stack", "choose", "get", "register",
           "traceable", "unregister",
           "fused", "native", "reference"]
