"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): gates that read x_t only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activations import ActivationSpec
from .base import GateActivationSpec, RecurrentCell, Slot, unbatch

# How a layer runs the recurrence (gatelab.engines.scan): "auto" (parallel on an accelerator,
# sequential on the CPU), "sequential" (one elementwise pass) or "parallel" (associative scan).
SCAN_FORMS = ("auto", "sequential", "parallel")


class _MinCell(RecurrentCell):
    """Shared by minGRU and minLSTM: no recurrent weights, one bias, a linear recurrence in ``h``.

    Every gate and the candidate read ``x_t`` only, so a step is ``h' = a ⊙ h + b`` with ``a`` and
    ``b`` functions of ``x_t`` (:meth:`coefficients`). A layer therefore runs all steps' input
    projections as one GEMM and the recurrence as a scan (:mod:`gatelab.engines.scan`); :meth:`step`
    is the step-by-step recurrence and the reference they are tested against.
    """

    recurrence = "none"  # nothing of h enters a product: the fused engine's W_hh loops do not apply

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        *,
        gate_activation: GateActivationSpec | None = None,
        candidate_activation: ActivationSpec = "identity",
        scan: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if scan not in SCAN_FORMS:
            raise ValueError(f"{type(self).__name__}: scan must be one of {', '.join(SCAN_FORMS)}, got {scan!r}")
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.scan = scan  # how a layer runs the recurrence; the step is the same maths
        self.register_parameter("weight_hh", None)  # gates read x_t only
        self.register_parameter("bias_hh", None)  # one bias: b_z, b_h live in bias_ih
        self._gate_slots(gate_activation, self.gate_names)
        self._slot("phi", candidate_activation, "candidate_activation")
        self.reset_parameters()

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, batched = self._check_input(input)
        h = self._check_state("hx", hx, x.shape[0], self.hidden_size, batched, x)
        return unbatch(self.step(x, (h,))[0], batched)

    def coefficients(self, xw: Tensor) -> tuple[Tensor, Tensor]:
        """From ``xw = W_ih x + b_ih`` (``(..., G·H)``), ``(a, b)`` with ``h' = a ⊙ h + b``."""
        raise NotImplementedError


class MinGRUCell(_MinCell):
    r"""One step of minGRU (Feng et al. 2024) with pluggable σ_z and candidate activation g:

    .. code-block:: text

        z  = σ_z(W_z x + b_z)
        h̃  = g(W_h x + b_h)
        h' = (1 − z) ⊙ h + z ⊙ h̃

    Row blocks ``z, h`` of ``weight_ih (2H, I)`` and ``bias_ih (2H,)``; there is no ``weight_hh``.
    ``g`` defaults to the identity (the paper's sequential-mode minGRU); the paper's log-space g is the
    registered ``"min_g"`` (x + 1/2 for x ≥ 0, σ(x) otherwise). Note ``z`` is an update gate: a large
    ``z`` forgets (the opposite of a GRU's ``z``). Call: ``h' = cell(x, h)``.
    """

    name = "min_gru"
    blocks = ("z", "h")
    gate_names = ("z",)
    slots = (
        Slot("sigma_z", "gate_activation", "sigmoid", gate="z"),
        Slot("phi", "candidate_activation", "identity"),
    )

    def step(self, x: Tensor, state: tuple[Tensor, ...], rec_mask: Tensor | None = None,
             weight_hh: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        (h,) = state
        pre_z, pre_h = F.linear(x, self.weight_ih, self.bias_ih).chunk(2, -1)
        z = self.sigma_z(pre_z)
        h_tilde = self.phi(pre_h)
        h = (1 - z) * h + z * h_tilde
        return h, (h,)

    def coefficients(self, xw: Tensor) -> tuple[Tensor, Tensor]:
        pre_z, pre_h = xw.chunk(2, -1)
        z = self.sigma_z(pre_z)
        return 1 - z, z * self.phi(pre_h)


class MinLSTMCell(_MinCell):
    r"""One step of minLSTM (Feng et al. 2024) with pluggable σ_f, σ_i and candidate activation g:

    .. code-block:: text

        f  = σ_f(W_f x + b_f)
        i  = σ_i(W_i x + b_i)
        h̃  = g(W_h x + b_h)
        f', i' = f / (f + i), i / (f + i)
        h' = f' ⊙ h + i' ⊙ h̃

    Row blocks ``f, i, h`` of ``weight_ih (3H, I)`` and ``bias_ih (3H,)``; no ``weight_hh``. The gate
    activations must make ``f + i > 0`` (any of sigmoid, hard_sigmoid, elliott, exp, softplus ...);
    ``g`` defaults to the identity (``"min_g"`` is the paper's log-space g). Call: ``h' = cell(x, h)``.
    """

    name = "min_lstm"
    blocks = ("f", "i", "h")
    gate_names = ("f", "i")
    slots = (
        Slot("sigma_f", "gate_activation", "sigmoid", gate="f"),
        Slot("sigma_i", "gate_activation", "sigmoid", gate="i"),
        Slot("phi", "candidate_activation", "identity"),
    )

    def step(self, x: Tensor, state: tuple[Tensor, ...], rec_mask: Tensor | None = None,
             weight_hh: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        (h,) = state
        pre_f, pre_i, pre_h = F.linear(x, self.weight_ih, self.bias_ih).chunk(3, -1)
        f, i = self.sigma_f(pre_f), self.sigma_i(pre_i)
        h_tilde = self.phi(pre_h)
        f_n, i_n = f / (f + i), i / (f + i)
        h = f_n * h + i_n * h_tilde
        return h, (h,)

    def coefficients(self, xw: Tensor) -> tuple[Tensor, Tensor]:
        pre_f, pre_i, pre_h = xw.chunk(3, -1)
        f, i = self.sigma_f(pre_f), self.sigma_i(pre_i)
        total = f + i
        return f / total, i / total * self.phi(pre_h)
