"""Elman (vanilla) recurrent cell."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import activations
from ..activations import ActivationSpec
from .base import RecurrentCell, Slot, unbatch


class ElmanCell(RecurrentCell):
    r"""One step of an Elman RNN with any activation φ:

    .. math:: h' = φ(W_{ih} x + b_{ih} + W_{hh} h + b_{hh})

    Equals ``torch.nn.RNNCell`` for ``activation="tanh"`` (default) and ``"relu"``, with the same
    parameters. ``nonlinearity`` is accepted as torch's name for ``activation``.

    Call: ``h' = cell(x, h)`` with ``x (B, I)`` or ``(I,)``; ``h`` may be omitted (zeros).
    """

    name = "rnn"
    blocks = ("h",)
    slots = (Slot("phi", "activation", "tanh", torch=("tanh", "relu")),)
    torch_cell = nn.RNNCell

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: ActivationSpec | None = None,
        *,
        activation: ActivationSpec | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        if activation is not None and nonlinearity is not None and activations.get(activation) is not activations.get(
                nonlinearity):
            raise ValueError(f"pass activation or nonlinearity, not both (got {activation!r} and {nonlinearity!r})")
        self._slot("phi", activation or nonlinearity or "tanh", "activation")
        self.reset_parameters()

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, batched = self._check_input(input)
        h = self._check_state("hx", hx, x.shape[0], self.hidden_size, batched, x)
        return unbatch(self.step(x, (h,))[0], batched)

    @property
    def torch_mode(self) -> str:
        return "RNN_RELU" if getattr(self.phi, "kind", "") == "relu" else "RNN_TANH"

    def combine(self, xw: Tensor, gh: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        h = self.phi(xw + gh)
        return h, (h,)
