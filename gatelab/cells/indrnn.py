"""The independently recurrent cell, IndRNN (Li et al. 2018): one recurrent weight per unit."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import ActivationSpec
from .base import RecurrentCell, Slot, _check_size, unbatch


def recurrent_bound(recurrent_max: float | None = None, max_length: int | None = None, gain: float = 2.0) -> float:
    """The bound on ``|u|``: ``recurrent_max`` when given, else Li et al.'s ``gain^(1/max_length)`` (a
    gradient through ``max_length`` steps of a ReLU IndRNN grows at most ``gain``-fold; their code uses
    ``gain = 2``), else 1 (no growth over any length)."""
    if recurrent_max is not None:
        if isinstance(recurrent_max, bool) or not isinstance(recurrent_max, (int, float)) or not (
                math.isfinite(recurrent_max) and recurrent_max > 0):
            raise ValueError(f"recurrent_max must be a positive number, got {recurrent_max!r}")
        if max_length is not None:
            raise ValueError("pass recurrent_max or max_length, not both")
        return float(recurrent_max)
    if max_length is not None:
        _check_size("max_length", max_length)
        return float(gain ** (1.0 / max_length))
    return 1.0


class IndRNNCell(RecurrentCell):
    r"""One step of IndRNN (Li et al. 2018) with any activation φ (ReLU by default):

    .. code-block:: text

        h' = φ(W_ih x + b_ih + u ⊙ h)          |u_j| ≤ u_max for every unit j

    ``weight_ih (H, I)``, ``bias_ih (H,)`` and the per-unit recurrent weight ``u``, stored as
    ``weight_hh (H,)`` (the diagonal of an Elman ``W_hh``); there is no ``bias_hh``.

    The bound is a **constraint** (the paper's clipping, not a parametrisation): :meth:`constrain_`
    projects ``u`` onto ``[−u_max, u_max]`` in place; an :class:`~gatelab.IndRNN` layer (and this cell
    when called in training mode) does so at the start of every training-mode call, so every step
    computes with a bounded ``u`` whatever the optimiser did. ``u_max`` is ``recurrent_max``, or
    ``2^(1/max_length)`` from the memory length wanted (:func:`recurrent_bound`), default 1.

    Initialisation: ``W_ih`` and ``b_ih`` ~ U(±1/√H) (torch's), ``u`` ~ U(0, u_max) (the authors' code).
    Call: ``h' = cell(x, h)``.
    """

    name = "indrnn"
    blocks = ("h",)
    slots = (Slot("phi", "activation", "relu"),)
    recurrence = "elementwise"  # u ⊙ h: no matrix product, so the fused engine's W_hh loops do not apply

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        *,
        activation: ActivationSpec = "relu",
        recurrent_max: float | None = None,
        max_length: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.recurrent_max = recurrent_bound(recurrent_max, max_length)
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))  # u (H,)
        self.register_parameter("bias_hh", None)
        self._slot("phi", activation, "activation")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            self.weight_ih.uniform_(-bound, bound)
            if self.bias_ih is not None:
                self.bias_ih.uniform_(-bound, bound)
            self.weight_hh.uniform_(0.0, self.recurrent_max)

    @torch.no_grad()
    def constrain_(self) -> None:
        """Project ``u`` onto ``[−u_max, u_max]`` in place (nothing is written when it is inside)."""
        u = self.weight_hh
        if bool((u.abs() > self.recurrent_max).any()):
            u.clamp_(-self.recurrent_max, self.recurrent_max)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, batched = self._check_input(input)
        h = self._check_state("hx", hx, x.shape[0], self.hidden_size, batched, x)
        if self.training:
            self.constrain_()
        return unbatch(self.step(x, (h,))[0], batched)

    def step(self, x: Tensor, state: tuple[Tensor, ...], rec_mask: Tensor | None = None,
             weight_hh: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        (h,) = state
        u = self.weight_hh if weight_hh is None else weight_hh
        h = self.phi(F.linear(x, self.weight_ih, self.bias_ih) + u * h)
        return h, (h,)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", recurrent_max={self.recurrent_max:.6g}"
