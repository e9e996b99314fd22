"""Layers of the post-2018 gated cells: MinGRU, MinLSTM (Feng et al. 2024), IndRNN (Li et al. 2018),
SLSTM (Beck et al. 2024). They run on the reference loop or on :mod:`gatelab.engines.scan`
(``backend="fused"``: one input GEMM, then a scan or an elementwise pass); torch has none of them."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .. import activations
from ..activations import ActivationSpec
from ..cells import registry
from ..cells.base import GateActivationSpec, _check_size, check_flag
from ..cells.indrnn import IndRNNCell
from ..cells.min_rnn import MinGRUCell, MinLSTMCell
from ..cells.slstm import SLSTMCell
from ..engines import scan
from . import rnn  # noqa: F401  (the built-in kinds register first: registry order is theirs, then these)
from .base import OPTION_DOCS, RecurrentLayer, zero_padded

_DOCS = {
    **OPTION_DOCS,
    "candidate_activation": "g (minGRU/minLSTM, default identity; ``\"min_g\"`` is the paper's) or φ (sLSTM, default tanh)",
    "scan": "``\"auto\"`` (parallel on an accelerator, sequential on the CPU), ``\"sequential\"`` or ``\"parallel\"``",
    "activation": "φ, any registered activation (default ``\"relu\"``)",
    "recurrent_max": "the bound on ``|u|`` (default: from ``max_length``, else 1)",
    "max_length": "the memory length wanted: ``|u| ≤ 2^(1/max_length)`` (Li et al. 2018)",
    "num_heads": "heads of the block-diagonal recurrence ``R`` (``hidden_size`` must be a multiple)",
    "init": "``\"torch\"`` only (IndRNN: ``u`` ~ U(0, u_max)); sLSTM also ``\"chrono\"``",
    "forget_bias": "sLSTM only: the effective bias ``b_ih + b_hh`` of its ``f`` gate",
    "backend": "engine: ``\"auto\"``, ``\"fused\"`` (:mod:`gatelab.engines.scan`) or ``\"reference\"``",
    "norm": "a LayerNorm over each layer's input before its cells (pre-norm; with ``residual`` the sum adds the "
            "un-normed input): the paper's block",
    "mlp": "the hidden width of a position-wise MLP block after each layer, ``x + W₂ act(W₁ LN(x) + b₁) + b₂`` (LN "
           "with ``norm``; default none)",
    "mlp_activation": "the MLP block's activation, a parameter-free registered one (default ``\"gelu\"``)",
}
_COMMON = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional", "device",
           "dtype")
_LAYER = ("residual", "residual_projection", "norm", "mlp", "mlp_activation", "input_dropout", "init", "backend",
          "strict")


def _doc(*names: str) -> str:
    width = max(map(len, names))
    return "\n    Args:\n" + "".join(f"        {n:<{width}}  {_DOCS[n]}\n" for n in names)


class _ScanLayer(RecurrentLayer):
    """Shared by the four layers: the engine choice over :data:`gatelab.engines.scan.ORDER`."""

    inits: tuple[str, ...] = ("torch",)
    has_forget_gate = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, bias: bool, batch_first: bool,
                 dropout: float, bidirectional: bool, *, cell_options: dict[str, Any], residual: bool,
                 residual_projection: bool, norm: bool, mlp: int | None, mlp_activation: ActivationSpec,
                 input_dropout: float, init: str, forget_bias: float | None,
                 chrono_max_length: int | None, backend: str, strict: bool,
                 device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        owner = type(self).__name__
        if init not in self.inits:
            raise ValueError(f"{owner}: init={init!r} is not supported; valid: {', '.join(self.inits)}")
        if forget_bias is not None and not self.has_forget_gate:
            raise ValueError(f"{owner}: forget_bias is not supported (no forget gate with a b_ih + b_hh bias pair)")
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, cell_options=cell_options,
            residual=residual, residual_projection=residual_projection, input_dropout=input_dropout, init=init,
            forget_bias=forget_bias, chrono_max_length=chrono_max_length, backend=backend, strict=strict,
            device=device, dtype=dtype,
        )
        self._init_blocks(owner, norm, mlp, mlp_activation, device, dtype)

    # -- the paper's blocks around the cells: pre-norm and a position-wise MLP, each layer its own ----------

    def _init_blocks(self, owner: str, norm: bool, mlp: int | None, mlp_activation: ActivationSpec,
                     device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        check_flag(f"{owner}: norm", norm)
        if norm and self.input_size == 1:
            raise ValueError(f"{owner}: norm=True normalises each layer's input over its features, and layer 0 has "
                             f"input_size=1: LayerNorm of one feature is constant, the input would be erased (project "
                             f"the input first, e.g. SequenceModel's input_projection)")
        if norm and self.input_size == 2:
            warnings.warn(f"{owner}: norm=True with input_size={self.input_size}: a LayerNorm over so few features "
                          f"keeps little of layer 0's input (project it first)", UserWarning, stacklevel=4)
        if mlp is not None:
            try:
                _check_size("mlp", mlp)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{owner}: {err}") from None
        act = activations.get(mlp_activation)
        if (not isinstance(act, activations.Activation) or act.kind not in activations.available()
                or isinstance(act.bind(1), nn.Module)):
            raise ValueError(f"{owner}: mlp_activation must be a parameter-free registered activation (a name such "
                             f"as 'gelu'), got {getattr(act, 'key', mlp_activation)!r}")
        self.norm, self.mlp, self.mlp_activation = bool(norm), mlp, act
        width = self.num_directions * self.output_size
        factory = {"device": device, "dtype": dtype}
        for k in range(self.num_layers):  # registered after the cells' parameters, whose order is torch's
            if self.norm:
                n_in = self.input_size if k == 0 else width
                self.register_parameter(f"norm_weight_l{k}", nn.Parameter(torch.ones(n_in, **factory)))
                self.register_parameter(f"norm_bias_l{k}", nn.Parameter(torch.zeros(n_in, **factory)))
            if mlp is None:
                continue
            if self.norm:
                self.register_parameter(f"mlp_norm_weight_l{k}", nn.Parameter(torch.ones(width, **factory)))
                self.register_parameter(f"mlp_norm_bias_l{k}", nn.Parameter(torch.zeros(width, **factory)))
            for name, (n_out, n_in) in (("in", (mlp, width)), ("out", (width, mlp))):
                weight = nn.Parameter(torch.empty(n_out, n_in, **factory))
                bias = nn.Parameter(torch.empty(n_out, **factory))
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's initialisation
                nn.init.uniform_(bias, -1 / math.sqrt(n_in), 1 / math.sqrt(n_in))
                self.register_parameter(f"mlp_weight_{name}_l{k}", weight)
                self.register_parameter(f"mlp_bias_{name}_l{k}", bias)

    def _block_in(self, layer: int, x: Tensor) -> Tensor:
        if not self.norm:
            return x
        return F.layer_norm(x, x.shape[-1:], getattr(self, f"norm_weight_l{layer}"), getattr(self, f"norm_bias_l{layer}"))

    def _block_out(self, layer: int, x: Tensor, lengths: Tensor | None) -> Tensor:
        if self.mlp is None:
            return x
        y = x if not self.norm else F.layer_norm(x, x.shape[-1:], getattr(self, f"mlp_norm_weight_l{layer}"),
                                                 getattr(self, f"mlp_norm_bias_l{layer}"))
        y = self.mlp_activation(F.linear(y, getattr(self, f"mlp_weight_in_l{layer}"),
                                         getattr(self, f"mlp_bias_in_l{layer}")))
        x = x + F.linear(y, getattr(self, f"mlp_weight_out_l{layer}"), getattr(self, f"mlp_bias_out_l{layer}"))
        return zero_padded(x, lengths)  # a padded step outputs zero, as the cells' own steps do

    def extra_options(self, runtime: bool = False) -> list[str]:
        out = super().extra_options(runtime)
        if not hasattr(self, "mlp_activation"):  # asked while the base class builds the layer: no blocks yet
            return out
        if self.norm:
            out.append("norm=True")
        if self.mlp is not None:
            out.append(f"mlp={self.mlp}" + (f", mlp_activation={self.mlp_activation.key}"
                                             if self.mlp_activation.key != "gelu" else ""))
        return out

    def _choose_engine(self):
        return scan.choose(self, self.backend, self.strict)


class _MinLayer(_ScanLayer):
    """MinGRU and MinLSTM: the same arguments (their cells differ)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        gate_activation: GateActivationSpec | None = None,
        candidate_activation: ActivationSpec = "identity",
        scan: str = "auto",
        residual: bool = False,
        residual_projection: bool = True,
        norm: bool = False,
        mlp: int | None = None,
        mlp_activation: ActivationSpec = "gelu",
        input_dropout: float = 0.0,
        init: str = "torch",
        forget_bias: float | None = None,
        backend: str = "auto",
        strict: bool = False,
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            cell_options={"gate_activation": gate_activation, "candidate_activation": candidate_activation,
                          "scan": scan},
            residual=residual, residual_projection=residual_projection, norm=norm, mlp=mlp,
            mlp_activation=mlp_activation, input_dropout=input_dropout, init=init,
            forget_bias=forget_bias, chrono_max_length=None, backend=backend, strict=strict, device=device,
            dtype=dtype,
        )
        self.scan = scan


