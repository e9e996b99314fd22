"""The gated-state cell of seed 000: the gated state itself recurs, the output is gated but not squashed."""

from __future__ import annotations

import torch
from torch import Tensor

from ..activations import ActivationSpec
from .base import GateActivationSpec, RecurrentCell, Slot, unbatch


class GatedStateCell(RecurrentCell):
    r"""One step of the gated-state recurrence:

    .. code-block:: text

        f, i, o = σ(W_ih x + b_ih + W_hh s + b_hh)     (first three row blocks)
        s̃  = φ(W_ih x + b_ih + W_hh s + b_hh)          (fourth row block)
        s' = f ⊙ s + i ⊙ s̃
        y  = o ⊙ s'

    Row blocks are ``f, i, o, s̃`` (``weight_ih (4H, I)``). Unlike an LSTM, the recurrent input is
    the state ``s`` itself and the output is not squashed. Call: ``(y, s') = cell(x, s)``.
    """

    name = "gated_state"
    blocks = ("f", "i", "o", "n")
    gate_names = ("f", "i", "o")
    slots = (
        Slot("sigma_f", "gate_activation", "sigmoid", gate="f"),
        Slot("sigma_i", "gate_activation", "sigmoid", gate="i"),
        Slot("sigma_o", "gate_activation", "sigmoid", gate="o"),
        Slot("phi", "candidate_activation", "tanh"),
    )
    state_names = ("s",)
    output_state = None  # the output y = o ⊙ s' is not the state
    keep_gate = "f"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        *,
        gate_activation: GateActivationSpec | None = None,
        candidate_activation: ActivationSpec = "tanh",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self._gate_slots(gate_activation, self.gate_names)
        self._slot("phi", candidate_activation, "candidate_activation")
        self.reset_parameters()

    def forward(self, input: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, batched = self._check_input(input)
        s = self._check_state("state", state, x.shape[0], self.hidden_size, batched, x)
        y, (s,) = self.step(x, (s,))
        return unbatch(y, batched), unbatch(s, batched)

    def combine(self, xw: Tensor, gh: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        (s,) = state
        pre_f, pre_i, pre_o, pre_n = (xw + gh).chunk(4, 1)
        f, i, o = self.sigma_f(pre_f), self.sigma_i(pre_i), self.sigma_o(pre_o)
        s = f * s + i * self.phi(pre_n)
        y = o * s
        return y, (s,)
