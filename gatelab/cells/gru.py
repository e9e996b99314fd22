"""Gated recurrent unit cell, reset-after (torch, cuDNN) or reset-before (Cho 2014)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import ActivationSpec
from .base import GateActivationSpec, RecurrentCell, Slot, check_flag, unbatch


class GRUCell(RecurrentCell):
    r"""One step of a GRU with pluggable gate activations σ_r, σ_z and candidate activation φ:

    .. code-block:: text

        r  = σ_r(W_ir x + b_ir + W_hr h + b_hr)
        z  = σ_z(W_iz x + b_iz + W_hz h + b_hz)
        n  = φ(W_in x + b_in + r ⊙ (W_hn h + b_hn))        reset_after=True (torch)
        n  = φ(W_in x + b_in + W_hn (r ⊙ h) + b_hn)        reset_after=False (Cho 2014)
        h' = (1 − z) ⊙ n + z ⊙ h

    Weights and gate order ``r, z, n`` are torch's; with default activations and ``reset_after``
    it equals ``torch.nn.GRUCell``. ``gate_activation`` is one activation or a mapping
    ``{"r": ..., "z": ...}``.
    """

    name = "gru"
    blocks = ("r", "z", "n")
    gate_names = ("r", "z")
    slots = (
        Slot("sigma_r", "gate_activation", "sigmoid", gate="r", torch=("sigmoid",)),
        Slot("sigma_z", "gate_activation", "sigmoid", gate="z", torch=("sigmoid",)),
        Slot("phi", "candidate_activation", "tanh", torch=("tanh",)),
    )
    torch_cell = nn.GRUCell
    torch_mode = "GRU"
    keep_gate = "z"  # h' = (1 − z) n + z h: z plays the forget gate's part

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        *,
        gate_activation: GateActivationSpec | None = None,
        candidate_activation: ActivationSpec = "tanh",
        reset_after: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_flag("reset_after", reset_after)
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.reset_after = reset_after
        self._gate_slots(gate_activation, self.gate_names)
        self._slot("phi", candidate_activation, "candidate_activation")
        self.reset_parameters()

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, batched = self._check_input(input)
        h = self._check_state("hx", hx, x.shape[0], self.hidden_size, batched, x)
        return unbatch(self.step(x, (h,))[0], batched)

    def step(
        self, x: Tensor, state: tuple[Tensor, ...], rec_mask: Tensor | None = None, weight_hh: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        (h,) = state
        h_rec = h if rec_mask is None else h * rec_mask  # variational dropout: recurrent products only
        gi_r, gi_z, gi_n = F.linear(x, self.weight_ih, self.bias_ih).chunk(3, 1)
        W_hr, W_hz, W_hn = (self.weight_hh if weight_hh is None else weight_hh).chunk(3, 0)
        b_hr, b_hz, b_hn = self.bias_hh.chunk(3, 0) if self.bias else (None, None, None)
        r = self.sigma_r(gi_r + F.linear(h_rec, W_hr, b_hr))
        z = self.sigma_z(gi_z + F.linear(h_rec, W_hz, b_hz))
        if self.reset_after:
            n = self.phi(gi_n + r * F.linear(h_rec, W_hn, b_hn))
        else:
            n = self.phi(gi_n + F.linear(r * h_rec, W_hn, b_hn))
        h = (1 - z) * n + z * h
        return h, (h,)

    def torch_differences(self) -> list[str]:
        out = [] if self.reset_after else ["reset_after=False (torch's GRU resets after the product)"]
        return out + super().torch_differences()

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.reset_after else ", reset_after=False")
