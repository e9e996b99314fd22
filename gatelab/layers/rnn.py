"""The public drop-in layers: RNN, LSTM, GRU (torch.nn's signatures) and GatedStateRNN."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..activations import ActivationSpec
from ..cells import ElmanCell, GatedStateCell, GRUCell, LSTMCell
from ..cells.base import GateActivationSpec
from ..engines import native
from .base import RecurrentLayer

_LAYER_OPTIONS_DOC = """
    Beyond torch (keyword-only): ``residual`` (add each layer's input to its output; layer 0 uses a
    learned projection ``weight_res_l0`` when sizes differ, unless ``residual_projection=False``),
    ``input_dropout`` and ``recurrent_dropout`` (variational: one mask per sequence and layer, reused
    at every step, off in eval), ``weight_dropout`` (DropConnect on ``W_hh``, resampled each forward),
    ``zoneout`` (one rate, or one per state; eval uses the expectation), ``init`` (``"torch"``,
    ``"orthogonal"``, ``"identity"``, ``"chrono"`` with ``chrono_max_length``), ``forget_bias``,
    ``backend`` (``"auto"``, ``"native"``, ``"reference"``), ``strict`` (raise instead of falling
    back) and the cell's activation slots and options. ``explain()`` says which engine runs and why.
"""


class _TorchCompatible(RecurrentLayer):
    """Shared ``from_torch`` / ``to_torch`` for the layers torch also has."""

    torch_class: type[nn.RNNBase]

    @classmethod
    def from_torch(cls, module: nn.RNNBase, **options: Any) -> _TorchCompatible:
        """A gatelab layer with ``module``'s configuration and weights (plus any extra ``options``)."""
        if not isinstance(module, cls.torch_class):
            raise TypeError(f"{cls.__name__}.from_torch expects a torch.nn.{cls.torch_class.__name__}, "
                            f"got {type(module).__name__}")
        p = next(module.parameters())
        kwargs = dict(
            num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
            dropout=module.dropout, bidirectional=module.bidirectional, device=p.device, dtype=p.dtype,
        )
        kwargs.update(cls._torch_kwargs(module))
        kwargs.update(options)
        layer = cls(module.input_size, module.hidden_size, **kwargs)
        layer.load_state_dict(module.state_dict(), strict=False)
        return layer

    @classmethod
    def _torch_kwargs(cls, module: nn.RNNBase) -> dict[str, Any]:
        return {}

    def to_torch(self) -> nn.RNNBase:
        """The equivalent ``torch.nn`` module with these weights; raises if torch cannot express it."""
        differences = native.cell_differences(self.cells[0]) + self.extra_options()
        if differences:
            raise ValueError(f"{type(self).__name__}.to_torch: torch.nn cannot express " + "; ".join(differences))
        p = self.cells[0].weight_ih
        module = self.torch_class(
            self.input_size, self.hidden_size, num_layers=self.num_layers, bias=self.bias,
            batch_first=self.batch_first, dropout=self.dropout, bidirectional=self.bidirectional,
            device=p.device, dtype=p.dtype, **self._to_torch_kwargs(),
        )
        module.load_state_dict(self.state_dict())
        return module

    def _to_torch_kwargs(self) -> dict[str, Any]:
        return {}


class RNN(_TorchCompatible):
    __doc__ = """Elman RNN over a sequence, a drop-in ``torch.nn.RNN`` whose activation is any registered one.

    ``nonlinearity`` (torch's name) or ``activation`` picks φ in ``h' = φ(W_ih x + b_ih + W_hh h + b_hh)``;
    ``"tanh"`` and ``"relu"`` run on torch's kernel.
    """ + _LAYER_OPTIONS_DOC
    cell_class = ElmanCell
    torch_class = nn.RNN

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: ActivationSpec = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        activation: ActivationSpec | None = None,
        **options: Any,
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype, activation=activation or nonlinearity, **options)

    @property
    def nonlinearity(self) -> str:
        return self.cells[0].phi.key if hasattr(self.cells[0].phi, "key") else type(self.cells[0].phi).__name__

    @classmethod
    def _torch_kwargs(cls, module: nn.RNNBase) -> dict[str, Any]:
        return {"nonlinearity": module.nonlinearity}

    def _to_torch_kwargs(self) -> dict[str, Any]:
        return {"nonlinearity": self.nonlinearity}


class LSTM(_TorchCompatible):
    __doc__ = """LSTM over a sequence, a drop-in ``torch.nn.LSTM`` with every activation pluggable.

    Takes torch's arguments (``proj_size`` included) and every :class:`~gatelab.LSTMCell` option:
    ``gate_activation`` (one or per gate), ``candidate_activation``, ``cell_activation``,
    ``peephole``, ``peephole_output``, ``coupled``, ``gates``, ``layer_norm``, ``variant``.
    Returns ``(output, (h_n, c_n))``; with ``variant="FGR"`` the state is ``(h_n, c_n, gates_n)``.
    """ + _LAYER_OPTIONS_DOC
    cell_class = LSTMCell
    torch_class = nn.LSTM

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        gate_activation: GateActivationSpec | None = None,
        candidate_activation: ActivationSpec | None = None,
        cell_activation: ActivationSpec | None = None,
        **options: Any,
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype, proj_size=proj_size, gate_activation=gate_activation,
                         candidate_activation=candidate_activation, cell_activation=cell_activation, **options)
        self.proj_size = proj_size

    def _pack_state(self, hn):
        return hn

    @classmethod
    def _torch_kwargs(cls, module: nn.RNNBase) -> dict[str, Any]:
        return {"proj_size": module.proj_size}

    def _to_torch_kwargs(self) -> dict[str, Any]:
        return {"proj_size": self.proj_size}


class GRU(_TorchCompatible):
    __doc__ = """GRU over a sequence, a drop-in ``torch.nn.GRU`` with pluggable gate and candidate activations.

    Takes torch's arguments and the :class:`~gatelab.GRUCell` options ``gate_activation`` (one or
    ``{"r": ..., "z": ...}``), ``candidate_activation`` and ``reset_after``.
    """ + _LAYER_OPTIONS_DOC
    cell_class = GRUCell
    torch_class = nn.GRU

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
        candidate_activation: ActivationSpec = "tanh",
        **options: Any,
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype, gate_activation=gate_activation,
                         candidate_activation=candidate_activation, **options)


class GatedStateRNN(RecurrentLayer):
    __doc__ = """The gated-state recurrence of :class:`~gatelab.GatedStateCell` over a sequence.

    torch's layer arguments; returns ``(output, s_n)`` where ``output`` holds ``y_t = o_t ⊙ s_t``.
    """ + _LAYER_OPTIONS_DOC
    cell_class = GatedStateCell

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
        candidate_activation: ActivationSpec = "tanh",
        **options: Any,
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype, gate_activation=gate_activation,
                         candidate_activation=candidate_activation, **options)
