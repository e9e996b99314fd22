"""The public drop-in layers: RNN, LSTM, GRU (torch.nn's signatures) and GatedStateRNN."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..activations import ActivationSpec
from ..cells import ElmanCell, GatedStateCell, GRUCell, LSTMCell, registry
from ..cells.base import GateActivationSpec
from .base import LAYER_OPTIONS, RecurrentLayer, options_doc

_TORCH_ARGS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
_FACTORY = ("device", "dtype")


class _TorchCompatible(RecurrentLayer):
    """Shared ``from_torch`` / ``to_torch`` for the layers torch also has."""

    torch_class: type[nn.RNNBase]

    @classmethod
    def from_torch(cls, module: nn.RNNBase, **options: Any) -> _TorchCompatible:
        """A gatelab layer with ``module``'s configuration and weights (plus any extra ``options``,
        keyword arguments of this class)."""
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
        differences = self.cells[0].torch_differences() + self.extra_options()
        if differences:
            raise ValueError(f"{self.kind_name}.to_torch: torch.nn cannot express " + "; ".join(differences))
        p = next(self.parameters())
        module = self.torch_class(
            self.input_size, self.hidden_size, num_layers=self.num_layers, bias=self.bias,
            batch_first=self.batch_first, dropout=self.dropout, bidirectional=self.bidirectional,
            device=p.device, dtype=p.dtype, **self._to_torch_kwargs(),
        )
        module.load_state_dict({k: v.detach() for k, v in zip(self._flat_weights_names, self._flat_weights)})
        return module

    def _to_torch_kwargs(self) -> dict[str, Any]:
        return {}


class RNN(_TorchCompatible):
    __doc__ = """Elman RNN over a sequence, a drop-in ``torch.nn.RNN`` whose activation is any registered one.

    ``h' = φ(W_ih x + b_ih + W_hh h + b_hh)``; ``nonlinearity`` (torch's name) or ``activation`` picks
    φ (both given and different is an error; ``activation`` overrides the default ``"tanh"``), and
    ``"tanh"`` and ``"relu"`` run on torch's kernel. Returns ``(output, h_n)``.
    """ + options_doc(*_TORCH_ARGS[:3], "nonlinearity", *_TORCH_ARGS[3:], *_FACTORY, "activation", *LAYER_OPTIONS)
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
        residual: bool = False,
        residual_projection: bool = True,
        input_dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        weight_dropout: float = 0.0,
        zoneout: float | tuple[float, ...] = 0.0,
        init: str = "torch",
        forget_bias: float | None = None,
        chrono_max_length: int | None = None,
        backend: str = "auto",
        strict: bool = False,
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            # the default nonlinearity gives way to an explicit activation; two explicit ones must agree
            cell_options={"activation": activation,
                          "nonlinearity": None if activation is not None and nonlinearity == "tanh" else nonlinearity},
            residual=residual, residual_projection=residual_projection, input_dropout=input_dropout,
            recurrent_dropout=recurrent_dropout, weight_dropout=weight_dropout, zoneout=zoneout, init=init,
            forget_bias=forget_bias, chrono_max_length=chrono_max_length, backend=backend, strict=strict,
            device=device, dtype=dtype,
        )

    @property
    def nonlinearity(self) -> str:
        phi = self._cells[0].phi
        return phi.key if hasattr(phi, "key") else type(phi).__name__

    @classmethod
    def _torch_kwargs(cls, module: nn.RNNBase) -> dict[str, Any]:
        return {"nonlinearity": module.nonlinearity}

    def _to_torch_kwargs(self) -> dict[str, Any]:
        return {"nonlinearity": self.nonlinearity}


class LSTM(_TorchCompatible):
    __doc__ = """LSTM over a sequence, a drop-in ``torch.nn.LSTM`` with every activation pluggable.

    The maths is :class:`~gatelab.LSTMCell`'s. Returns ``(output, (h_n, c_n))``; with
    ``variant="FGR"`` the state is ``(h_n, c_n, gates_n)``.
    """ + options_doc(*_TORCH_ARGS, "proj_size", *_FACTORY, "gate_activation", "candidate_activation",
                      "cell_activation", "peephole", "peephole_output", "coupled", "gates", "layer_norm",
                      "full_gate_recurrence", "variant", *LAYER_OPTIONS)
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
        peephole: bool | None = None,
        peephole_output: str = "current",
        coupled: bool | None = None,
        gates: str | None = None,
        layer_norm: bool = False,
        full_gate_recurrence: bool | None = None,
        variant: str | None = None,
        residual: bool = False,
        residual_projection: bool = True,
        input_dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        weight_dropout: float = 0.0,
        zoneout: float | tuple[float, ...] = 0.0,
        init: str = "torch",
        forget_bias: float | None = None,
        chrono_max_length: int | None = None,
        backend: str = "auto",
        strict: bool = False,
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            cell_options={
                "proj_size": proj_size, "gate_activation": gate_activation,
                "candidate_activation": candidate_activation, "cell_activation": cell_activation,
                "peephole": peephole, "peephole_output": peephole_output, "coupled": coupled, "gates": gates,
                "layer_norm": layer_norm, "full_gate_recurrence": full_gate_recurrence, "variant": variant,
            },
            residual=residual, residual_projection=residual_projection, input_dropout=input_dropout,
            recurrent_dropout=recurrent_dropout, weight_dropout=weight_dropout, zoneout=zoneout, init=init,
            forget_bias=forget_bias, chrono_max_length=chrono_max_length, backend=backend, strict=strict,
            device=device, dtype=dtype,
        )
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

    The maths is :class:`~gatelab.GRUCell`'s (gates ``r, z``, candidate ``n``). Returns ``(output, h_n)``.
    """ + options_doc(*_TORCH_ARGS, *_FACTORY, "gate_activation", "candidate_activation", "reset_after",
                      *LAYER_OPTIONS)
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
        reset_after: bool = True,
        residual: bool = False,
        residual_projection: bool = True,
        input_dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        weight_dropout: float = 0.0,
        zoneout: float | tuple[float, ...] = 0.0,
        init: str = "torch",
        forget_bias: float | None = None,
        chrono_max_length: int | None = None,
        backend: str = "auto",
        strict: bool = False,
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            cell_options={"gate_activation": gate_activation, "candidate_activation": candidate_activation,
                          "reset_after": reset_after},
            residual=residual, residual_projection=residual_projection, input_dropout=input_dropout,
            recurrent_dropout=recurrent_dropout, weight_dropout=weight_dropout, zoneout=zoneout, init=init,
            forget_bias=forget_bias, chrono_max_length=chrono_max_length, backend=backend, strict=strict,
            device=device, dtype=dtype,
        )


