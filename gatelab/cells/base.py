"""What every cell shares: torch's weight layout, initialisation, activation slots and input checks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import activations
from ..activations import ActivationSpec, Bound

GateActivationSpec = ActivationSpec | Mapping[str, ActivationSpec]


class RecurrentCell(nn.Module):
    """Base of the one-step cells.

    Holds ``weight_ih (G·H, I)``, ``weight_hh (G·H, R)``, ``bias_ih``, ``bias_hh`` exactly as
    ``torch.nn`` does (``R`` is the recurrent input size: ``H``, or ``proj_size`` for a projected
    LSTM), with the ``G`` row blocks named by :attr:`blocks` in torch's order.
    """

    blocks: tuple[str, ...] = ()  # row blocks of weight_ih / weight_hh, in order
    gate_names: tuple[str, ...] = ()  # blocks whose activation is the gate activation
    default_gate_activation: ActivationSpec = "sigmoid"

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
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
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

    # -- activations -----------------------------------------------------------------------------

    def _slot(self, attr: str, spec: ActivationSpec, role: str) -> Bound:
        """Resolve one activation slot and store it as ``self.<attr>`` (a submodule if learnable)."""
        try:
            act = activations.resolve(spec, self.hidden_size)
        except TypeError as e:
            raise TypeError(f"{type(self).__name__}: {role}: {e}") from None
        if isinstance(act, nn.Module) and self.weight_ih is not None:
            act = act.to(device=self.weight_ih.device, dtype=self.weight_ih.dtype)
        setattr(self, attr, act)
        return act

    def _gate_slots(self, spec: GateActivationSpec | None, gates: Sequence[str]) -> None:
        """Set ``self.sigma_<gate>`` for every gate from one spec or a mapping per gate name."""
        spec = self.default_gate_activation if spec is None else spec
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
            per_gate = {g: spec.get(g, self.default_gate_activation) for g in gates}
        else:
            per_gate = dict.fromkeys(gates, spec)
        for g, s in per_gate.items():
            self._slot(f"sigma_{g}", s, f"gate_activation[{g!r}]")

    def activation_slots(self) -> dict[str, Bound]:
        """Slot name → the activation it holds (``sigma_i``, ``phi``, ``psi`` ...)."""
        return {k: v for k, v in vars(self).items() if k.startswith(("sigma_", "phi", "psi"))} | {
            k: m for k, m in self._modules.items() if k.startswith(("sigma_", "phi", "psi"))
        }

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


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def unbatch(t: Tensor, batched: bool) -> Tensor:
    return t if batched else t.squeeze(0)
