"""The sequence layer all public layers share: torch's parameters, stacking, directions, masks, engine choice."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence
from torch.utils.hooks import RemovableHandle

from .. import engines
from ..cells import RecurrentCell
from ..cells.base import _check_size, check_flag
from ..engines import export_op, native, reference
from ..engines.base import Engine, OnStep, Stack, tracing_or_transforming
from ..engines.native import WEIGHT_NAMES
from ..init import SCHEMES, init_cell
from .sequence import SequenceBatch, to_sequence_batch

_TORCH_KEY = re.compile(r"^(?P<name>.+)_l(?P<layer>\d+)(?P<reverse>_reverse)?$")

# One line per option, shared by the generated docstrings of the public layers.
OPTION_DOCS: dict[str, str] = {
    "input_size": "features of each input step",
    "hidden_size": "features of the hidden state",
    "num_layers": "stacked layers",
    "nonlinearity": "torch's name for ``activation``: φ of the Elman step (``\"tanh\"``, ``\"relu\"``, any registered one)",
    "bias": "use ``b_ih`` and ``b_hh``",
    "batch_first": "input and output are ``(B, T, F)`` instead of ``(T, B, F)``",
    "dropout": "dropout on each layer's output but the last (torch's)",
    "bidirectional": "run a reverse direction too and concatenate",
    "proj_size": "> 0: ``h' = W_hr h'`` with ``weight_hr_l{k} (P, H)`` (torch's LSTM projection)",
    "device": "where the parameters live",
    "dtype": "the parameters' dtype",
    "activation": "φ of the Elman step, any registered activation (overrides ``nonlinearity``)",
    "gate_activation": "the gates' activation: one, or a mapping per gate name (``{\"f\": \"sigmoid\", \"i\": \"elliott\"}``)",
    "candidate_activation": "φ, the candidate's activation",
    "cell_activation": "ψ, applied to the cell state before the output gate",
    "peephole": "diagonal peephole weights ``weight_ci/cf/co_l{k}`` (H,)",
    "peephole_output": "``\"current\"``: the output gate reads ``c'`` (Gers 2002, ONNX); ``\"previous\"``: it reads ``c``",
    "coupled": "CIFG: ``i = 1 − f``; the input gate has no weights",
    "gates": "the subset of ``\"ifo\"`` kept; a removed gate is the constant 1",
    "layer_norm": "LayerNorm on ``W_ih x``, on ``W_hh h`` and on ``c'`` (Ba et al. 2016)",
    "full_gate_recurrence": "Greff's FGR: each gate also reads the previous step's gates (state ``(h, c, gates)``)",
    "variant": "a Greff et al. 2017 preset (``vanilla NIG NFG NOG NIAF NOAF NP CIFG FGR``)",
    "reset_after": "``True``: torch's reset-after GRU; ``False``: Cho 2014's reset-before",
    "residual": "add each layer's input to its output (layer 0 through ``weight_res_l0`` when sizes differ)",
    "residual_projection": "allow that learned projection; ``False`` raises when layer 0's sizes differ",
    "input_dropout": "variational dropout on each layer's input: one mask per sequence, every step",
    "recurrent_dropout": "variational dropout on the recurrent input ``h``: one mask per sequence",
    "weight_dropout": "DropConnect on ``W_hh``, resampled every forward",
    "zoneout": "keep each unit's old state with this probability (one rate, or one per state); eval uses the expectation",
    "init": "``\"torch\"`` U(±1/√H), ``\"orthogonal\"``, ``\"identity\"`` (IRNN) or ``\"chrono\"``",
    "forget_bias": "set the effective forget-gate bias ``b_ih + b_hh`` (GRU: the z gate) to this value",
    "chrono_max_length": "the longest dependency, for ``init=\"chrono\"``",
    "backend": "engine: ``\"auto\"`` (the first that applies), ``\"native\"``, ``\"fused\"`` or ``\"reference\"``",
    "strict": "raise instead of falling back to a slower engine",
}
LAYER_OPTIONS = ("residual", "residual_projection", "input_dropout", "recurrent_dropout", "weight_dropout", "zoneout",
                 "init", "forget_bias", "chrono_max_length", "backend", "strict")


def options_doc(*names: str) -> str:
    """The ``Args`` block of a layer's docstring: one line per option, from :data:`OPTION_DOCS`."""
    width = max(map(len, names))
    return "\n    Args:\n" + "".join(f"        {n:<{width}}  {OPTION_DOCS[n]}\n" for n in names)