class GatedStateRNN(RecurrentLayer):
    __doc__ = """The gated-state recurrence of :class:`~gatelab.GatedStateCell` over a sequence.

    ``s' = f ⊙ s + i ⊙ s̃``, ``y = o ⊙ s'``; returns ``(output, s_n)`` where ``output`` holds ``y_t``.
    """ + options_doc(*_TORCH_ARGS, *_FACTORY, "gate_activation", "candidate_activation", *LAYER_OPTIONS)
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
        residual: bool = False,
        residual_projection: bool = True,
        input_dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        weight_dropout: float = 0.0,
        zoneout: float | tuple[float, ...] = 0.0,
        init: str = "torch",
        forget_bias: float | None = None,
        chrono_max_length: int | None = None,
        backend: str = "auto",
        strict: bool = False,
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            cell_options={"gate_activation": gate_activation, "candidate_activation": candidate_activation},
            residual=residual, residual_projection=residual_projection, input_dropout=input_dropout,
            recurrent_dropout=recurrent_dropout, weight_dropout=weight_dropout, zoneout=zoneout, init=init,
            forget_bias=forget_bias, chrono_max_length=chrono_max_length, backend=backend, strict=strict,
            device=device, dtype=dtype,
        )


for _layer in (LSTM, GRU, RNN, GatedStateRNN):
    registry.register(_layer.cell_class, _layer)