class MinGRU(_MinLayer):
    __doc__ = """minGRU (Feng et al. 2024) over a sequence: ``h' = (1 − z) ⊙ h + z ⊙ g(W_h x + b_h)``,
    ``z = σ_z(W_z x + b_z)``; the maths is :class:`~gatelab.MinGRUCell`'s.

    Gates read ``x_t`` only: the fused engine runs one GEMM for all steps and a scan (``scan=``).
    Returns ``(output, h_n)``.
    """ + _doc(*_COMMON, "gate_activation", "candidate_activation", "scan", *_LAYER)
    cell_class = MinGRUCell


class MinLSTM(_MinLayer):
    __doc__ = """minLSTM (Feng et al. 2024) over a sequence: ``h' = f' ⊙ h + i' ⊙ g(W_h x + b_h)`` with
    ``f', i' = f/(f+i), i/(f+i)``; the maths is :class:`~gatelab.MinLSTMCell`'s.

    Gates read ``x_t`` only: the fused engine runs one GEMM for all steps and a scan (``scan=``).
    Returns ``(output, h_n)``.
    """ + _doc(*_COMMON, "gate_activation", "candidate_activation", "scan", *_LAYER)
    cell_class = MinLSTMCell


class IndRNN(_ScanLayer):
    __doc__ = """IndRNN (Li et al. 2018) over a sequence: ``h' = φ(W_ih x + b_ih + u ⊙ h)``, ``|u| ≤ u_max``;
    the maths is :class:`~gatelab.IndRNNCell`'s. ``residual=True`` gives the residual stack (each
    layer's input added to its output).

    The bound is a constraint: every training-mode call first projects each layer's ``u``
    (``weight_hh_l{k}``, shape ``(H,)``) onto ``[−u_max, u_max]`` (:meth:`constrain_`), so the
    recurrence never runs with an out-of-bound ``u`` whatever the optimiser did. Returns ``(output, h_n)``.
    """ + _doc(*_COMMON, "activation", "recurrent_max", "max_length", *_LAYER)
    cell_class = IndRNNCell

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        activation: ActivationSpec = "relu",
        recurrent_max: float | None = None,
        max_length: int | None = None,
        residual: bool = False,
        residual_projection: bool = True,
        norm: bool = False,
        mlp: int | None = None,
        mlp_activation: ActivationSpec = "gelu",
        input_dropout: float = 0.0,
        init: str = "torch",
        forget_bias: float | None = None,
        backend: str = "auto",
        strict: bool = False,
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            cell_options={"activation": activation, "recurrent_max": recurrent_max, "max_length": max_length},
            residual=residual, residual_projection=residual_projection, norm=norm, mlp=mlp,
            mlp_activation=mlp_activation, input_dropout=input_dropout, init=init,
            forget_bias=forget_bias, chrono_max_length=None, backend=backend, strict=strict, device=device,
            dtype=dtype,
        )
        self.recurrent_max = self._cells[0].recurrent_max

    @torch.no_grad()
    def constrain_(self) -> None:
        """Project every layer's ``u`` onto ``[−u_max, u_max]`` in place (a parametrised ``u`` is left to
        its parametrisation)."""
        for name, p in self._parameters.items():
            if name.startswith("weight_hh_l") and p is not None and bool((p.abs() > self.recurrent_max).any()):
                p.clamp_(-self.recurrent_max, self.recurrent_max)

    def forward(self, input: Tensor | PackedSequence, hx: Tensor | None = None, lengths: Tensor | None = None):
        if self.training:
            self.constrain_()
        return super().forward(input, hx, lengths)