@dataclass
class DirectionCall:
    """What a step hook sees when one layer and direction starts: ``layer``, ``direction`` (1 =
    reverse), the ``cell`` (weights bound), its input ``x (T, B, I)``, its initial ``state`` (each
    ``(B, size)``) and ``lengths``. A hook may replace ``state`` (for example by leaves that require
    grad) before the loop starts."""

    layer: int
    direction: int
    cell: RecurrentCell
    x: Tensor
    state: tuple[Tensor, ...]
    lengths: Tensor | None


StepHook = Callable[[DirectionCall], OnStep | None]
_REDUCED = (torch.bfloat16, torch.float16)  # what an autocast op may hand a float32 layer


class RecurrentLayer(nn.Module):
    """A stack of recurrent layers over time, with torch.nn's arguments, returns and parameters.

    The layer owns its parameters under torch's names, in torch's order: per layer ``k`` and
    direction, ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``,
    ``weight_hr_l{k}`` (``..._reverse`` for the reverse direction), then the cell's own extras in the
    same scheme (``weight_ci_l0``, ``ln_ih_weight_l0``, a learnable gate's ``sigma_f_weight_l0``);
    ``weight_res_l0`` (residual projection) comes first. So ``named_parameters()``, ``state_dict()``,
    ``all_weights`` and ``torch.nn.utils.parametrize`` work as on ``torch.nn.LSTM``: a parametrised
    weight is what every engine computes with.

    ``cells[layer * D + direction]`` are the one-step cells that define the maths; within a call
    their parameters are bound to the layer's (parametrisations applied once per call), at rest they
    hold the layer's current values. The layer runs the stack (dropout and residual sums between
    layers, the random masks drawn once per call) and hands each layer and direction to its engine
    (:mod:`gatelab.engines`). Options beyond torch are documented on the public subclasses.
    """

    cell_class: ClassVar[type[RecurrentCell]]

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
        cell_options: Mapping[str, Any] | None = None,
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
    ) -> None:
        super().__init__()
        owner = type(self).__name__  # (no parametrisation yet)
        _check_size("input_size", input_size)
        _check_size("hidden_size", hidden_size)
        _check_size("num_layers", num_layers)
        for name, flag in (("bias", bias), ("batch_first", batch_first), ("bidirectional", bidirectional),
                           ("residual", residual), ("residual_projection", residual_projection), ("strict", strict)):
            check_flag(f"{owner}: {name}", flag)
        if forget_bias is not None and (isinstance(forget_bias, bool) or not isinstance(forget_bias, (int, float))):
            raise TypeError(f"{owner}: forget_bias must be a number or None, got {forget_bias!r} "
                            f"({type(forget_bias).__name__})")
        if chrono_max_length is not None:
            _check_size("chrono_max_length", chrono_max_length)
        for name, p in (("dropout", dropout), ("input_dropout", input_dropout),
                        ("recurrent_dropout", recurrent_dropout), ("weight_dropout", weight_dropout)):
            _check_rate(owner, name, p)
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"{owner}: dropout={dropout} acts between layers and num_layers=1: it has no effect",
                          UserWarning, stacklevel=3)
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

        cells: list[RecurrentCell] = []
        layer_input = input_size
        for _ in range(num_layers):
            for _ in range(D):
                try:
                    cell = self.cell_class(layer_input, hidden_size, bias, **dict(cell_options or {}), device=device,
                                           dtype=dtype)
                except (TypeError, ValueError) as e:  # name the layer the user built, not only its cell
                    message = str(e) if str(e).startswith(self.cell_class.__name__) else f"{owner}: {e}"
                    raise type(e)(message) from None
                init_cell(cell, init, forget_bias=forget_bias, chrono_max_length=chrono_max_length)
                cells.append(cell)
            layer_input = D * cells[-1].output_size
        self.output_size = cells[0].output_size
        self.zoneout = _zoneout_rates(owner, zoneout, cells[0])

        # Residual: layer l's input is added to its output. Layers >= 1 always match; layer 0 needs
        # input_size == D * output_size or a learned projection weight_res_l0 (D·O, I). Registered
        # first: the parameter order of earlier gatelab versions, which optimiser states rely on.
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

        # Each cell's parameters (and buffers, which a module activation may have) become the layer's,
        # under torch's names; the cells keep the same tensors for reading at rest. The cells are not
        # submodules: the layer's parameters are the only ones.
        self._cells: tuple[RecurrentCell, ...] = tuple(cells)
        # every tensor a cell holds, flat: (module holding it, "_parameters" or "_buffers", attribute, layer name)
        # A tensor several cells share (one activation module passed to every gate) is registered once,
        # under its first name, and every holder binds from that name.
        slots, first_name = [], {}
        for k, cell in enumerate(cells):
            for store, named in (("_parameters", cell.named_parameters(remove_duplicate=False)),
                                 ("_buffers", cell.named_buffers(remove_duplicate=False))):
                for q, t in named:
                    name = first_name.setdefault(id(t), self._torch_name(q, k))
                    slots.append((cell.get_submodule(q.rpartition(".")[0]), store, q.rpartition(".")[2], name))
                    if name not in self._parameters and name not in self._buffers:
                        if store == "_parameters":
                            self.register_parameter(name, t)
                        else:
                            self.register_buffer(name, t)
        self._slots: tuple[tuple[nn.Module, str, str, str], ...] = tuple(slots)
        self._binding_depth = 0
        self._step_hooks: OrderedDict[int, StepHook] = OrderedDict()
        self._register_load_state_dict_pre_hook(_from_earlier_keys, with_module=True)
        self._set_engine()

    # -- parameters under torch's names ------------------------------------------------------------

    def _torch_name(self, name: str, k: int) -> str:
        """``weight_ih`` of cell ``k`` -> ``weight_ih_l1_reverse``; a submodule's ``sigma_f.weight`` ->
        ``sigma_f_weight_l0``."""
        layer, d = divmod(k, self.num_directions)
        return f"{name.replace('.', '_')}_l{layer}{'_reverse' if d else ''}"

    @property
    def cells(self) -> tuple[RecurrentCell, ...]:
        """The one-step cell of each layer and direction (``cells[layer * D + direction]``).

        At rest a cell holds the layer's own parameters (the same tensors: ``layer.weight_hh_l0 is
        layer.cells[0].weight_hh``); a weight the layer parametrises (``torch.nn.utils.parametrize``) is
        computed only when the layer runs, so read it as the layer's attribute. During a call the cells
        hold what the layer bound (see :meth:`_weights_bound`)."""
        if not self._binding_depth:  # re-sync after load_state_dict(assign=True) and the like
            for owner, store, leaf, name in self._slots:
                held = getattr(self, store).get(name)  # absent: parametrised, or torch's hook-style weight_norm
                if held is not None:
                    getattr(owner, store)[leaf] = held
        return self._cells

    @contextlib.contextmanager
    def _weights_bound(self) -> Iterator[tuple[RecurrentCell, ...]]:
        """Within the block every cell computes with the layer's weights as its attributes return them:
        torch's names, each parametrisation evaluated once (what :meth:`RecurrentCell.using` does for
        one cell, here for all with the holders found once). One thread at a time: concurrent calls of
        one layer whose weights are parametrised may see each other's bindings (``nn.DataParallel``
        replicas have cells of their own)."""
        saved = [(getattr(owner, store), leaf, getattr(owner, store)[leaf]) for owner, store, leaf, _ in self._slots]
        self._binding_depth += 1
        try:
            for owner, store, leaf, name in self._slots:
                getattr(owner, store)[leaf] = getattr(self, name)
            yield self._cells
        finally:
            self._binding_depth -= 1
            for holder, leaf, value in saved:  # all taken before any was bound: a shared module ends as it began
                holder[leaf] = value

    def _replicate_for_data_parallel(self) -> RecurrentLayer:
        """``nn.DataParallel``: each replica binds its own weights into cells of its own."""
        replica = super()._replicate_for_data_parallel()
        copies: dict[int, nn.Module] = {}
        for cell in self._cells:
            for module in cell.modules():
                copy = module._replicate_for_data_parallel()
                copy._parameters = dict(module._parameters)  # placeholders: every call binds the replica's own
                copies[id(module)] = copy
        for copy in copies.values():
            copy._modules = {k: None if m is None else copies.get(id(m), m) for k, m in copy._modules.items()}
        replica._cells = tuple(copies[id(cell)] for cell in self._cells)
        replica._slots = tuple((copies[id(owner)], store, leaf, name) for owner, store, leaf, name in self._slots)
        replica._binding_depth = 0
        return replica

    @property
    def _flat_weights_names(self) -> list[str]:
        """torch's names of :attr:`_flat_weights`."""
        return [n for names in self._all_weights for n in names]

    @property
    def _all_weights(self) -> list[list[str]]:
        """Per layer and direction, the torch names of ``w_ih, w_hh, b_ih, b_hh[, w_hr]`` (torch's ``_all_weights``)."""
        return [[self._torch_name(n, k) for n in WEIGHT_NAMES if getattr(cell, n, None) is not None]
                for k, cell in enumerate(self._cells)]

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, n) for n in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """As torch's: per layer and direction the list ``[w_ih, w_hh, b_ih, b_hh(, w_hr)]``."""
        return [[getattr(self, n) for n in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """Accepted for torch compatibility; gatelab keeps torch's separate weights, so there is nothing to do."""

    # -- configuration ---------------------------------------------------------------------------

    @property
    def kind_name(self) -> str:
        """The layer's class name, ``LSTM`` also once torch's parametrize made it ``ParametrizedLSTM``."""
        return parametrize.type_before_parametrizations(self).__name__

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def state_names(self) -> tuple[str, ...]:
        return self._cells[0].state_names

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

    @property
    def engine_name(self) -> str:
        """The name of the engine that runs the next call (``reference`` while a step hook is registered)."""
        return reference.ENGINE.name if self._step_hooks else self.engine.name

    def _choose_engine(self) -> tuple[Engine, str]:
        """Pick the engine for the current configuration and mode; return it and the reason."""
        return engines.choose(self, self.backend, self.strict)

    def explain(self) -> str:
        """Which engine runs this layer in its current mode, and why."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine, why = self._choose_engine()
        if self._step_hooks:
            engine, why = reference.ENGINE, (f"{len(self._step_hooks)} step hook(s) registered: the reference loop "
                                             f"runs, the only one that exposes every step's state (else: {why})")
        traced = engines.traceable(self, engine)
        if traced is not engine and engine is native.ENGINE and self._cells[0].torch_mode == "LSTM" \
                and self.proj_size == 0:
            why += (f". Under torch.compile on the CPU (float32, without lengths or dropout between layers) torch's "
                    f"oneDNN LSTM kernel runs as gatelab operators (torch.ops.gatelab.onednn_lstm), as it does "
                    f"eagerly; otherwise, and under torch.export and torch.func, {traced.describe(self)} runs "
                    f"instead: {engine.untraceable}")
        elif traced is not engine:
            why += (f". Under torch.compile, torch.export and torch.func {traced.describe(self)} runs instead: "
                    f"{getattr(engine, 'untraceable', 'it does not trace')}")
        from .. import onnx  # its form() needs no ONNX package

        return (f"{self.kind_name}: engine {engine.name!r} ({'training' if self.training else 'eval'} mode). {why}. "
                f"ONNX export: {onnx.form(self)}")

    def train(self, mode: bool = True) -> RecurrentLayer:
        super().train(mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._set_engine()
        return self

    def _set_engine(self) -> None:
        self.engine = self._choose_engine()[0]
        # what runs under torch.compile / torch.export, where torch's own RNN kernels do not trace
        self._traced_engine = engines.traceable(self, self.engine)

    def register_step_hook(self, hook: StepHook) -> RemovableHandle:
        """Call ``hook(call)`` (a :class:`DirectionCall`) whenever a layer and direction starts; it may
        return ``on_step(t, state)``, which then sees every step's new state (before the length mask).

        While any hook is registered the layer runs the reference loop, the only one that exposes every
        step's state (``explain()`` says so); the diagnostics record states this way. Returns a
        handle whose ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._step_hooks)
        self._step_hooks[handle.id] = hook
        return handle

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self, input: Tensor | PackedSequence, hx: Tensor | tuple[Tensor, ...] | None = None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor | PackedSequence, Tensor | tuple[Tensor, ...]]:
        """Run the stack. ``input`` is ``(T, B, I)`` (``(B, T, I)`` with ``batch_first``), unbatched
        ``(T, I)`` or a ``PackedSequence``; ``lengths`` (B,) may be given with padded input instead of
        packing. Returns ``(output, h_n)`` as torch does (``(output, (h_n, c_n))`` for an LSTM)."""
        owner = self.kind_name
        batch = to_sequence_batch(input, self.input_size, self.batch_first, lengths, owner)
        engine = reference.ENGINE if self._step_hooks else self._traced_engine if tracing_or_transforming() \
            else self.engine
        # -- export (gatelab.onnx.export): one operator call per direction, see gatelab.engines.export_op
        if export_op.active() and (routed := export_op.engine_for(self)) is not None:
            engine = routed
        # --
        with self._weights_bound() as cells:
            ref = cells[0].weight_ih  # as bound: what runs
            if (batch.data.dtype in _REDUCED and ref.dtype not in _REDUCED and batch.data.device == ref.device
                    and torch.is_autocast_enabled(ref.device.type)):  # autocast picks precisions per op: not an error
                batch.data = batch.data.to(ref.dtype)
            if batch.data.dtype != ref.dtype or batch.data.device != ref.device:
                raise ValueError(f"{owner}: input is {batch.data.dtype} on {batch.data.device}, parameters are "
                                 f"{ref.dtype} on {ref.device}")
            traced = engine is self._traced_engine and engine is not self.engine
            if traced and self.engine is native.ENGINE and native.onednn_compiles(
                    cells[0], batch.data, batch.lengths, self.training, self.dropout, self.num_layers) is None:
                engine = native.ONEDNN_COMPILED  # compiled: torch's own oneDNN LSTM, as gatelab operators
            # no initial state for that one: its operator makes the zeros, the graph holds no fill kernel
            hx = () if hx is None and engine is native.ONEDNN_COMPILED else self._check_hx(hx, batch)
            if engine.whole_stack:
                stack = Stack(cells, self.num_layers, self.bidirectional, self.bias, self.dropout, self.training)
                out, hn = engine.run_stack(stack, batch.data, batch.lengths, hx)
            else:
                out, hn = self._run_stack(engine, cells, batch, hx)
        if not batch.batched:
            hn = tuple(h.squeeze(1) for h in hn)
        return batch.restore(out), self._pack_state(hn)

    def _pack_state(self, hn: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
        return hn[0] if len(hn) == 1 else hn

    def _check_hx(self, hx: Tensor | tuple[Tensor, ...] | None, batch: SequenceBatch) -> tuple[Tensor, ...]:
        """Validate the initial state; return it as a tuple of ``(L·D, B, size)`` tensors."""
        owner = self.kind_name
        LD, B, x = self.num_layers * self.num_directions, batch.batch_size, batch.data
        sizes = self._cells[0].state_sizes()
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
            if h.dtype in _REDUCED and x.dtype not in _REDUCED and h.device == x.device \
                    and torch.is_autocast_enabled(x.device.type):
                h = h.to(x.dtype)  # a state carried out of an autocast kernel (torch's LSTM returns bf16 there)
            if h.dtype != x.dtype or h.device != x.device:
                raise ValueError(f"{owner}: {name}0 is {h.dtype} on {h.device}, input is {x.dtype} on {x.device}")
            out.append(h if batch.batched else h.unsqueeze(1))
        return tuple(out)

    def _run_stack(self, engine: Engine, cells: tuple[RecurrentCell, ...], batch: SequenceBatch,
                   hx: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Run every layer and direction on ``engine`` (a direction engine).

        Between layers: dropout (torch's), then the residual sum. Per layer and direction, sampled
        once per call in training: the variational input mask (B, I), the recurrent mask (B, R), the
        DropConnect mask on ``W_hh`` and the zoneout masks (T, B, S), so every engine sees the same
        random draws.
        """
        x, lengths, D = batch.data, batch.lengths, self.num_directions
        finals: list[tuple[Tensor, ...]] = []
        for layer in range(self.num_layers):
            layer_in = x
            x = self._block_in(layer, x)
            if self.training and self.input_dropout > 0:
                x = x * _mask(x[0], self.input_dropout).unsqueeze(0)  # one mask per sequence, every step
            outs = []
            for d in range(D):
                k = layer * D + d
                cell = cells[k]
                state = tuple(h[k] for h in hx)
                rec_mask = _mask(state[0], self.recurrent_dropout) if self.training and self.recurrent_dropout else None
                w_hh = F.dropout(cell.weight_hh, self.weight_dropout, True) if self.training and self.weight_dropout else None
                zoneout = _zoneout_masks(x.shape[0], state, self.zoneout, self.training) if any(self.zoneout) else None
                options = {"rec_mask": rec_mask, "weight_hh": w_hh, "zoneout": zoneout}
                if self._step_hooks:
                    call = DirectionCall(layer, d, cell, x, state, lengths)
                    observers = [o for hook in list(self._step_hooks.values()) if (o := hook(call)) is not None]
                    out, state = reference.run_direction(cell, x, call.state, lengths, d == 1, **options,
                                                         on_step=_fan_out(observers))
                else:
                    out, state = engine.run_direction(cell, x, state, lengths, d == 1, **options, strict=self.strict)
                outs.append(out)
                finals.append(state)
            x = outs[0] if D == 1 else torch.cat(outs, 2)
            if self.residual:
                x = x + (layer_in if layer or self.weight_res_l0 is None else F.linear(layer_in, self.weight_res_l0))
                x = zero_padded(x, lengths)
            x = self._block_out(layer, x, lengths)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        hn = tuple(torch.stack(parts) for parts in zip(*finals))
        return x, hn

    def _block_in(self, layer: int, x: Tensor) -> Tensor:
        """What layer ``layer``'s cells read, from the layer's input ``x`` (the residual adds ``x``
        itself); a hook for layers with blocks around their cells (the scan layers' norm)."""
        return x

    def _block_out(self, layer: int, x: Tensor, lengths: Tensor | None) -> Tensor:
        """Layer ``layer``'s output after its residual sum, before dropout (the scan layers' MLP block)."""
        return x

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for name, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        cell = self._cells[0]
        acts = ", ".join(f"{k}={getattr(v, 'key', type(v).__name__)}" for k, v in cell.activation_slots().items())
        extras = self.extra_options()
        return s + f", {acts}" + (", " + ", ".join(extras) if extras else "") + f", engine={self.engine_name!r}"


def zero_padded(x: Tensor, lengths: Tensor | None) -> Tensor:
    """``x (T, B, F)`` with the steps at or past each row's length set to zero (``lengths`` None: ``x``)."""
    if lengths is None:
        return x
    return x * (torch.arange(x.shape[0], device=x.device).unsqueeze(1) < lengths.to(x.device)).unsqueeze(2)


def _fan_out(observers: list[OnStep]) -> OnStep | None:
    if not observers:
        return None
    if len(observers) == 1:
        return observers[0]

    def on_step(t: int, state: tuple[Tensor, ...]) -> None:
        for observe in observers:
            observe(t, state)

    return on_step


def _from_earlier_keys(module: RecurrentLayer, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: the keys of earlier gatelab versions, where a learnable activation's
    parameter was saved as ``sigma_f.weight_l0``, are today's ``sigma_f_weight_l0``."""
    own = set(module._parameters)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if "." in rest and _TORCH_KEY.match(rest) and rest.replace(".", "_") in own:
            state_dict[prefix + rest.replace(".", "_")] = state_dict.pop(key)


def _check_rate(owner: str, name: str, p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{owner}: {name} must be a probability in [0, 1), got {p!r}")


def _zoneout_rates(owner: str, zoneout: float | tuple[float, ...], cell: RecurrentCell) -> tuple[float, ...]:
    """One zoneout rate per state tensor: a float applies to every state the cell lets zoneout act on."""
    names = cell.state_names
    zonable = tuple(n for n in names if cell.zoneout_states is None or n in cell.zoneout_states)
    rates = tuple(zoneout) if isinstance(zoneout, (tuple, list)) else (zoneout,) * len(zonable)
    if len(rates) != len(zonable):
        raise ValueError(f"{owner}: zoneout takes one rate or one per state ({', '.join(zonable)}), got {zoneout!r}")
    for r in rates:
        _check_rate(owner, "zoneout", r)
    by_name = dict(zip(zonable, (float(r) for r in rates)))
    return tuple(by_name.get(n, 0.0) for n in names)


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
