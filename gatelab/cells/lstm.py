"""Long short-term memory cell with pluggable activations, peepholes, CIFG, gate removal and LayerNorm."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import ActivationSpec
from .base import GateActivationSpec, RecurrentCell, Slot, _check_size, check_flag, unbatch

# Greff et al. 2017, "LSTM: A Search Space Odyssey": every variant is the vanilla LSTM (with
# peepholes) with one change.
VARIANTS: dict[str, dict[str, Any]] = {
    "vanilla": {"peephole": True},
    "NIG": {"peephole": True, "gates": "fo"},
    "NFG": {"peephole": True, "gates": "io"},
    "NOG": {"peephole": True, "gates": "if"},
    "NIAF": {"peephole": True, "candidate_activation": "identity"},
    "NOAF": {"peephole": True, "cell_activation": "identity"},
    "NP": {"peephole": False},
    "CIFG": {"peephole": True, "coupled": True},
    "FGR": {"peephole": True, "full_gate_recurrence": True},
}

_DEFAULTS: dict[str, Any] = {
    "gate_activation": None,
    "candidate_activation": "tanh",
    "cell_activation": "tanh",
    "peephole": False,
    "coupled": False,
    "gates": "ifo",
    "full_gate_recurrence": False,
}


class LSTMCell(RecurrentCell):
    r"""One LSTM step with every activation pluggable:

    .. code-block:: text

        i  = σ_i(W_ii x + b_ii + W_hi h + b_hi  [+ p_i ⊙ c])
        f  = σ_f(W_if x + b_if + W_hf h + b_hf  [+ p_f ⊙ c])
        g  = φ(W_ig x + b_ig + W_hg h + b_hg)
        c' = f ⊙ c + i ⊙ g
        o  = σ_o(W_io x + b_io + W_ho h + b_ho  [+ p_o ⊙ c'])
        h' = o ⊙ ψ(c')                          [h' = W_hr h' when proj_size > 0]

    Weights, gate order ``i, f, g, o`` and call signature are ``torch.nn.LSTMCell``'s; with the
    default activations it equals it. Options:

    * ``gate_activation``: one activation or a mapping ``{"i": ..., "f": ..., "o": ...}``;
      ``candidate_activation`` is φ, ``cell_activation`` is ψ.
    * ``peephole=True``: diagonal weights ``weight_ci, weight_cf, weight_co`` (each ``(H,)``). The
      output gate reads ``c'`` (Gers 2002, ONNX); ``peephole_output="previous"`` makes it read ``c``.
    * ``coupled=True`` (CIFG): ``i = 1 − f``; the input gate has no weights.
    * ``gates``: the subset of ``"ifo"`` kept; a removed gate is the constant 1 and has no weights.
    * ``layer_norm=True``: LayerNorm (gain only) on ``W_ih x`` and on ``W_hh h`` before the biases,
      and LayerNorm (gain and bias) on ``c'`` before ψ (Ba et al. 2016).
    * ``full_gate_recurrence=True`` (Greff's FGR): each of i, f, o also reads the previous step's
      i, f, o through ``weight_gr (3H, 3H)``; the state is then ``(h, c, gates)``.
    * ``proj_size > 0``: ``h' = W_hr h'`` with ``weight_hr (P, H)``; ``h`` has size ``P``.
    * ``variant``: one of Greff et al. 2017's names (``vanilla NIG NFG NOG NIAF NOAF NP CIFG FGR``),
      which sets the options above; an explicit option that contradicts it is an error.

    Call: ``(h', c') = cell(x, (h, c))``; the state may be omitted (zeros), the input unbatched.
    """

    name = "lstm"
    gate_names = ("i", "f", "o")
    slots = (  # the C++ kernels' order: the row blocks i, f, g, o, then ψ
        Slot("sigma_i", "gate_activation", "sigmoid", gate="i", torch=("sigmoid",)),
        Slot("sigma_f", "gate_activation", "sigmoid", gate="f", torch=("sigmoid",)),
        Slot("phi", "candidate_activation", "tanh", torch=("tanh",)),
        Slot("sigma_o", "gate_activation", "sigmoid", gate="o", torch=("sigmoid",)),
        Slot("psi", "cell_activation", "tanh", torch=("tanh",)),
    )
    zoneout_states = ("h", "c")  # never FGR's previous gates
    memory_state = "c"
    torch_cell = nn.LSTMCell
    torch_mode = "LSTM"
    layer_norm_eps = 1e-5

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        *,
        gate_activation: GateActivationSpec | None = None,
        candidate_activation: ActivationSpec | None = None,
        cell_activation: ActivationSpec | None = None,
        peephole: bool | None = None,
        peephole_output: str = "current",
        coupled: bool | None = None,
        gates: str | None = None,
        layer_norm: bool = False,
        full_gate_recurrence: bool | None = None,
        proj_size: int = 0,
        variant: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        for name, flag in (("peephole", peephole), ("coupled", coupled), ("full_gate_recurrence", full_gate_recurrence)):
            check_flag(name, flag, optional=True)
        check_flag("layer_norm", layer_norm)
        given = {
            "gate_activation": gate_activation, "candidate_activation": candidate_activation,
            "cell_activation": cell_activation, "peephole": peephole, "coupled": coupled,
            "gates": gates, "full_gate_recurrence": full_gate_recurrence,
        }
        opts = _resolve_options(given, variant)
        gates = opts["gates"]
        if not isinstance(gates, str) or set(gates) - set("ifo") or len(set(gates)) != len(gates):
            raise ValueError(f"gates must be a subset of 'ifo', got {gates!r}")
        if opts["coupled"] and not {"i", "f"} <= set(gates):
            raise ValueError(f"coupled=True (CIFG) needs the input and forget gates, got gates={gates!r}")
        if peephole_output not in ("current", "previous"):
            raise ValueError(f"peephole_output must be 'current' or 'previous', got {peephole_output!r}")
        _check_size("hidden_size", hidden_size)
        if proj_size != 0:
            _check_size("proj_size", proj_size)
            if proj_size >= hidden_size:
                raise ValueError(f"proj_size must be smaller than hidden_size ({hidden_size}), got {proj_size}")

        self.gates = "".join(g for g in "ifo" if g in gates)
        self.coupled = bool(opts["coupled"])
        # Row blocks in torch's order i, f, g, o, without the gates that have no weights.
        weighted = {g for g in self.gates if not (g == "i" and self.coupled)}
        self.blocks = tuple(b for b in ("i", "f", "g", "o") if b == "g" or b in weighted)
        super().__init__(
            input_size, hidden_size, bias, recurrent_size=proj_size or hidden_size, device=device, dtype=dtype
        )
        factory = {"device": device, "dtype": dtype}
        self.proj_size = proj_size
        self.variant = variant
        self.peephole = bool(opts["peephole"])
        self.peephole_output = peephole_output
        self.layer_norm = bool(layer_norm)
        self.full_gate_recurrence = bool(opts["full_gate_recurrence"])

        self._gate_slots(opts["gate_activation"], tuple(g for g in self.gates if g in weighted))
        self._slot("phi", opts["candidate_activation"], "candidate_activation")
        self._slot("psi", opts["cell_activation"], "cell_activation")

        H = hidden_size
        for g in "ifo":
            p = nn.Parameter(torch.empty(H, **factory)) if self.peephole and g in weighted else None
            self.register_parameter(f"weight_c{g}", p)
        gr = nn.Parameter(torch.empty(3 * H, 3 * H, **factory)) if self.full_gate_recurrence else None
        self.register_parameter("weight_gr", gr)
        hr = nn.Parameter(torch.empty(proj_size, H, **factory)) if proj_size else None
        self.register_parameter("weight_hr", hr)
        if self.layer_norm:
            G = len(self.blocks)
            self.ln_ih_weight = nn.Parameter(torch.ones(G * H, **factory))
            self.ln_hh_weight = nn.Parameter(torch.ones(G * H, **factory))
            self.ln_c_weight = nn.Parameter(torch.ones(H, **factory))
            self.ln_c_bias = nn.Parameter(torch.zeros(H, **factory))
        self.reset_parameters()

    @property
    def keep_gate(self) -> str | None:
        return "f" if "f" in self.blocks else None

    def torch_differences(self) -> list[str]:
        out = [] if self.gates == "ifo" else [f"gates={self.gates!r} (torch has all of i, f, o)"]
        out += [f"{opt}=True" for opt in ("coupled", "peephole", "layer_norm", "full_gate_recurrence") if getattr(self, opt)]
        return out + super().torch_differences()

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c", "gates") if self.full_gate_recurrence else ("h", "c")

    def state_sizes(self) -> tuple[int, ...]:
        sizes = (self.recurrent_size, self.hidden_size)
        return sizes + (3 * self.hidden_size,) if self.full_gate_recurrence else sizes

    def forward(self, input: Tensor, state: tuple[Tensor, ...] | None = None) -> tuple[Tensor, ...]:
        x, batched = self._check_input(input)
        B = x.shape[0]
        if state is None:
            state = (None,) * len(self.state_names)
        if not isinstance(state, (tuple, list)) or len(state) != len(self.state_names):
            raise ValueError(
                f"LSTMCell: expected the state as a tuple ({', '.join(self.state_names)}), got "
                f"{type(state).__name__}{'' if not isinstance(state, (tuple, list)) else f' of {len(state)}'}"
            )
        h, c, *prev = (
            self._check_state(n, s, B, size, batched, x)
            for n, s, size in zip(self.state_names, state, self.state_sizes())
        )
        h, state = self.step(x, (h, c, *prev))
        return tuple(unbatch(t, batched) for t in state)

    def step(
        self, x: Tensor, state: tuple[Tensor, ...], rec_mask: Tensor | None = None, weight_hh: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One step on batched, validated tensors; the engines call this. Returns ``(h', state')``."""
        h, c, *prev = state
        h_rec = h if rec_mask is None else h * rec_mask
        pre = dict(zip(self.blocks, self.preactivations(x, h_rec, weight_hh).chunk(len(self.blocks), 1)))
        if self.full_gate_recurrence:
            rec = dict(zip("ifo", F.linear(prev[0], self.weight_gr).chunk(3, 1)))
            pre = {b: v + rec[b] if b in rec else v for b, v in pre.items()}

        f = self.sigma_f(pre["f"] + self._peep("f", c)) if "f" in self.gates else 1.0
        if self.coupled:
            i = 1 - f
        else:
            i = self.sigma_i(pre["i"] + self._peep("i", c)) if "i" in self.gates else 1.0
        g = self.phi(pre["g"])
        c_new = f * c + i * g
        c_out = c if self.peephole_output == "previous" else c_new
        o = self.sigma_o(pre["o"] + self._peep("o", c_out)) if "o" in self.gates else 1.0
        h_new = o * self.psi(self._ln_c(c_new))
        if self.proj_size:
            h_new = F.linear(h_new, self.weight_hr)

        if not self.full_gate_recurrence:
            return h_new, (h_new, c_new)
        ones = torch.ones_like(c_new)
        gates = torch.cat([v if isinstance(v, Tensor) else ones for v in (i, f, o)], 1)
        return h_new, (h_new, c_new, gates)

    def preactivations(self, x: Tensor, h: Tensor, weight_hh: Tensor | None = None) -> Tensor:
        """``W_ih x + b_ih + W_hh h + b_hh`` (B, G·H), with LayerNorm on each product if enabled."""
        W_hh = self.weight_hh if weight_hh is None else weight_hh
        if not self.layer_norm:
            return F.linear(x, self.weight_ih, self.bias_ih) + F.linear(h, W_hh, self.bias_hh)
        gi = self._ln(F.linear(x, self.weight_ih), self.ln_ih_weight)
        gh = self._ln(F.linear(h, W_hh), self.ln_hh_weight)
        pre = gi + gh
        return pre + self.bias_ih + self.bias_hh if self.bias else pre

    def _peep(self, gate: str, c: Tensor) -> Tensor | float:
        p = getattr(self, f"weight_c{gate}")
        return 0.0 if p is None else p * c

    def _ln(self, t: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.layer_norm(t, weight.shape, weight, bias, self.layer_norm_eps)

    def _ln_c(self, c: Tensor) -> Tensor:
        return self._ln(c, self.ln_c_weight, self.ln_c_bias) if self.layer_norm else c

    def extra_repr(self) -> str:
        s = super().extra_repr()
        for name, default in (("variant", None), ("proj_size", 0), ("layer_norm", False)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)!r}"
        if self.variant is None:
            for name in ("peephole", "coupled", "full_gate_recurrence"):
                if getattr(self, name):
                    s += f", {name}=True"
            if self.gates != "ifo":
                s += f", gates={self.gates!r}"
        return s


def _resolve_options(given: dict[str, Any], variant: str | None) -> dict[str, Any]:
    """Merge the explicit options with a Greff variant's; a contradiction is an error."""
    opts = {k: (v if v is not None else _DEFAULTS[k]) for k, v in given.items()}
    if variant is None:
        return opts
    if variant not in VARIANTS:
        raise ValueError(f"unknown LSTM variant {variant!r}; valid: {', '.join(VARIANTS)}")
    for key, value in VARIANTS[variant].items():
        same = set(given[key]) == set(value) if key == "gates" and isinstance(given[key], str) else given[key] == value
        if given[key] is not None and not same:
            raise ValueError(f"variant={variant!r} sets {key}={value!r}, but {key}={given[key]!r} was passed")
        opts[key] = value
    return opts
