"""The cell registry: one entry per cell kind maps its name to its cell and layer classes.

Config (``model.cell``), :class:`~gatelab.models.SequenceModel`, ``gatelab list``, the demo and the
engines look cell kinds up here; the facts about each kind (slots, states, torch counterpart ...)
are declared on the cell class itself (:class:`~gatelab.cells.RecurrentCell`). Adding a cell kind
is one cell class, one layer class and one call::

    gatelab.cells.registry.register(MyCell, MyLayer)   # MyCell.name is the registry name

The fused engine runs any registered cell whose recurrence is ``"matrix"`` and whose step is the two
products and :meth:`~gatelab.cells.RecurrentCell.combine` on its PyTorch loop (``combine``
differentiated by autograd per step), and the built-in kinds with hand-written steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import RecurrentCell

if TYPE_CHECKING:
    from ..layers.base import RecurrentLayer

__all__ = ["CellEntry", "register", "unregister", "get", "available", "entry_of"]


@dataclass(frozen=True)
class CellEntry:
    """A registered cell kind: its name, cell class and layer class."""

    name: str
    cell: type[RecurrentCell]
    layer: type[RecurrentLayer]

    @property
    def roles(self) -> dict[str, str]:
        """The activation arguments the cell takes, each with its default."""
        return self.cell.roles()


_ENTRIES: dict[str, CellEntry] = {}


def register(cell: type[RecurrentCell], layer: type[RecurrentLayer]) -> CellEntry:
    """Register a cell kind under ``cell.name``; returns its entry. A name may be registered once."""
    if not (isinstance(cell, type) and issubclass(cell, RecurrentCell)):
        raise TypeError(f"register: expected a RecurrentCell subclass, got {cell!r}")
    if not cell.name or not cell.name.isidentifier():
        raise ValueError(f"register: {cell.__name__}.name must be an identifier (the config name), got {cell.name!r}")
    if getattr(layer, "cell_class", None) is not cell:
        raise ValueError(f"register: {layer.__name__}.cell_class must be {cell.__name__}")
    if cell.name in _ENTRIES and _ENTRIES[cell.name].cell is not cell:
        raise ValueError(f"register: a cell named {cell.name!r} is registered already ({_ENTRIES[cell.name].cell.__name__})")
    entry = CellEntry(cell.name, cell, layer)
    _ENTRIES[cell.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove a registered cell kind (tests add and remove toy cells)."""
    _ENTRIES.pop(name, None)


def _builtin() -> None:
    """The built-in kinds register when :mod:`gatelab.layers` is imported; make sure it is."""
    from .. import layers  # noqa: F401


def get(name: str) -> CellEntry:
    """The entry registered under ``name``; ``ValueError`` listing the names otherwise."""
    _builtin()
    try:
        return _ENTRIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown cell {name!r}; valid: {', '.join(_ENTRIES)}") from None


def available() -> tuple[str, ...]:
    """The registered cell names, in registration order."""
    _builtin()
    return tuple(_ENTRIES)


def entry_of(cell: RecurrentCell | type[RecurrentCell]) -> CellEntry | None:
    """The entry of a cell (or cell class), also for subclasses such as torch's parametrised
    ``ParametrizedLSTMCell``: the nearest registered class in its method resolution order."""
    _builtin()
    cls = cell if isinstance(cell, type) else type(cell)
    for base in cls.__mro__:
        name = getattr(base, "name", "")
        if isinstance(name, str) and name in _ENTRIES and _ENTRIES[name].cell is base:
            return _ENTRIES[name]
    return None
