"""The sLSTM cell of xLSTM (Beck et al. 2024): exponential gates, a normaliser and a stabiliser state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activations import ActivationSpec
from .base import GateActivationSpec, RecurrentCell, Slot, _check_size, unbatch

# log σ(x) where a closed form is exact for every x (log(exp(x)) overflows for x > 88 in float32);
# any other gate activation is taken as log(σ(x)), which must then be positive.
_LOG_GATE = {"exp": lambda x: x, "sigmoid": F.logsigmoid}


def log_gate(act, x: Tensor) -> Tensor:
    """``log act(x)``, exactly for ``exp`` and ``sigmoid``."""
    closed = _LOG_GATE.get(getattr(act, "kind", ""))
    return closed(x) if closed is not None else torch.log(act(x))


class SLSTMCell(RecurrentCell):
    r"""One step of sLSTM (Beck et al. 2024, xLSTM) in its stabilised form, every activation pluggable:

    .. code-block:: text

        ĩ, f̃, z̃, õ = W_ih x + b_ih + R h + b_hh          R block-diagonal over num_heads heads
        log i = log σ_i(ĩ),  log f = log σ_f(f̃)           σ_i = exp, σ_f = sigmoid by default
        m' = max(log f + m, log i)                         the stabiliser
        i' = exp(log i − m'),  f' = exp(log f + m − m')
        c' = f' ⊙ c + i' ⊙ φ(z̃)
        n' = f' ⊙ n + i'                                   the normaliser
        h' = σ_o(õ) ⊙ c' / n'

    This equals the unstabilised recurrence (``c' = f c + i φ(z̃)``, ``n' = f n + i``, ``h' = o c'/n'``)
    from the same ``(h, c, n)`` and ``m = 0``: ``c`` and ``n`` are both carried scaled by ``e^(−m)``,
    which cancels in ``h``, and no ``exp`` of a positive number is taken, so it stays finite where
    that one overflows. ``log σ`` is exact for ``exp`` and ``sigmoid``; another gate activation must
    be positive (its log is taken).

    Row blocks ``i, f, z, o`` (``weight_ih (4H, I)``). ``weight_hh (4H, H/num_heads)`` holds the
    diagonal blocks of ``R``: row ``j`` of a gate block (unit ``j``, head ``j // (H/num_heads)``) reads
    that head's part of ``h`` only. State ``(h, c, n, m)``; the output is ``h``. Initialisation:
    every weight and bias U(±1/√H) (torch's); ``forget_bias`` and ``init="chrono"`` set the ``f`` block.
    Call: ``(h', c', n', m') = cell(x, (h, c, n, m))``.
    """

    name = "slstm"
    blocks = ("i", "f", "z", "o")
    gate_names = ("i", "f", "o")
    slots = (
        Slot("sigma_i", "gate_activation", "exp", gate="i"),
        Slot("sigma_f", "gate_activation", "sigmoid", gate="f"),
        Slot("phi", "candidate_activation", "tanh"),
        Slot("sigma_o", "gate_activation", "sigmoid", gate="o"),
    )
    state_names = ("h", "c", "n", "m")
    zoneout_states = ()
    recurrence = "block_diagonal"  # R h per head: not the fused engine's dense W_hh loops
    keep_gate = "f"
    memory_state = "c"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        *,
        num_heads: int = 1,
        gate_activation: GateActivationSpec | None = None,
        candidate_activation: ActivationSpec = "tanh",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_size("num_heads", num_heads)
        if hidden_size % num_heads:
            raise ValueError(f"SLSTMCell: hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
        super().__init__(input_size, hidden_size, bias, recurrent_size=hidden_size // num_heads, device=device,
                         dtype=dtype)
        self.num_heads = num_heads
        self._gate_slots(gate_activation, self.gate_names)
        self._slot("phi", candidate_activation, "candidate_activation")
        self.reset_parameters()

    def state_sizes(self) -> tuple[int, ...]:
        return (self.hidden_size,) * 4

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def forward(self, input: Tensor, state: tuple[Tensor, ...] | None = None) -> tuple[Tensor, ...]:
        x, batched = self._check_input(input)
        given = (None,) * 4 if state is None else tuple(state)
        if len(given) != 4:
            raise ValueError(f"SLSTMCell: expected the state as a tuple (h, c, n, m), got {len(given)} tensors")
        state = tuple(self._check_state(n, s, x.shape[0], self.hidden_size, batched, x)
                      for n, s in zip(self.state_names, given))
        _, new = self.step(x, state)
        return tuple(unbatch(s, batched) for s in new)

    def recurrent(self, h: Tensor, weight_hh: Tensor | None = None) -> Tensor:
        """``R h + b_hh`` (B, 4H) with ``R`` block-diagonal: each head's rows read that head's units."""
        W = self.weight_hh if weight_hh is None else weight_hh
        K, d = self.num_heads, self.hidden_size // self.num_heads
        R = W.view(4, K, d, d)  # (gate, head, out, in)
        gh = torch.einsum("bki,gkoi->bgko", h.reshape(h.shape[0], K, d), R).reshape(h.shape[0], 4 * self.hidden_size)
        return gh if self.bias_hh is None else gh + self.bias_hh

    def step(self, x: Tensor, state: tuple[Tensor, ...], rec_mask: Tensor | None = None,
             weight_hh: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        h_rec = state[0] if rec_mask is None else state[0] * rec_mask
        return self.combine(F.linear(x, self.weight_ih, self.bias_ih), self.recurrent(h_rec, weight_hh), state)

    def combine(self, xw: Tensor, gh: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        h, c, n, m = state
        pre_i, pre_f, pre_z, pre_o = (xw + gh).chunk(4, 1)
        log_i, log_f = log_gate(self.sigma_i, pre_i), log_gate(self.sigma_f, pre_f)
        m_new = torch.maximum(log_f + m, log_i)
        i = torch.exp(log_i - m_new)
        f = torch.exp(log_f + m - m_new)
        c = f * c + i * self.phi(pre_z)
        n = f * n + i
        h = self.sigma_o(pre_o) * c / n
        return h, (h, c, n, m_new)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", num_heads={self.num_heads}" if self.num_heads != 1 else "")
