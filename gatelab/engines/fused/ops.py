"""The C++ loops of the fused engine as torch operators: ``torch.ops.gatelab.<cell>`` and
``torch.ops.gatelab.<cell>_backward``, one call per layer and direction (never per step).

Each forward operator takes the layer's inputs and weights for one direction and returns the output
sequence, the final state and what its backward needs; the backward operator turns the output
gradients into the gradients of the input, the weights and the initial state (the BPTT loop, then
the weight gradients as products over all steps). Both are functional: nothing they are given is
written. Registered for each: the schema, the CPU kernel (the C++ loop of :mod:`.cpp`, compiled at
first use), a fake kernel (shapes only, for ``torch.compile`` and ``torch.export``) and the
autograd formula. So a compiled or exported layer holds one opaque node per direction, and
``torch.library.opcheck`` checks every operator.

The CUDA kernels register later as the same operators' CUDA implementation. The pure-PyTorch loop
(:mod:`.steps`) stays the readable specification these kernels are tested against.

Double backward (``create_graph=True``): the backward formula then recomputes the direction on the
reference loop from the saved inputs and differentiates that graph, so higher-order gradients are
exact and connected; the layer-norm LSTM, whose input-side norm is applied before its operator,
raises instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...cells import ElmanCell, GatedStateCell, GRUCell, LSTMCell, RecurrentCell
from . import cpp

NAMESPACE = "gatelab"


def save_z(kinds: Sequence[int], params: Sequence[float], gates: int) -> bool:
    """Whether the backward reads the pre-activations of the first ``gates`` slots (then the forward keeps them)."""
    return any(cpp._needs_input(k, p) for k, p in zip(kinds[:gates], params[:gates]))


@dataclass(frozen=True)
class CellOp:
    """One cell kind's pair of operators.

    ``states``: the state tensors (``h``, ``c``); ``saved``: the forward's outputs after the final
    state, which its backward reads; ``gates``: how many slots' pre-activations the backward may
    read (the LSTM's ψ reads the cell state instead); ``fold_bias_hh``: ``b_hh`` joins the input
    projection (every cell but the GRU, whose candidate multiplies its recurrent part by r).
    """

    name: str
    cell: type[RecurrentCell]
    states: tuple[str, ...]
    saved: tuple[str, ...]
    gates: int
    width: int  # gate rows per hidden unit: W_hh is (width·H, H)
    fold_bias_hh: bool = True
    layer_norm: bool = False
    peephole: bool = False  # takes the LSTM's peephole weights (optional inputs)

    @property
    def backward_name(self) -> str:
        return f"{self.name}_backward"


LSTM = CellOp("lstm", LSTMCell, ("h", "c"), ("Z", "A", "C", "K", "HR", "CP"), 4, 4, peephole=True)
LSTM_LN = CellOp("lstm_ln", LSTMCell, ("h", "c"), ("Z", "A", "C", "K", "HR", "Y", "NH", "RH", "NC", "RC", "CP"), 4, 4,
                 layer_norm=True)
GRU = CellOp("gru", GRUCell, ("h",), ("Z", "A", "GHn", "S", "HR"), 3, 3, fold_bias_hh=False)
ELMAN = CellOp("elman", ElmanCell, ("h",), ("Z", "S", "HR"), 1, 1)
GATED_STATE = CellOp("gated_state", GatedStateCell, ("s",), ("Z", "A", "S", "HR", "SN"), 4, 4)
CELL_OPS = (LSTM, LSTM_LN, GRU, ELMAN, GATED_STATE)


def for_cell(cell: RecurrentCell) -> CellOp:
    """The operators that run ``cell`` (one the C++ loops take: see :func:`.cpp.cell_blockers`)."""
    if isinstance(cell, LSTMCell):
        return LSTM_LN if cell.layer_norm else LSTM
    return next(op for op in CELL_OPS if isinstance(cell, op.cell))


# -- schemas --------------------------------------------------------------------------------------
# Each operator's arguments, by name and type, in order: the one place the calling convention lives.


def forward_arguments(op: CellOp) -> list[tuple[str, str]]:
    """``(name, schema type)`` of the forward operator's arguments."""
    if op.layer_norm:  # the normalised input projection comes in; the recurrent-side norms run inside
        head = [("xw", "Tensor"), ("W_hh", "Tensor")]
    else:
        head = [("x", "Tensor"), ("W_ih", "Tensor"), ("W_hh", "Tensor"), ("b_ih", "Tensor?"), ("b_hh", "Tensor?")]
    out = [*head, *((f"{s}0", "Tensor") for s in op.states), ("lengths", "Tensor?"), ("rec_mask", "Tensor?"),
           *((f"z{s}", "Tensor?") for s in op.states)]
    if op.peephole:
        out += [("w_ci", "Tensor?"), ("w_cf", "Tensor?"), ("w_co", "Tensor?"), ("peep_current", "bool")]
    if op.layer_norm:
        out += [("g_hh", "Tensor"), ("g_c", "Tensor"), ("b_c", "Tensor"), ("eps", "float")]
    return out + [("kinds", "int[]"), ("params", "float[]"), ("reverse", "bool"), ("train", "bool")]


def backward_arguments(op: CellOp) -> list[tuple[str, str]]:
    """``(name, schema type)`` of the backward operator's arguments: the output gradients, the inputs
    and saved buffers it reads, the options, and which gradients are wanted (``needs``, one per
    gradient but the initial state's)."""
    douts = [("dout", "Tensor"), *((f"d{s}", "Tensor") for s in op.states)]
    states = [(f"{s}0", "Tensor") for s in op.states]
    if op.layer_norm:
        inputs = [("W_hh", "Tensor"), *states, ("g_hh", "Tensor"), ("g_c", "Tensor")]
    else:
        inputs = [("x", "Tensor"), ("W_ih", "Tensor"), ("W_hh", "Tensor"), *states]
    if op.peephole:
        inputs += [("w_ci", "Tensor?"), ("w_cf", "Tensor?"), ("w_co", "Tensor?"), ("peep_current", "bool")]
    return [*douts, *inputs, *((n, "Tensor") for n in op.saved), ("lengths", "Tensor?"), ("rec_mask", "Tensor?"),
            *((f"z{s}", "Tensor?") for s in op.states), ("kinds", "int[]"), ("params", "float[]"),
            ("reverse", "bool"), ("needs", "bool[]")]


def backward_grads(op: CellOp) -> tuple[str, ...]:
    """The backward operator's outputs, in order (a gradient not in ``needs`` comes back empty)."""
    if op.layer_norm:
        weights = ("dxw", "dW_hh", "dg_hh", "dg_c", "db_c")
    else:
        weights = ("dx", "dW_ih", "dW_hh", "db_ih") + (() if op.fold_bias_hh else ("db_hh",))
    if op.peephole:
        weights += ("dw_ci", "dw_cf", "dw_co")
    return (*weights, *(f"d{s}0" for s in op.states))


def _schema(arguments: list[tuple[str, str]], outputs: Sequence[str]) -> str:
    return "(" + ", ".join(f"{t} {n}" for n, t in arguments) + ") -> (" + ", ".join(f"Tensor {n}" for n in outputs) + ")"


def forward_schema(op: CellOp) -> str:
    return _schema(forward_arguments(op), ["out", *op.states, *op.saved])


def backward_schema(op: CellOp) -> str:
    return _schema(backward_arguments(op), backward_grads(op))


def _named(arguments: list[tuple[str, str]], args: Sequence[object]) -> dict[str, object]:
    if len(arguments) != len(args):
        raise TypeError(f"expected {len(arguments)} arguments ({', '.join(n for n, _ in arguments)}), got {len(args)}")
    return dict(zip((n for n, _ in arguments), args))


# -- CPU kernels ------------------------------------------------------------------------------------


def _opt(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _cpp() -> object:
    cpp.load(strict=True)
    return torch.ops.gatelab_fused


def _triton() -> object:
    """The Triton loops (:mod:`.gpu`), with the C++ loops' signatures."""
    from . import gpu

    if why := gpu.unavailable():
        raise RuntimeError(f"gatelab: {why[0]}")
    return gpu


def _project(x: Tensor, W_ih: Tensor, bias: Tensor | None) -> Tensor:
    T, B, I = x.shape
    return cpp.matmul(x.reshape(T * B, I), W_ih.t(), bias).view(T, B, -1)


def _peepholes(a: dict[str, object]) -> tuple[Tensor | None, bool]:
    """The peephole weights as the kernels take them, one (3, H) buffer (i, f, o), and whether o reads c'."""
    weights = [a["w_ci"], a["w_cf"], a["w_co"]]
    if all(w is None for w in weights):
        return None, True
    if any(w is None for w in weights):
        raise ValueError("gatelab: the C++ LSTM loop takes all three peepholes (w_ci, w_cf, w_co) or none")
    return torch.stack(weights).contiguous(), bool(a["peep_current"])


def _forward_kernel(op: CellOp, loops: Callable[[], Any]) -> Callable[..., tuple[Tensor, ...]]:
    """The forward operator's kernel around a time loop: ``loops()`` gives the C++ loops (the CPU) or
    the Triton ones (CUDA, and the CPU under Triton's interpreter), which share one signature."""
    arguments = forward_arguments(op)

    def kernel(*args):
        a = _named(arguments, args)
        kinds, params, reverse, train = a["kinds"], a["params"], a["reverse"], a["train"]
        if op.layer_norm:
            xw = a["xw"].contiguous().clone()  # the loop turns its projection into pre-activations in place
        else:
            bias = None if a["b_ih"] is None else (a["b_ih"] + a["b_hh"] if op.fold_bias_hh else a["b_ih"])
            xw = _project(a["x"].contiguous(), a["W_ih"].contiguous(), bias)
        fns = loops()
        W_hh = a["W_hh"].contiguous()
        states = tuple(a[f"{s}0"].contiguous() for s in op.states)
        masks = (_opt(a["lengths"]), _opt(a["rec_mask"]), *(_opt(a[f"z{s}"]) for s in op.states))
        keep_z = save_z(kinds, params, op.gates) and train
        if op is LSTM:
            outs = fns.lstm_forward(xw, W_hh, *states, *masks, *_peepholes(a), kinds, params, reverse, keep_z, train)
        elif op is LSTM_LN:
            outs = fns.lstm_ln_forward(xw, W_hh, *states, *masks, a["g_hh"].contiguous(), a["g_c"].contiguous(),
                                       a["b_c"].contiguous(), a["eps"], kinds, params, reverse, keep_z, train)
        elif op is GRU:
            outs = fns.gru_forward(xw, W_hh, _opt(a["b_hh"]), *states, *masks, kinds, params, reverse, keep_z, train)
        elif op is ELMAN:
            outs = fns.elman_forward(xw, W_hh, *states, *masks, kinds[0], params[0], reverse, keep_z, train)
            if outs[3].data_ptr() == outs[0].data_ptr():
                outs[3] = outs[3].new_empty(0)  # S is the output itself: its backward reads `out` (no aliased outputs)
        else:
            outs = fns.gated_state_forward(xw, W_hh, *states, *masks, kinds, params, reverse, keep_z, train)
        return tuple(outs)

    return kernel


def _forward_fake(op: CellOp) -> Callable[..., tuple[Tensor, ...]]:
    """Shapes and dtypes of the forward's outputs, as the C++ loop makes them."""
    arguments = forward_arguments(op)

    def fake(*args):
        a = _named(arguments, args)
        T, B = (a["xw"] if op.layer_norm else a["x"]).shape[:2]
        H = a["W_hh"].shape[1]
        G, train = op.width * H, a["train"]
        keep, rec = (T, T) if train else (1, 2)
        zoned = train and any(a[f"z{s}"] is not None for s in op.states)
        new = a[f"{op.states[0]}0"].new_empty
        sizes = {"Z": (T, B, G) if save_z(a["kinds"], a["params"], op.gates) and train else (0,),
                 "A": (keep, B, G), "C": (keep, B, H), "K": (keep, B, H), "HR": (rec, B, H), "GHn": (keep, B, H),
                 "S": (keep, B, H), "Y": (keep, B, H), "NH": (keep, B, G), "NC": (keep, B, H), "RH": (keep, B),
                 "RC": (keep, B), "CP": (keep, B, H) if zoned else (0,), "SN": (keep, B, H) if zoned else (0,)}
        if op is ELMAN:
            sizes["S"] = (1, B, H) if not train else (T, B, H) if a["lengths"] is not None or zoned else (0,)
        return (new(T, B, H), *(new(B, H) for _ in op.states), *(new(*sizes[name]) for name in op.saved))

    return fake


def _previous_cell_states(C: Tensor, c0: Tensor, reverse: bool) -> Tensor:
    """(T, B, H): the cell state each step starts from, from the states the steps hand on (a dead
    step holds its state, so this is right with lengths too)."""
    return torch.cat([C[1:], c0[None]]) if reverse else torch.cat([c0[None], C[:-1]])


def _backward_kernel(op: CellOp, loops: Callable[[], Any]) -> Callable[..., tuple[Tensor, ...]]:
    """The backward operator's kernel: ``loops()``'s backward through time, then the weight gradients
    as products over all steps."""
    arguments = backward_arguments(op)
    grads_out = backward_grads(op)
    n = len(op.states)

    def kernel(*args):
        a = _named(arguments, args)
        kinds, params, reverse = a["kinds"], a["params"], a["reverse"]
        want = dict(zip(grads_out, a["needs"]))
        douts = [a[g].contiguous() for g in ("dout", *(f"d{s}" for s in op.states))]
        states = [a[f"{s}0"].contiguous() for s in op.states]
        masks = (_opt(a["lengths"]), _opt(a["rec_mask"]), *(_opt(a[f"z{s}"]) for s in op.states))
        fns = loops()
        W_hh = a["W_hh"].contiguous()
        if op is LSTM:
            peep = _peepholes(a)
            dZ, *d0 = fns.lstm_backward(*douts, a["Z"], a["A"], a["C"], a["K"], a["CP"], states[1], W_hh, *masks,
                                        *peep, kinds, params, reverse)
            dGH = dZ
        elif op is LSTM_LN:
            dZ, dGH, dh0, dc0, dY = fns.lstm_ln_backward(*douts, *(a[k] for k in ("Z", "A", "C", "K", "Y", "NH", "RH",
                                                                                  "NC", "RC", "CP")),
                                                         states[1], W_hh, a["g_hh"], a["g_c"], *masks, kinds, params,
                                                         reverse)
            d0 = [dh0, dc0]
        elif op is GRU:
            dZ, dGH, *d0 = fns.gru_backward(*douts, a["Z"], a["A"], a["GHn"], a["S"], states[0], W_hh, *masks, kinds,
                                            params, reverse)
        elif op is ELMAN:
            dZ, *d0 = fns.elman_backward(*douts, a["Z"], a["S"], W_hh, *masks, kinds[0], params[0], reverse)
            dGH = dZ
        else:
            dZ, *d0 = fns.gated_state_backward(*douts, a["Z"], a["A"], a["S"], a["SN"], states[0], W_hh, *masks,
                                               kinds, params, reverse)
            dGH = dZ
        T, B, GH = dZ.shape
        dZ2, dGH2 = dZ.view(T * B, GH), dGH.view(T * B, GH)
        empty = dZ.new_empty(0)
        grads = {"dW_hh": cpp.matmul(dGH2.t(), a["HR"].reshape(T * B, -1)) if want["dW_hh"] else empty}
        if op.layer_norm:
            grads.update(dxw=dZ if want["dxw"] else empty,
                         dg_hh=(dZ * a["NH"]).sum((0, 1)) if want["dg_hh"] else empty,
                         dg_c=(dY * a["NC"]).sum((0, 1)) if want["dg_c"] else empty,
                         db_c=dY.sum((0, 1)) if want["db_c"] else empty)
        else:
            x, I = a["x"].contiguous(), a["x"].shape[2]
            grads.update(dx=cpp.matmul(dZ2, a["W_ih"].contiguous()).view(T, B, I) if want["dx"] else empty,
                         dW_ih=cpp.matmul(dZ2.t(), x.view(T * B, I)) if want["dW_ih"] else empty,
                         db_ih=dZ2.sum(0) if want["db_ih"] else empty)
            if not op.fold_bias_hh:
                grads["db_hh"] = dGH2.sum(0) if want["db_hh"] else empty
        if op.peephole:  # dL/dw = Σ dL/dz ⊙ the cell state the gate read, over steps and rows
            H = W_hh.shape[1]
            handed = a["CP"] if a["CP"].numel() else a["C"]
            prev = _previous_cell_states(handed, states[1], reverse) if peep[0] is not None else None
            for k, g in zip((0, 1, 3), ("dw_ci", "dw_cf", "dw_co")):  # gate rows i, f, o
                read = a["C"] if g == "dw_co" and peep[1] else prev
                grads[g] = (empty if not want[g] else dZ.new_zeros(H) if read is None
                            else (dZ[..., k * H:(k + 1) * H] * read).sum((0, 1)))
        return (*(grads[g] for g in grads_out[:-n]), *d0)

    return kernel


def _backward_fake(op: CellOp) -> Callable[..., tuple[Tensor, ...]]:
    arguments = backward_arguments(op)
    grads_out = backward_grads(op)
    n = len(op.states)

    def fake(*args):
        a = _named(arguments, args)
        W_hh, dout = a["W_hh"], a["dout"]
        H = W_hh.shape[1]
        if op.layer_norm:
            shapes = {"dxw": (*dout.shape[:2], W_hh.shape[0]), "dg_hh": a["g_hh"].shape, "dg_c": a["g_c"].shape,
                      "db_c": a["g_c"].shape}
        else:
            shapes = {"dx": a["x"].shape, "dW_ih": a["W_ih"].shape, "db_ih": W_hh.shape[:1], "db_hh": W_hh.shape[:1],
                      "dw_ci": (H,), "dw_cf": (H,), "dw_co": (H,)}
        shapes["dW_hh"] = W_hh.shape
        weights = [dout.new_empty(shapes[g] if need else (0,)) for g, need in zip(grads_out[:-n], a["needs"])]
        return (*weights, *(a[f"{s}0"].new_empty(a[f"{s}0"].shape) for s in op.states))

    return fake


# -- autograd ---------------------------------------------------------------------------------------


def _setup_context(op: CellOp) -> Callable[..., None]:
    arguments = forward_arguments(op)
    n = len(op.states)

    def setup_context(ctx, inputs, output):
        a = _named(arguments, inputs)
        saved = list(output[1 + n:])
        if op is ELMAN and a["train"] and saved[1].numel() == 0:
            saved[1] = output[0]  # S is the output sequence
        ctx.tensor_names = [k for k, t in arguments if t.startswith("Tensor")]
        ctx.save_for_backward(*(a[k] for k in ctx.tensor_names), *saved)
        ctx.options = {k: a[k] for k, t in arguments if not t.startswith("Tensor")}
        # the saved tensors are outputs too, and nothing reads their gradients: without this autograd
        # would fill a zero tensor for each (at T 100, B 32, H 64 about 6 % of a training step)
        ctx.set_materialize_grads(False)

    return setup_context


def _autograd_backward(op: CellOp, namespace: str) -> Callable[..., tuple[Tensor | None, ...]]:
    arguments = forward_arguments(op)
    grads_out = backward_grads(op)
    n = len(op.states)

    def backward(ctx, *grads):
        if not ctx.options["train"]:
            raise RuntimeError(f"gatelab: torch.ops.gatelab.{op.name} ran with train=False, which keeps nothing for a "
                               "backward pass: the call ran under torch.no_grad() or with no input that needed a "
                               "gradient (a program exported that way cannot be differentiated: export with grad "
                               "enabled and a parameter that requires grad)")
        tensors = ctx.saved_tensors
        a = {**dict(zip(ctx.tensor_names, tensors)), **ctx.options}
        a.update(zip(op.saved, tensors[len(ctx.tensor_names):]))
        need = {k: bool(v) for (k, _), v in zip(arguments, ctx.needs_input_grad)}
        # create_graph=True: the gradient must itself be differentiable. (torch.func.grad runs every
        # backward with grad mode on; there the hand-written backward serves, and a second transform
        # over it raises: _no_second_derivative.)
        if torch.is_grad_enabled() and not _transforms_active():
            found = _differentiable_backward(op, a, grads, need)
        else:
            W_hh = a["W_hh"]
            T, B = (a["xw"] if op.layer_norm else a["x"]).shape[:2]
            H = W_hh.shape[1]
            a["dout"] = W_hh.new_zeros(T, B, H) if grads[0] is None else grads[0]
            for s, g in zip(op.states, grads[1:1 + n]):
                a[f"d{s}"] = W_hh.new_zeros(B, H) if g is None else g
            wanted = {g: need[g[1:]] for g in grads_out[:-n]}
            if op.fold_bias_hh and not op.layer_norm:  # one bias gradient serves b_ih and b_hh
                wanted["db_ih"] = need["b_ih"] or need["b_hh"]
            a["needs"] = list(wanted.values())
            call = _TRANSFORMABLE[namespace, op.backward_name].apply if _transforms_active() else \
                getattr(getattr(torch.ops, namespace), op.backward_name)
            out = call(*(a[k] for k, _ in backward_arguments(op)))
            found = {g[1:]: v for g, v in zip(grads_out, out)}
            if op.fold_bias_hh and not op.layer_norm:
                found["b_hh"] = found["b_ih"]
        return tuple(found.get(k) if need[k] else None for k, _ in arguments)

    return backward


def _differentiable_backward(op: CellOp, a: dict[str, object], grads: Sequence[Tensor | None],
                             need: dict[str, bool]) -> dict[str, Tensor | None]:
    """The backward as a graph, for double backward (gradient penalties, meta-learning): the direction
    is recomputed on the reference loop from the saved inputs, by a cell of the same kind with the
    same activations and weights, and differentiated with ``create_graph=True``; the result equals
    the operator's backward and stays connected to every input."""
    from .. import reference

    if op.layer_norm:
        raise RuntimeError("gatelab: double backward (create_graph=True) through the fused engine's layer-norm LSTM is "
                           "not supported; build the layer with backend='reference' for higher-order gradients")
    n = len(op.states)
    x, W_hh = a["x"], a["W_hh"]
    peephole = op.peephole and a["w_ci"] is not None
    cell = reference_cell(op, x.shape[2], W_hh.shape[1], a["b_ih"] is not None, a["kinds"], a["params"],
                          peephole=peephole, peep_current=bool(a.get("peep_current", True)))
    weights = {"weight_ih": "W_ih", "weight_hh": "W_hh", "bias_ih": "b_ih", "bias_hh": "b_hh",
               **({"weight_ci": "w_ci", "weight_cf": "w_cf", "weight_co": "w_co"} if peephole else {})}
    zone = tuple(a[f"z{s}"] for s in op.states)
    with cell.using({p: a[k] for p, k in weights.items() if a[k] is not None}):
        out, final = reference.run_direction(cell, x, tuple(a[f"{s}0"] for s in op.states), a["lengths"],
                                             a["reverse"], rec_mask=a["rec_mask"], weight_hh=W_hh,
                                             zoneout=zone if any(z is not None for z in zone) else None)
    pairs = [(t, g) for t, g in zip((out, *final), grads[:1 + n]) if g is not None and t.requires_grad]
    names = [k for k in ("x", *weights.values(), *(f"{s}0" for s in op.states)) if need.get(k) and a[k] is not None]
    if not pairs or not names:
        return {}
    found = torch.autograd.grad([t for t, _ in pairs], [a[k] for k in names], [g for _, g in pairs],
                                create_graph=True, allow_unused=True)
    return dict(zip(names, found))


def reference_cell(op: CellOp, input_size: int, hidden_size: int, bias: bool, kinds: Sequence[int],
                   params: Sequence[float], *, peephole: bool = False, peep_current: bool = True) -> RecurrentCell:
    """A cell of ``op``'s kind with the activations ``kinds``/``params`` name, on the meta device (its
    weights are bound to real ones before it runs)."""
    extra = {"peephole": True, "peephole_output": "current" if peep_current else "previous"} if peephole else {}
    cell = op.cell(input_size, hidden_size, bias, device="meta", **extra)
    for slot, kind, param in zip(cell.activation_slots(), kinds, params):
        setattr(cell, slot, cpp.activation(kind, param))
    return cell


# -- registration -----------------------------------------------------------------------------------


# (namespace, op name) -> the same operator as an autograd function with setup_context, for torch.func
_TRANSFORMABLE: dict[tuple[str, str], type[torch.autograd.Function]] = {}
# The operators' namespaces and their kernels by device: ``gatelab`` runs the C++ loops on the CPU and
# the Triton loops on CUDA; ``gatelab_triton`` runs the Triton loops on both (on the CPU under Triton's
# interpreter: how the GPU loop is tested without a GPU, see gpu.py).
TRITON_NAMESPACE = "gatelab_triton"
_KERNELS = {NAMESPACE: {"cpu": _cpp, "cuda": _triton}, TRITON_NAMESPACE: {"cpu": _triton, "cuda": _triton}}


def _no_second_derivative(op: CellOp) -> Callable[..., None]:
    def backward(ctx, *grads):
        raise RuntimeError(f"gatelab: a derivative of torch.ops.gatelab.{op.backward_name} was asked for (a torch.func "
                           "transform over torch.func.grad, e.g. a Hessian): not supported on the fused engine's "
                           "operators; autograd.grad(..., create_graph=True) gives second derivatives (but for the "
                           "layer-norm LSTM), or build the "
                           "layer with backend='reference'")

    return backward


def _vmap_by_loop(fn: Callable[..., tuple[Tensor, ...]]) -> Callable[..., Any]:
    """A torch.vmap rule for an operator: run it once per entry of the mapped dimension and stack the
    results (correct for every argument being mapped or not; per-sample gradients need exactly that)."""
    def rule(info, in_dims, *args):
        results = []
        for i in range(info.batch_size):
            results.append(fn(*(a.select(d, i) if isinstance(a, Tensor) and isinstance(d, int) else a
                                for a, d in zip(args, in_dims))))
        outs = tuple(torch.stack([r[k] for r in results]) for k in range(len(results[0])))
        return outs, (0,) * len(outs)

    return rule


def _calling(fn: Callable[..., tuple[Tensor, ...]]) -> Callable[..., tuple[Tensor, ...]]:
    def forward(*args):
        return fn(*args)

    return forward


def _register(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)
    for op in CELL_OPS:
        if namespace == TRITON_NAMESPACE and op.layer_norm:
            continue  # no Triton loop for the layer-norm LSTM
        forward, backward = f"{namespace}::{op.name}", f"{namespace}::{op.backward_name}"
        for qualname, schema in ((forward, forward_schema(op)), (backward, backward_schema(op))):
            torch.library.define(qualname, schema)
        for device, loops in _KERNELS[namespace].items():
            if op.layer_norm and loops is _triton:
                continue  # torch then says plainly that the operator has no kernel for that device
            torch.library.impl(forward, device, _forward_kernel(op, loops))
            torch.library.impl(backward, device, _backward_kernel(op, loops))
        torch.library.register_fake(forward, _forward_fake(op))
        torch.library.register_fake(backward, _backward_fake(op))
        torch.library.register_autograd(backward, _no_second_derivative(op))
        for qualname, name in ((forward, op.name), (backward, op.backward_name)):
            torch.library.register_vmap(qualname, _vmap_by_loop(getattr(ops, name)))
        _TRANSFORMABLE[namespace, op.backward_name] = type(f"{op.backward_name}_direction", (torch.autograd.Function,), {
            "forward": staticmethod(_calling(getattr(ops, op.backward_name))),
            "setup_context": staticmethod(lambda ctx, inputs, output: None),
            "backward": staticmethod(_no_second_derivative(op)), "generate_vmap_rule": True})
        setup, backward_fn = _setup_context(op), _autograd_backward(op, namespace)
        torch.library.register_autograd(forward, backward_fn, setup_context=setup)
        # torch.func transforms (grad, jacrev) need an autograd.Function with setup_context, which the
        # operator's registered autograd is not (torch 2.13): the same formula as one
        _TRANSFORMABLE[namespace, op.name] = type(f"{op.name}_direction", (torch.autograd.Function,), {
            "forward": staticmethod(_calling(getattr(ops, op.name))),
            "setup_context": staticmethod(setup), "backward": staticmethod(backward_fn), "generate_vmap_rule": True})


_register(NAMESPACE)
_register(TRITON_NAMESPACE)


# -- the engine's entry -----------------------------------------------------------------------------


def run(cell: RecurrentCell, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None, reverse: bool,
        rec_mask: Tensor | None, W_hh: Tensor, zoneout: tuple[Tensor | None, ...] | None,
        namespace: str = NAMESPACE) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One direction of ``cell`` through its forward operator in ``namespace`` (the contract of
    :meth:`gatelab.engines.base.DirectionEngine.run_direction`)."""
    op = for_cell(cell)
    n = len(op.states)
    kinds, params = [], []
    for act in cell.activation_slots().values():
        k, p = cpp._kind(act)
        kinds.append(k)
        params.append(p)
    if lengths is not None:
        lengths = lengths.to("cpu", torch.int64)
    zone = tuple(zoneout) if zoneout is not None else (None,) * n
    a = {"W_hh": W_hh, **{f"{s}0": t for s, t in zip(op.states, state)}, "lengths": lengths, "rec_mask": rec_mask,
         **{f"z{s}": z for s, z in zip(op.states, zone)}, "kinds": kinds, "params": params, "reverse": reverse}
    if op.layer_norm:
        # the input side LN(W_ih x) ⊙ g_ih + b for all steps under autograd, the recurrence (with the
        # norms of W_hh h and c') in the operator
        G = cell.weight_ih.shape[0]
        xw = torch.nn.functional.layer_norm(torch.nn.functional.linear(x, cell.weight_ih), (G,), cell.ln_ih_weight,
                                            None, cell.layer_norm_eps)
        if cell.bias:
            xw = xw + (cell.bias_ih + cell.bias_hh)
        a.update(xw=xw, g_hh=cell.ln_hh_weight, g_c=cell.ln_c_weight, b_c=cell.ln_c_bias, eps=cell.layer_norm_eps)
    else:
        a.update(x=x, W_ih=cell.weight_ih, b_ih=cell.bias_ih, b_hh=cell.bias_hh)
    if op.peephole:
        a.update(w_ci=cell.weight_ci, w_cf=cell.weight_cf, w_co=cell.weight_co,
                 peep_current=cell.peephole_output == "current")
    arguments = forward_arguments(op)
    a["train"] = _keeps([a[k] for k, t in arguments if t.startswith("Tensor")])
    args = [a[k] for k, _ in arguments]
    # In training, eagerly or under a torch.func transform, the same formula as an autograd.Function: the
    # operator's registered autograd costs about 0.1 ms more per call in torch 2.13 (its fill_defaults
    # rebuilds the schema's argument list once per argument). Traced (compile, export, jit.trace), the
    # operator itself, so that graphs hold it with its autograd.
    outs = _TRANSFORMABLE[namespace, op.name].apply(*args) if a["train"] and (_eager() or _transforms_active()) else \
        getattr(getattr(torch.ops, namespace), op.name)(*args)
    return outs[0], tuple(outs[1:1 + n])


def _keeps(tensors: Sequence[Tensor | None]) -> bool:
    """Whether the forward keeps what its backward needs: when a gradient may be asked for. A
    torch.jit.trace graph always keeps (its check re-runs the graph without grad, which would
    otherwise record a different constant)."""
    return torch.jit.is_tracing() or (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                                        for t in tensors))


_non_strict_tracing = getattr(torch.compiler, "_is_non_strict_tracing", lambda: False)  # absent in some torch versions


def _eager() -> bool:
    """Whether this call runs eagerly, not traced by torch.compile, torch.export or torch.jit.trace."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or _non_strict_tracing())


def _transforms_active() -> bool:
    """Whether a torch.func transform (grad, vmap ...) is running."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


__all__ = ["CELL_OPS", "CellOp", "NAMESPACE", "TRITON_NAMESPACE", "for_cell", "reference_cell", "run", "save_z"]
