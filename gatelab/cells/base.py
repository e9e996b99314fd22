"""What every cell shares: torch's weight layout, initialisation, activation slots and input checks."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrize import type_before_parametrizations

from .. import activations
from ..activations import ActivationSpec, Bound

GateActivationSpec = ActivationSpec | Mapping[str, ActivationSpec]


@dataclass(frozen=True)
class Slot:
    """One activation slot of a cell kind.

    ``attr`` is the attribute that holds the activation (``sigma_f``, ``phi``); ``role`` the
    constructor argument that sets it (``gate_activation``, one argument for every gate; a mapping
    per gate name picks ``gate``); ``default`` what it holds unless set; ``torch`` the activation
    kinds torch's own kernel computes there (empty: torch has no such slot).
    """

    attr: str
    role: str
    default: str
    gate: str | None = None
    torch: tuple[str, ...] = ()


class RecurrentCell(nn.Module):
    """Base of the one-step cells.

    Holds ``weight_ih (G·H, I)``, ``weight_hh (G·H, R)``, ``bias_ih``, ``bias_hh`` exactly as
    ``torch.nn`` does (``R`` is the recurrent input size: ``H``, or ``proj_size`` for a projected
    LSTM), with the ``G`` row blocks named by :attr:`blocks` in torch's order.

    Each cell kind declares its facts as class attributes, and everything outside the cell (config,
    models, the CLI, init, the engines) reads them here instead of keeping a table of its own:

    * ``name``: the registry name (``"lstm"``; ``model.cell`` in a config).
    * ``slots``: its activation slots (:class:`Slot`), in the order the C++ kernels take them.
    * ``state_names`` / ``output_state``: the state tensors, and the index of the one that is also the
      per-step output (``None`` when the output is computed from the state, as ``y = o ⊙ s``).
    * ``zoneout_states``: the states zoneout may act on (default: all).
    * ``recurrence``: ``"matrix"``, one product ``W_hh h`` per step whose input is state 0 (what the
      fused engine hoists around); the cell's elementwise rest is :meth:`combine`.
    * ``torch_cell`` / ``torch_mode``: the ``torch.nn`` cell it equals with default options and torch's
      kernel mode string (``None`` when torch has none); :meth:`torch_differences` says why not.
    * ``keep_gate``: the block whose bias controls memory retention (``forget_bias``, chrono init).
    * ``memory_state``: the state that carries the memory (an LSTM's ``c``); the diagnostics' verdict
      leads with it. Default: the first state.
    """

    name: ClassVar[str] = ""
    blocks: tuple[str, ...] = ()  # row blocks of weight_ih / weight_hh, in order
    gate_names: tuple[str, ...] = ()  # blocks whose activation is the gate activation
    slots: ClassVar[tuple[Slot, ...]] = ()
    output_state: ClassVar[int | None] = 0
    zoneout_states: ClassVar[tuple[str, ...] | None] = None
    recurrence: ClassVar[str] = "matrix"
    torch_cell: ClassVar[type[nn.Module] | None] = None
    torch_mode: str | None = None
    keep_gate: str | None = None
    memory_state: ClassVar[str | None] = None  # None: state_names[0]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        *,
        recurrent_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_size("input_size", input_size)
        _check_size("hidden_size", hidden_size)
        check_flag("bias", bias)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.recurrent_size = hidden_size if recurrent_size is None else recurrent_size
        factory = {"device": device, "dtype": dtype}
        rows = len(self.blocks) * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(rows, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(rows, self.recurrent_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(rows, **factory))
            self.bias_hh = nn.Parameter(torch.empty(rows, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)

    state_names: tuple[str, ...] = ("h",)

    def state_sizes(self) -> tuple[int, ...]:
        """Feature size of each state tensor, in :attr:`state_names` order."""
        return (self.hidden_size,)

    @property
    def output_size(self) -> int:
        """Feature size of the per-step output (``proj_size`` for a projected LSTM)."""
        return self.recurrent_size

    # -- parameters ------------------------------------------------------------------------------

    def _uniform_parameters(self) -> list[Tensor]:
        """Parameters torch-style initialisation sets to U(±1/√H) (activations and norms excluded)."""
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr", "weight_ci", "weight_cf",
                 "weight_co", "weight_gr")
        return [p for n in names if (p := getattr(self, n, None)) is not None]

    def reset_parameters(self) -> None:
        """torch's default: every weight and bias ~ U(-1/√H, 1/√H)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for p in self._uniform_parameters():
                p.uniform_(-bound, bound)

    @contextlib.contextmanager
    def using(self, weights: Mapping[str, Tensor]) -> Iterator[RecurrentCell]:
        """Within the block the cell computes with ``weights`` (its parameter names, as
        ``named_parameters()`` gives them, to tensors) in place of its own parameters. A layer binds its
        torch-named weights (parametrisations applied) to its cells this way for each call."""
        saved = []
        try:
            for name, value in weights.items():
                path, _, leaf = name.rpartition(".")
                owner = self.get_submodule(path)
                if leaf not in owner._parameters:
                    raise KeyError(f"{type(self).__name__} has no parameter {name!r}")
                saved.append((owner, leaf, owner._parameters[leaf]))
                owner._parameters[leaf] = value
            yield self
        finally:
            for owner, leaf, value in reversed(saved):
                owner._parameters[leaf] = value

    @contextlib.contextmanager
    def observing(self, observer: Callable[[str, Tensor, Tensor], None]) -> Iterator[RecurrentCell]:
        """Within the block every activation slot calls ``observer(slot, z, y)`` with its input and
        output at each call (the diagnostics' gate statistics read them); the slots are restored on
        exit. Observed slots are plain callables, so run the reference loop meanwhile (a layer does
        while a step hook is registered)."""
        originals = self.activation_slots()
        try:
            for slot, act in originals.items():
                watched = _Observed(act, slot, observer)
                if slot in self._modules:
                    self._modules[slot] = watched
                else:
                    self.__dict__[slot] = watched
            yield self
        finally:
            for slot, act in originals.items():
                (self._modules if slot in self._modules else self.__dict__)[slot] = act

    # -- activations -----------------------------------------------------------------------------

    def _slot(self, attr: str, spec: ActivationSpec, role: str) -> Bound:
        """Resolve one activation slot and store it as ``self.<attr>`` (a submodule if learnable)."""
        try:
            act = activations.resolve(spec, self.hidden_size)
        except TypeError as e:
            raise TypeError(f"{type(self).__name__}: {role}: {e}") from None
        if isinstance(act, nn.Module) and self.weight_ih is not None:
            act = act.to(device=self.weight_ih.device, dtype=self.weight_ih.dtype)
        try:
            activations.check_elementwise(act, self.hidden_size, dtype=self.weight_ih.dtype, device=self.weight_ih.device)
        except (TypeError, RuntimeError, ValueError) as e:
            raise TypeError(f"{type(self).__name__}: {role}: {e}") from None
        setattr(self, attr, act)
        return act

    @classmethod
    def roles(cls) -> dict[str, str]:
        """Constructor argument -> default activation, for every activation slot of this kind."""
        return {s.role: s.default for s in cls.slots}

    def _gate_slots(self, spec: GateActivationSpec | None, gates: Sequence[str]) -> None:
        """Set ``self.sigma_<gate>`` for every gate from one spec or a mapping per gate name."""
        default = {s.gate: s.default for s in self.slots if s.gate is not None}
        spec = None if spec is None else spec
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(self.gate_names))
            if unknown:
                raise ValueError(
                    f"{type(self).__name__} has gates {', '.join(self.gate_names)}; "
                    f"gate_activation names {', '.join(map(repr, unknown))}"
                )
            inactive = sorted(set(spec) - set(gates))
            if inactive:
                raise ValueError(
                    f"{type(self).__name__}: gate_activation names {', '.join(map(repr, inactive))}, but in this "
                    f"configuration only {', '.join(gates) or 'no gate'} have an activation (removed or coupled gates)"
                )
            per_gate = {g: spec.get(g, default[g]) for g in gates}
        else:
            per_gate = {g: default[g] if spec is None else spec for g in gates}
        for g, s in per_gate.items():
            self._slot(f"sigma_{g}", s, f"gate_activation[{g!r}]")

    def activation_slots(self) -> dict[str, Bound]:
        """Slot attribute → the activation it holds (``sigma_i``, ``phi``, ``psi`` ...), in :attr:`slots`
        order; a slot this configuration does not have (a removed or coupled gate) is absent."""
        out = {}
        for s in self.slots:
            act = self._modules.get(s.attr, self.__dict__.get(s.attr))
            if act is not None:
                out[s.attr] = act
        return out

    def torch_differences(self) -> list[str]:
        """How this cell differs from :attr:`torch_cell` (empty when it computes exactly what torch's does)."""
        cls = type_before_parametrizations(self)
        if self.torch_cell is None or "torch_cell" not in vars(cls):  # a subclass may compute something else
            return [f"torch has no {cls.__name__}"]
        out = []
        acts = self.activation_slots()
        for s in self.slots:
            kind = getattr(acts.get(s.attr), "kind", "")
            if s.attr in acts and kind not in s.torch:
                role = s.role + (f"[{s.gate!r}]" if s.gate else "")
                out.append(f"{role} is {getattr(acts[s.attr], 'key', type(acts[s.attr]).__name__)} "
                           f"(torch has {' or '.join(s.torch)})")
        return out

    # -- the step ----------------------------------------------------------------------------------

    def step(
        self, x: Tensor, state: tuple[Tensor, ...], rec_mask: Tensor | None = None, weight_hh: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One step on batched, validated tensors: ``(output, new state)``. The engines call this.

        For a ``"matrix"`` recurrence the default is the two products and :meth:`combine`:
        ``combine(W_ih x + b_ih, W_hh h_rec + b_hh, state)`` with ``h_rec = state[0]`` (times the
        recurrent dropout mask, when given); ``weight_hh`` replaces ``W_hh`` (DropConnect).
        """
        h_rec = state[0] if rec_mask is None else state[0] * rec_mask
        W_hh = self.weight_hh if weight_hh is None else weight_hh
        return self.combine(F.linear(x, self.weight_ih, self.bias_ih), F.linear(h_rec, W_hh, self.bias_hh), state)

    def combine(self, xw: Tensor, gh: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The elementwise part of a step: from ``xw = W_ih x + b_ih`` and ``gh = W_hh h_rec + b_hh``
        (both ``(B, G·H)``) and the old state, the output and the new state."""
        raise NotImplementedError(f"{type(self).__name__} defines step() itself, not combine()")

    # -- inputs ----------------------------------------------------------------------------------

    def _check_input(self, input: Tensor) -> tuple[Tensor, bool]:
        """Validate ``input``; return it as (B, I) and whether it was batched."""
        if not isinstance(input, Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(
                f"{type(self).__name__}: expected input of shape (batch, {self.input_size}) or "
                f"({self.input_size},), got {tuple(input.shape)}"
            )
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"{type(self).__name__}: expected input with {self.input_size} features "
                f"(input_size), got shape {tuple(input.shape)}"
            )
        ref = self.weight_ih
        if input.dtype != ref.dtype:
            raise ValueError(f"{type(self).__name__}: input dtype {input.dtype} does not match parameters' {ref.dtype}")
        if input.device != ref.device:
            raise ValueError(f"{type(self).__name__}: input on {input.device}, parameters on {ref.device}")
        batched = input.dim() == 2
        return (input if batched else input.unsqueeze(0)), batched

    def _check_state(self, name: str, state: Tensor | None, batch: int, size: int, batched: bool, like: Tensor) -> Tensor:
        """Validate one state tensor (zeros when None); return it as (B, size)."""
        if state is None:
            return like.new_zeros(batch, size)
        if not isinstance(state, Tensor):
            raise TypeError(f"{type(self).__name__}: {name} must be a Tensor, got {type(state).__name__}")
        expected = (batch, size) if batched else (size,)
        if tuple(state.shape) != expected:
            raise ValueError(f"{type(self).__name__}: expected {name} of shape {expected}, got {tuple(state.shape)}")
        if state.dtype != like.dtype or state.device != like.device:
            raise ValueError(
                f"{type(self).__name__}: {name} is {state.dtype} on {state.device}, "
                f"input is {like.dtype} on {like.device}"
            )
        return state if batched else state.unsqueeze(0)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        acts = ", ".join(f"{k}={getattr(v, 'key', v)}" for k, v in self.activation_slots().items())
        return f"{s}, {acts}" if acts else s


class _Observed(nn.Module):
    """An activation slot under :meth:`RecurrentCell.observing`: calls the activation, then the observer."""

    def __init__(self, act: Bound, slot: str, observer: Callable[[str, Tensor, Tensor], None]) -> None:
        super().__init__()
        self.act, self.slot, self.observer = act, slot, observer

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(x)
        self.observer(self.slot, x, y)
        return y


def check_flag(name: str, value: object, *, optional: bool = False) -> None:
    """A flag must be a bool (``None`` too when ``optional``): a truthy string such as ``"no"`` is an error."""
    if not (isinstance(value, bool) or (optional and value is None)):
        raise TypeError(f"{name} must be True or False{' (or None)' if optional else ''}, got {value!r} "
                        f"({type(value).__name__})")


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def unbatch(t: Tensor, batched: bool) -> Tensor:
    return t if batched else t.squeeze(0)