class SLSTM(_ScanLayer):
    __doc__ = """sLSTM (Beck et al. 2024, xLSTM) over a sequence: exponential input gate, normaliser ``n``
    and stabiliser ``m``, block-diagonal recurrence over ``num_heads`` heads; the maths is
    :class:`~gatelab.SLSTMCell`'s. Returns ``(output, (h_n, c_n, n_n, m_n))``.
    """ + _doc(*_COMMON, "num_heads", "gate_activation", "candidate_activation", *_LAYER, "forget_bias",
               "chrono_max_length")
    cell_class = SLSTMCell
    inits = ("torch", "chrono")
    has_forget_gate = True

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_heads: int = 1,
        gate_activation: GateActivationSpec | None = None,
        candidate_activation: ActivationSpec = "tanh",
        residual: bool = False,
        residual_projection: bool = True,
        norm: bool = False,
        mlp: int | None = None,
        mlp_activation: ActivationSpec = "gelu",
        input_dropout: float = 0.0,
        init: str = "torch",
        forget_bias: float | None = None,
        chrono_max_length: int | None = None,
        backend: str = "auto",
        strict: bool = False,
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            cell_options={"num_heads": num_heads, "gate_activation": gate_activation,
                          "candidate_activation": candidate_activation},
            residual=residual, residual_projection=residual_projection, norm=norm, mlp=mlp,
            mlp_activation=mlp_activation, input_dropout=input_dropout, init=init,
            forget_bias=forget_bias, chrono_max_length=chrono_max_length, backend=backend, strict=strict,
            device=device, dtype=dtype,
        )
        self.num_heads = num_heads


for _layer in (MinGRU, MinLSTM, IndRNN, SLSTM):
    registry.register(_layer.cell_class, _layer)
