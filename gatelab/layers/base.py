"""The sequence layer all four public layers share: stacking, directions, masks, engine choice."""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .. import engines
from ..cells import RecurrentCell
from ..cells.base import _check_size
from ..init import SCHEMES, init_cell
from .sequence import SequenceBatch, to_sequence_batch

RunDirection = Callable[..., tuple[Tensor, tuple[Tensor, ...]]]
_TORCH_KEY = re.compile(r"^(?P<name>.+)_l(?P<layer>\d+)(?P<reverse>_reverse)?$")


class RecurrentLayer(nn.Module):
    """A stack of recurrent layers over time, with torch.nn's arguments, returns and state_dict keys.

    The stack holds one cell per layer and direction (``cells[layer * D + direction]``); engines run
    them over time (:mod:`gatelab.engines`). Parameters are exposed and saved under torch's names
    (``weight_ih_l0``, ``bias_hh_l1_reverse`` ...), so a ``torch.nn`` module's ``state_dict`` loads
    directly. Options beyond torch are documented on the public subclasses.
    """

    cell_class: type[RecurrentCell]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **cell_options: Any,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_size("input_size", input_size)
        _check_size("hidden_size", hidden_size)
        _check_size("num_layers", num_layers)
        for name, p in (("dropout", dropout), ("input_dropout", input_dropout),
                        ("recurrent_dropout", recurrent_dropout), ("weight_dropout", weight_dropout)):
            _check_rate(owner, name, p)
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"{owner}: dropout={dropout} acts between layers and num_layers=1: it has no effect",
                          UserWarning, stacklevel=2)
        if init not in SCHEMES:
            raise ValueError(f"{owner}: unknown init {init!r}; valid: {', '.join(SCHEMES)}")
        if backend not in engines.BACKENDS:
            raise ValueError(f"{owner}: unknown backend {backend!r}; valid: {', '.join(engines.BACKENDS)}")

        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.input_dropout = float(input_dropout)
        self.recurrent_dropout = float(recurrent_dropout)
        self.weight_dropout = float(weight_dropout)
        self.residual = bool(residual)
        self.init = init
        self.forget_bias = forget_bias
        self.backend = backend
        self.strict = bool(strict)
        D = self.num_directions

        accepted = set(inspect.signature(self.cell_class).parameters) - {"input_size", "hidden_size", "bias", "device", "dtype"}
        unknown = sorted(set(cell_options) - accepted)
        if unknown:
            raise TypeError(f"{owner} got unexpected option(s) {', '.join(unknown)}; its cell {self.cell_class.__name__} "
                            f"takes {', '.join(sorted(accepted))} (layer options are torch's plus residual, dropouts, "
                            f"zoneout, init, forget_bias, backend, strict)")
        self.cells = nn.ModuleList()
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else D * self._output_size_of(hidden_size, cell_options)
            for _ in range(D):
                self.cells.append(self.cell_class(layer_input, hidden_size, bias, **cell_options,
                                                  device=device, dtype=dtype))
        self.output_size = self.cells[0].output_size
        self.zoneout = _zoneout_rates(owner, zoneout, self.cells[0].state_names)
        for cell in self.cells:
            init_cell(cell, init, forget_bias=forget_bias, chrono_max_length=chrono_max_length)

        # Residual: layer l's input is added to its output. Layers >= 1 always match; layer 0 needs
        # input_size == D * output_size or a learned projection weight_res_l0 (D·O, I).
        self.weight_res_l0: nn.Parameter | None = None
        if self.residual and input_size != D * self.output_size:
            if not residual_projection:
                raise ValueError(
                    f"{owner}: residual=True adds each layer's input to its output; layer 0's input has "
                    f"{input_size} features and its output {D * self.output_size}. Pass "
                    f"residual_projection=True for a learned projection, or make the sizes match"
                )
            self.weight_res_l0 = nn.Parameter(torch.empty(D * self.output_size, input_size, device=device, dtype=dtype))
            nn.init.xavier_uniform_(self.weight_res_l0)

        self._register_state_dict_hook(_to_torch_keys)
        self._register_load_state_dict_pre_hook(_from_torch_keys, with_module=True)
        self.engine_name, self._why = self._choose_engine()

    # -- configuration ---------------------------------------------------------------------------

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @staticmethod
    def _output_size_of(hidden_size: int, cell_options: dict[str, Any]) -> int:
        return cell_options.get("proj_size", 0) or hidden_size

    @property
    def state_names(self) -> tuple[str, ...]:
        return self.cells[0].state_names

    def extra_options(self, runtime: bool = False) -> list[str]:
        """Options beyond torch.nn that are on. With ``runtime``, only those that act in the current
        train/eval mode (dropout masks do nothing in eval)."""
        out = []
        if self.residual:
            out.append("residual=True")
        if any(self.zoneout):
            out.append(f"zoneout={self.zoneout}")
        for name in ("input_dropout", "recurrent_dropout", "weight_dropout"):
            if getattr(self, name) > 0 and (self.training or not runtime):
                out.append(f"{name}={getattr(self, name)}")
        return out

    def _choose_engine(self) -> tuple[str, str]:
        """Pick the engine for the current configuration and mode; return it and the reason."""
        native_blockers = engines.native.unsupported(self)
        if self.backend == "auto":
            if not native_blockers:
                return "native", "backend='auto': activations and options are exactly torch's, so torch's kernel runs"
            why = "backend='auto'; torch's kernel does not apply: " + "; ".join(native_blockers)
            fused_blockers = engines.fused.unsupported(self)
            if not fused_blockers:
                return "fused", why + ". Runs the " + engines.fused.describe(self)
            return "reference", why + "; the fused engine does not apply either: " + "; ".join(fused_blockers)
        blockers = engines.ENGINES[self.backend].unsupported(self)
        if not blockers:
            why = f"backend={self.backend!r} was asked for"
            return self.backend, why + (". Runs the " + engines.fused.describe(self) if self.backend == "fused" else "")
        message = f"backend={self.backend!r} cannot run this layer: " + "; ".join(blockers)
        if self.strict:
            raise ValueError(f"{type(self).__name__}: {message} (strict=True)")
        warnings.warn(f"{type(self).__name__}: {message}; falling back to 'reference'", UserWarning, stacklevel=3)
        return "reference", message + "; fell back to 'reference'"

    def explain(self) -> str:
        """Which engine runs this layer in its current mode, and why."""
        engine, why = self._choose_engine_quiet()
        return f"{type(self).__name__}: engine {engine!r} ({'training' if self.training else 'eval'} mode). {why}"

    def _choose_engine_quiet(self) -> tuple[str, str]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self._choose_engine()

    def train(self, mode: bool = True) -> RecurrentLayer:
        super().train(mode)
        self.engine_name, self._why = self._choose_engine_quiet()
        return self

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self, input: Tensor | PackedSequence, hx: Tensor | tuple[Tensor, ...] | None = None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor | PackedSequence, Tensor | tuple[Tensor, ...]]:
        """Run the stack. ``input`` is ``(T, B, I)`` (``(B, T, I)`` with ``batch_first``), unbatched
        ``(T, I)`` or a ``PackedSequence``; ``lengths`` (B,) may be given with padded input instead of
        packing. Returns ``(output, h_n)`` as torch does (``(output, (h_n, c_n))`` for an LSTM)."""
        owner = type(self).__name__
        ref = self.cells[0].weight_ih
        batch = to_sequence_batch(input, self.input_size, self.batch_first, lengths, owner)
        if batch.data.dtype != ref.dtype or batch.data.device != ref.device:
            raise ValueError(f"{owner}: input is {batch.data.dtype} on {batch.data.device}, parameters are "
                             f"{ref.dtype} on {ref.device}")
        hx = self._check_hx(hx, batch)
        out, hn = engines.ENGINES[self.engine_name].forward(self, batch, hx)
        if not batch.batched:
            hn = tuple(h.squeeze(1) for h in hn)
        return batch.restore(out), self._pack_state(hn)

    def _pack_state(self, hn: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
        return hn[0] if len(hn) == 1 else hn

    def _check_hx(self, hx: Tensor | tuple[Tensor, ...] | None, batch: SequenceBatch) -> tuple[Tensor, ...]:
        """Validate the initial state; return it as a tuple of ``(L·D, B, size)`` tensors."""
        owner = type(self).__name__
        LD, B, x = self.num_layers * self.num_directions, batch.batch_size, batch.data
        sizes = self.cells[0].state_sizes()
        names = self.state_names
        if hx is None:
            return tuple(x.new_zeros(LD, B, s) for s in sizes)
        given = (hx,) if isinstance(hx, Tensor) else tuple(hx) if isinstance(hx, (tuple, list)) else None
        if given is None or len(given) != len(names):
            want = names[0] if len(names) == 1 else f"a tuple ({', '.join(names)})"
            raise ValueError(f"{owner}: expected the initial state as {want}, got {type(hx).__name__}"
                             + (f" of {len(hx)}" if isinstance(hx, (tuple, list)) else ""))
        out = []
        for name, h, size in zip(names, given, sizes):
            expected = (LD, B, size) if batch.batched else (LD, size)
            if not isinstance(h, Tensor) or tuple(h.shape) != expected:
                got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
                raise ValueError(f"{owner}: expected {name}0 of shape {expected} (layers·directions, batch, "
                                 f"{size}), got {got}")
            if h.dtype != x.dtype or h.device != x.device:
                raise ValueError(f"{owner}: {name}0 is {h.dtype} on {h.device}, input is {x.dtype} on {x.device}")
            out.append(h if batch.batched else h.unsqueeze(1))
        return tuple(out)

    def run_stack(
        self, batch: SequenceBatch, hx: tuple[Tensor, ...], run_direction: RunDirection
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Run every layer and direction with ``run_direction`` (an engine's one-direction loop).

        Between layers: dropout (torch's), then the residual sum. Per layer and direction, sampled
        once per call in training: the variational input mask (B, I), the recurrent mask (B, R), the
        DropConnect mask on ``W_hh`` and the zoneout masks (T, B, S), so every engine sees the same
        random draws.
        """
        x, lengths, D = batch.data, batch.lengths, self.num_directions
        finals: list[tuple[Tensor, ...]] = []
        for layer in range(self.num_layers):
            layer_in = x
            if self.training and self.input_dropout > 0:
                x = x * _mask(x[0], self.input_dropout).unsqueeze(0)  # one mask per sequence, every step
            outs = []
            for d in range(D):
                k = layer * D + d
                cell = self.cells[k]
                state = tuple(h[k] for h in hx)
                rec_mask = _mask(state[0], self.recurrent_dropout) if self.training and self.recurrent_dropout else None
                w_hh = F.dropout(cell.weight_hh, self.weight_dropout, True) if self.training and self.weight_dropout else None
                zoneout = _zoneout_masks(x.shape[0], state, self.zoneout, self.training) if any(self.zoneout) else None
                out, state = run_direction(cell, x, state, lengths, d == 1, rec_mask=rec_mask, weight_hh=w_hh,
                                           zoneout=zoneout)
                outs.append(out)
                finals.append(state)
            x = outs[0] if D == 1 else torch.cat(outs, 2)
            if self.residual:
                x = x + (layer_in if layer or self.weight_res_l0 is None else F.linear(layer_in, self.weight_res_l0))
                if lengths is not None:
                    x = x * (torch.arange(x.shape[0], device=x.device).unsqueeze(1) < lengths).unsqueeze(2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        hn = tuple(torch.stack(parts) for parts in zip(*finals))
        return x, hn

    def flatten_parameters(self) -> None:
        """Accepted for torch compatibility; gatelab keeps weights per cell, so there is nothing to do."""

    # -- torch names -----------------------------------------------------------------------------

    def _cell_index(self, layer: int, reverse: bool) -> int:
        return layer * self.num_directions + int(reverse)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            m = _TORCH_KEY.match(name)
            cells = self._modules.get("cells")
            if m is None or cells is None:
                raise
            k = self._cell_index(int(m["layer"]), bool(m["reverse"]))
            if k >= len(cells) or (m["reverse"] and not self.bidirectional):
                raise
            return getattr(cells[k], m["name"])

    @property
    def _flat_weights(self) -> list[Tensor]:
        return engines.native.flat_weights(self)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for name, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        extras = self.extra_options()
        return s + (", " + ", ".join(extras) if extras else "") + f", engine={self.engine_name!r}"


def _to_torch_keys(module: RecurrentLayer, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict hook: ``cells.3.weight_ih`` -> ``weight_ih_l1_reverse`` (torch's names)."""
    D = module.num_directions
    head = prefix + "cells."
    for key in [k for k in state_dict if k.startswith(head)]:
        index, _, name = key[len(head):].partition(".")
        layer, d = divmod(int(index), D)
        state_dict[f"{prefix}{name}_l{layer}{'_reverse' if d else ''}"] = state_dict.pop(key)


def _from_torch_keys(module: RecurrentLayer, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: torch's names -> ``cells.K.name``."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        m = _TORCH_KEY.match(key[len(prefix):])
        if m is None or m["name"] == "weight_res":
            continue
        k = module._cell_index(int(m["layer"]), bool(m["reverse"]))
        state_dict[f"{prefix}cells.{k}.{m['name']}"] = state_dict.pop(key)


def _check_rate(owner: str, name: str, p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{owner}: {name} must be a probability in [0, 1), got {p!r}")


def _zoneout_rates(owner: str, zoneout: float | tuple[float, ...], names: tuple[str, ...]) -> tuple[float, ...]:
    """One zoneout rate per state tensor: a float applies to all of h and c (never to FGR's gates)."""
    zonable = tuple(n for n in names if n != "gates")
    rates = tuple(zoneout) if isinstance(zoneout, (tuple, list)) else (zoneout,) * len(zonable)
    if len(rates) != len(zonable):
        raise ValueError(f"{owner}: zoneout takes one rate or one per state ({', '.join(zonable)}), got {zoneout!r}")
    for r in rates:
        _check_rate(owner, "zoneout", r)
    return tuple(float(r) for r in rates) + (0.0,) * (len(names) - len(zonable))


def _zoneout_masks(T: int, state: tuple[Tensor, ...], rates: tuple[float, ...], training: bool
                   ) -> tuple[Tensor | None, ...]:
    """Per state tensor, the share of the old value each unit keeps at each step, (T, B, S): 0 or 1
    drawn with probability ``p`` in training, ``p`` everywhere in eval (the expectation); None where
    the rate is 0. The engines apply ``m ⊙ old + (1 − m) ⊙ new``."""
    out: list[Tensor | None] = []
    for s, p in zip(state, rates):
        if p == 0.0:
            out.append(None)
            continue
        full = s.new_full((T, *s.shape), p)
        out.append(torch.bernoulli(full) if training else full)
    return tuple(out)


def _mask(like: Tensor, p: float) -> Tensor:
    """Inverted-dropout mask shaped like ``like`` (B, F): 0 with probability p, else 1/(1-p)."""
    return torch.bernoulli(torch.full_like(like, 1 - p)) / (1 - p)
