"""The fused engine's GPU loop: Triton kernels (:mod:`.triton_kernels`) for the LSTM, GRU (reset-after),
Elman and gated-state cells, with any registered activation that has a Triton form in any slot.

These are the CUDA implementations of the fused operators of :mod:`.ops` (``torch.ops.gatelab.lstm``
and the rest): the functions here have the C++ loops' signatures and return what they return, so the
operators' Python around the loop (the input projection before it, the weight gradients as matrix
products after it, autograd, ``torch.compile``, ``torch.export``) is shared by both devices.

Two forms, by size (:func:`form`; ``explain()`` names the one that runs):

- **persistent**: one kernel launch per direction; the time loop runs inside the kernel, one program
  per tile of 16 batch rows, the recurrent weights held on chip when a gate block fits one tile
  (``RESIDENT``) and read through the cache otherwise;
- **per-step**: for weights that do not fit, each step's recurrent product is one cuBLAS product and
  the rest one fused elementwise kernel; on CUDA the whole loop is captured as a CUDA graph and
  replayed, so kernel launches do not dominate.

Under Triton's interpreter (``TRITON_INTERPRET=1``) the same kernels run on the CPU: with
``GATELAB_TRITON=interpret`` as well, the fused engine runs CPU tensors on this loop, which is how
the kernels are tested without a GPU. ``GATELAB_TRITON=off`` disables the loop;
``GATELAB_TRITON_FORM=persistent`` or ``per_step`` overrides the choice of form.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.parametrize import type_before_parametrizations

from ...activations import Activation
from ...cells import LSTMCell, RecurrentCell
from . import cpp, ops

CPU_BLOCKER = "the Triton loop runs on CUDA (on the CPU under Triton's interpreter with GATELAB_TRITON=interpret)"
EXTRA_HINT = "pip install 'gatelab[triton]' (on a CUDA machine the torch wheel brings triton)"
FORMS = ("persistent", "per_step")
# The gate blocks' recurrent weights are held on chip (in registers, one tile per block) up to this size,
# and in 16-bit only beyond a 32 x 32 tile: larger float32 tiles (tl.dot off the tensor cores) spill to
# local memory (checked on the sm_90 cubins, tests/test_triton.py).
RESIDENT_BYTES = 32 * 1024
RESIDENT_TILE_32BIT = 32
# The persistent form runs while one direction's recurrent weights are at most this large: held in
# registers where resident() says so, else re-read each step from the multiprocessor's L1 (256 KiB
# with shared memory on Hopper), which holds them after the first step.
PERSISTENT_BYTES = 64 * 1024
BLOCK_B = 16  # batch rows per program (tl.dot needs 16)

_state: dict[str, Any] = {"kernels": {}, "acts": {}, "last": None}  # kernels, activations by mode


# -- availability ------------------------------------------------------------------------------------


def mode() -> str:
    """``"off"``, ``"interpret"`` (CPU tensors run the kernels under Triton's interpreter) or ``"cuda"``."""
    value = os.environ.get("GATELAB_TRITON", "").strip().lower()
    if value in ("0", "off", "no", "false"):
        return "off"
    if value == "interpret":
        return "interpret"
    if value not in ("", "1", "on", "cuda"):
        raise ValueError(f"GATELAB_TRITON must be 'interpret', 'off' or unset, got {value!r}")
    return "cuda"


def kernels() -> ModuleType:
    """The kernel module for the current mode, loaded at first use: under the interpreter when
    ``GATELAB_TRITON=interpret`` (``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel,
    so each mode has its own copy of the module)."""
    which = _which()
    if which not in _state["kernels"]:
        _state["kernels"][which] = _load_module(f"gatelab_triton_kernels_{which}", Path(__file__).with_name(
            "triton_kernels.py"))
    return _state["kernels"][which]


def _which() -> str:
    return "interpret" if mode() == "interpret" else "cuda"


def _load_module(name: str, path: Path) -> ModuleType:
    """Import ``path`` as ``name`` with ``triton.jit`` in the current mode (it reads TRITON_INTERPRET
    when it decorates; the kernels use only triton.language's builtins, which follow the mode of the
    kernel that calls them)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"gatelab: the fused engine's GPU loop needs triton ({e}); {EXTRA_HINT}") from e
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if _which() == "interpret" else "0"
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
    return module


def unavailable() -> list[str]:
    """Why the Triton loop cannot run at all here (empty: it can)."""
    if mode() == "off":
        return ["the Triton loop is disabled by GATELAB_TRITON=off"]
    if importlib.util.find_spec("triton") is None:
        return [f"the Triton loop needs triton, which is not installed ({EXTRA_HINT})"]
    return []


def cell_blockers(cell: RecurrentCell) -> list[str]:
    """Why the Triton loop cannot run ``cell`` as configured (empty: it can)."""
    device = cell.weight_ih.device.type
    if device == "cpu" and mode() != "interpret":
        return [CPU_BLOCKER]
    if device not in ("cpu", "cuda"):
        return [f"the Triton loop runs on CUDA, parameters are on {cell.weight_ih.device}"]
    if device == "cuda" and mode() == "interpret":
        return ["GATELAB_TRITON=interpret runs the Triton loop on CPU tensors only"]
    if device == "cuda" and (cap := torch.cuda.get_device_capability(cell.weight_ih.device)) < (7, 0):
        return [f"the Triton loop needs a GPU of compute capability 7.0 or newer, this one is {cap[0]}.{cap[1]}"]
    if device == "cuda" and cell.weight_ih.dtype in (torch.bfloat16, torch.float16) and \
            torch.cuda.get_device_capability(cell.weight_ih.device) < (8, 0):
        return ["the Triton loop runs 16-bit layers on GPUs of compute capability 8.0 (Ampere) or newer"]
    if type_before_parametrizations(cell) not in cpp.CELLS:
        return [f"no Triton loop for {type(cell).__name__}"]
    out = []
    if isinstance(cell, LSTMCell):
        for opt in ("coupled", "proj_size", "layer_norm", "peephole"):
            if getattr(cell, opt):
                out.append(f"{opt} is not on the Triton loop")
        if cell.gates != "ifo":
            out.append("removed gates are not on the Triton loop")
    elif getattr(cell, "reset_after", True) is False:
        out.append("reset_after=False is not on the Triton loop")
    for slot, act in cell.activation_slots().items():
        if not isinstance(act, Activation) or act.triton is None or cpp._kind(act) is None:
            out.append(f"{slot} ({getattr(act, 'key', type(act).__name__)}) has no Triton form")
    if cell.weight_ih.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        out.append(f"the Triton loop runs floating-point parameters, these are {cell.weight_ih.dtype}")
    return out


# -- activations ---------------------------------------------------------------------------------------


def activation_functions(kind: int, param: float) -> tuple[Any, Any]:
    """The ``@triton.jit`` forward ``f(x)`` and derivative ``d(x, y)`` of a kernel kind, generated from
    the registry entry's Triton form into a small module under the cache (written atomically, keyed
    by its text) and imported: each slot's activation is compiled into the kernels. Looked up per call
    of the loop: the source is built and hashed once per kind, parameter and mode."""
    cached = (_which(), kind, param)
    if cached not in _state["acts"]:
        act = cpp.activation(kind, param)
        if act.triton is None:
            raise ValueError(f"gatelab: activation {act.key!r} has no Triton form")
        forward, derivative = act.triton
        source = ("import triton\nimport triton.language as tl\n\n\n@triton.jit\ndef forward(x):\n"
                  f"    return {forward}\n\n\n@triton.jit\ndef derivative(x, y):\n    return {derivative}\n")
        key = hashlib.sha256(source.encode()).hexdigest()[:20]
        path = cpp.cache_dir().parent / "triton" / f"act_{key}.py"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
                f.write(source)
            os.replace(f.name, path)  # atomic: a half-written module is never imported
        module = _load_module(f"gatelab_triton_act_{key}_{_which()}", path)
        _state["acts"][cached] = (module.forward, module.derivative)
    return _state["acts"][cached]


def _slots(kinds: Sequence[int], params: Sequence[float], n: int, which: int) -> list[Any]:
    fns = [activation_functions(k, p)[which] for k, p in zip(kinds, params)]
    return fns + [fns[0]] * (n - len(fns))  # unused slots: any function


# -- form and tiles --------------------------------------------------------------------------------------


def resident(gates: int, hidden: int, dtype: torch.dtype) -> bool:
    """Whether one tile of each gate block's recurrent weights fits on chip (see RESIDENT_BYTES)."""
    tile = max(16, triton_next_pow2(hidden))
    size = dtype.itemsize
    return gates * tile * tile * size <= RESIDENT_BYTES and (size == 2 or tile <= RESIDENT_TILE_32BIT)


def form(gates: int, hidden: int, dtype: torch.dtype) -> str:
    """Which form runs a direction: persistent while the recurrent weights stay on chip (in registers,
    :func:`resident`, or in L1: :data:`PERSISTENT_BYTES`), else per-step (``GATELAB_TRITON_FORM``
    overrides)."""
    forced = os.environ.get("GATELAB_TRITON_FORM", "").strip().lower()
    if forced:
        if forced not in FORMS:
            raise ValueError(f"GATELAB_TRITON_FORM must be one of {', '.join(FORMS)}, got {forced!r}")
        return forced
    size = dtype.itemsize
    fits = resident(gates, hidden, dtype) or gates * hidden * hidden * size <= PERSISTENT_BYTES
    return "persistent" if fits else "per_step"


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _tiles(hidden: int, resident: bool) -> tuple[int, int]:
    """(BH, BK): the unit tile and the reduction tile."""
    if resident:
        tile = max(16, triton_next_pow2(hidden))
        return tile, tile
    return 32, 32


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's precision for float32 operands: TF32 only where torch allows it for matrix products."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _upcast(W: Tensor) -> bool:
    """16-bit products in float32 under the interpreter (which gets them wrong); on CUDA in the weights' dtype."""
    return W.device.type != "cuda" and W.dtype in (torch.bfloat16, torch.float16)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- the loops, with the C++ loops' signatures -------------------------------------------------------------


_CELL = {"lstm": 0, "gru": 1, "elman": 2, "gated_state": 3}
_GATES = {op.name: op.width for op in ops.CELL_OPS}  # gate blocks per cell, as the operators define them


def _lengths(lengths: Tensor | None, device: torch.device) -> Tensor | None:
    return None if lengths is None else lengths.to(device=device, dtype=torch.int64).contiguous()


def _placeholder(t: Tensor | None, like: Tensor) -> Tensor:
    return like if t is None else t


def _on_device(fn):
    """Run ``fn`` with its tensors' CUDA device current (Triton launches on the current device)."""
    def guarded(name, first, *args):
        if first.device.type != "cuda":
            return fn(name, first, *args)
        with torch.cuda.device(first.device):
            return fn(name, first, *args)

    guarded.__doc__ = fn.__doc__
    return guarded


@_on_device
def _forward(name: str, xw: Tensor, W_hh: Tensor, b_hh: Tensor | None, states: Sequence[Tensor],
             lengths: Tensor | None, mask: Tensor | None, zh: Tensor | None, zc: Tensor | None,
             kinds: Sequence[int], params: Sequence[float], reverse: bool, save_z: bool, train: bool) -> list[Tensor]:
    """One direction's forward; returns what the C++ loop of ``name`` returns."""
    K_ = kernels()
    T, B, G = xw.shape
    H = states[0].shape[1]
    NG = _GATES[name]
    if T == 0:
        raise ValueError(f"gatelab fused: the loops need at least one time step, got shape {tuple(xw.shape)}")
    dev, dt, work = xw.device, xw.dtype, _work_dtype(xw.dtype)
    keep, n_rec = (T, T) if train else (1, 2)
    zero_init = lengths is not None
    new = (lambda *s: torch.zeros(s, device=dev, dtype=dt)) if zero_init else \
        (lambda *s: torch.empty(s, device=dev, dtype=dt))
    zone = zh is not None or zc is not None
    out = torch.empty(T, B, H, device=dev, dtype=dt)
    A = new(keep, B, G) if name != "elman" else xw.new_empty(0)
    write_s = True
    if name == "elman":
        C = new(keep, B, H) if not train or zone or lengths is not None else out
        write_s = C is not out
    else:
        C = new(keep, B, H)
    K = new(keep, B, H) if name in ("lstm", "gru") else xw.new_empty(0)
    X2 = new(keep, B, H) if zone and train and name in ("lstm", "gated_state") else xw.new_empty(0)
    HR = new(n_rec, B, H)
    HS = states[0].to(work).clone()
    CS = states[1].to(work).clone() if name == "lstm" else HS
    lengths = _lengths(lengths, dev)
    first = T - 1 if reverse else 0
    HR[first if train else 0] = states[0] if mask is None else states[0] * mask
    W = W_hh.contiguous()
    which = form(NG, H, W.dtype)
    on_chip = which == "persistent" and resident(NG, H, W.dtype)
    BH, BK = _tiles(H, on_chip)
    F = _slots(kinds, params, 5, 0)
    args = dict(CELL=_CELL[name], NG=NG, F0=F[0], F1=F[1], F2=F[2], F3=F[3], F4=F[4], REVERSE=reverse, TRAIN=train,
                SAVE_Z=save_z, WRITE_S=write_s, HAS_BHH=b_hh is not None, HAS_LEN=lengths is not None,
                HAS_MASK=mask is not None, HAS_ZH=zh is not None, HAS_ZC=zc is not None, HAS_X2=X2.numel() > 0,
                BB=BLOCK_B, BH=BH, BK=BK, UPCAST=_upcast(W), PRECISION=_precision(W.dtype))
    tensors = [xw, W, _placeholder(b_hh, W), HS, CS, out, _placeholder(A if A.numel() else None, xw), C,
               _placeholder(K if K.numel() else None, xw), HR, _placeholder(X2 if X2.numel() else None, xw),
               _placeholder(lengths, HS), _placeholder(mask, HS), _placeholder(zh, HS), _placeholder(zc, HS)]
    grid = (triton_cdiv(B, BLOCK_B),)
    _state["last"] = which if which == "per_step" or on_chip else "persistent (weights through L1)"
    if which == "persistent":
        K_.recurrent_forward[grid](*tensors, xw, T, B, H, 0, T, FUSED=True, RESIDENT=on_chip, **args)
    else:
        def loop(bufs: list[Tensor]) -> None:
            w, hr, gh = bufs[1], bufs[9], bufs[15]
            for k in range(T):
                t = T - 1 - k if reverse else k
                torch.mm(hr[t if train else k % 2].to(w.dtype), w.t(), out=gh)
                K_.recurrent_forward[grid](*bufs, T, B, H, k, 1, FUSED=False, RESIDENT=False, **args)

        key = ("forward", name, T, B, H, dt, tuple(kinds), tuple(params), reverse, train, save_z, write_s, args["PRECISION"],
               *(t is not None for t in (b_hh, lengths, mask, zh, zc)))
        _run_loop(loop, key, [*tensors, torch.empty(B, G, device=dev, dtype=W.dtype)], written=(0, 3, 4, 5, 6, 7, 8, 9, 10))
    final = [HS.to(dt)] + ([CS.to(dt)] if name == "lstm" else [])
    Z = xw if save_z else xw.new_empty(0)
    if name == "lstm":
        return [out, *final, Z, A, C, K, HR, X2]
    if name == "gru":
        return [out, *final, Z, A, K, C, HR]
    if name == "elman":
        return [out, *final, Z, C, HR]
    return [out, *final, Z, A, C, HR, X2]


@_on_device
def _backward(name: str, dout: Tensor, dfinal: Sequence[Tensor], Z: Tensor, A: Tensor, C: Tensor, K: Tensor,
              X2: Tensor, S0: Tensor, W_hh: Tensor, lengths: Tensor | None, mask: Tensor | None, zh: Tensor | None,
              zc: Tensor | None, kinds: Sequence[int], params: Sequence[float], reverse: bool) -> list[Tensor]:
    """One direction's backward through time; returns what the C++ backward of ``name`` returns."""
    K_ = kernels()
    T, B, H = dout.shape
    NG = _GATES[name]
    G = NG * H
    dev, dt, work = dout.device, C.dtype, _work_dtype(C.dtype)
    DH = dfinal[0].to(work).clone()
    DC = dfinal[1].to(work).clone() if name == "lstm" else DH
    DZ = torch.empty(T, B, G, device=dev, dtype=dt)
    DGH = torch.empty(T, B, G, device=dev, dtype=dt) if name == "gru" else DZ
    lengths = _lengths(lengths, dev)
    W = W_hh.contiguous()
    which = form(NG, H, W.dtype)
    BH, BK = _tiles(H, False)
    D = _slots(kinds, params, 5, 1)
    has_z = Z.numel() > 0
    if (zh is not None or zc is not None) and name in ("lstm", "gated_state") and X2.numel() != C.numel():
        raise RuntimeError("gatelab fused: zoneout backward needs the states the forward kept (CP / SN)")
    args = dict(CELL=_CELL[name], NG=NG, D0=D[0], D1=D[1], D2=D[2], D3=D[3], D4=D[4], REVERSE=reverse, HAS_Z=has_z,
                HAS_LEN=lengths is not None, HAS_MASK=mask is not None, HAS_ZH=zh is not None, HAS_ZC=zc is not None,
                HAS_X2=X2.numel() > 0, BB=BLOCK_B, BH=BH, BK=BK, UPCAST=_upcast(W),
                PRECISION=_precision(W.dtype))
    tensors = [dout.contiguous(), DH, DC, Z if has_z else A, A if A.numel() else C, C, K if K.numel() else C,
               X2 if X2.numel() else C, S0.contiguous(), W, DZ, DGH, _placeholder(lengths, DH),
               _placeholder(mask, DH), _placeholder(zh, DH), _placeholder(zc, DH)]
    grid = (triton_cdiv(B, BLOCK_B),)
    if which == "persistent":
        K_.recurrent_backward[grid](*tensors, T, B, H, T - 1, T, FUSED=True, **args)
    else:
        def loop(bufs: list[Tensor]) -> None:
            dh, w, dgh = bufs[1], bufs[9], bufs[11]
            for k in range(T - 1, -1, -1):
                t = T - 1 - k if reverse else k
                K_.recurrent_backward[grid](*bufs, T, B, H, k, 1, FUSED=False, **args)
                back = torch.mm(dgh[t], w).to(work)
                dh.add_(back if mask is None else back * bufs[13])

        key = ("backward", name, T, B, H, dt, tuple(kinds), tuple(params), reverse, has_z, X2.numel() > 0, args["PRECISION"],
               *(t is not None for t in (lengths, mask, zh, zc)))
        _run_loop(loop, key, tensors, written=(1, 2, 10, 11))
    d0 = [DH.to(dt)] + ([DC.to(dt)] if name == "lstm" else [])
    return [DZ, DGH, *d0] if name == "gru" else [DZ, *d0]


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# -- CUDA graphs for the per-step form ---------------------------------------------------------------------


GRAPH_MACS = 1 << 24  # a step's recurrent product below this many multiply-adds is launch-bound: graph it
GRAPH_BYTES = 64 << 20  # and the direction's buffers (each graph keeps a static copy) at most this large


def graph_worth_it(batch: int, hidden: int, gates: int, buffer_bytes: int = 0) -> bool:
    """Whether the per-step form replays as a CUDA graph: where a step's product is small enough that
    launches would dominate, and the buffers small enough that the graph's static copy of them (one
    per shape) costs little memory."""
    return batch * gates * hidden * hidden < GRAPH_MACS and buffer_bytes <= GRAPH_BYTES


def _run_loop(loop, key: tuple, buffers: list[Tensor], written: Sequence[int]) -> None:
    """Run the per-step form's ``loop(buffers)``: on CUDA as a CUDA graph (:func:`.graphs.run`, captured
    once per shape and replayed; ``GATELAB_CUDA_GRAPHS=0`` turns that off), elsewhere (the interpreter)
    directly."""
    if buffers[0].device.type != "cuda" or os.environ.get("GATELAB_CUDA_GRAPHS", "1") == "0" or \
            torch.cuda.is_current_stream_capturing():
        loop(buffers)
        return
    unique = {id(t): t for t in buffers}.values()
    if not graph_worth_it(key[3], key[4], _GATES[key[1]], sum(t.numel() * t.element_size() for t in unique)):
        loop(buffers)
        return
    if key[0] == "forward":
        _state["last"] = "per_step+graph"
    from . import graphs

    graphs.run(loop, key, buffers, written)


# The C++ loops' entry points (kernels.cpp's schemas), for ops.py's shared kernels.


def lstm_forward(xw, W_hh, h0, c0, lengths, mask, zh, zc, peep, peep_current, kinds, params, reverse, save_z, train):
    if peep is not None:
        raise RuntimeError("gatelab: the Triton loop has no peepholes (explain() routes such a cell elsewhere)")
    return _forward("lstm", xw, W_hh, None, (h0, c0), lengths, mask, zh, zc, kinds, params, reverse, save_z, train)


def lstm_backward(dout, dhT, dcT, Z, A, C, K, CP, c0, W_hh, lengths, mask, zh, zc, peep, peep_current, kinds, params,
                  reverse):
    return _backward("lstm", dout, (dhT, dcT), Z, A, C, K, CP, c0, W_hh, lengths, mask, zh, zc, kinds, params, reverse)


def gru_forward(xw, W_hh, b_hh, h0, lengths, mask, zh, kinds, params, reverse, save_z, train):
    return _forward("gru", xw, W_hh, b_hh, (h0,), lengths, mask, zh, None, kinds, params, reverse, save_z, train)


def gru_backward(dout, dhT, Z, A, GHn, S, h0, W_hh, lengths, mask, zh, kinds, params, reverse):
    return _backward("gru", dout, (dhT,), Z, A, S, GHn, S.new_empty(0), h0, W_hh, lengths, mask, zh, None, kinds,
                     params, reverse)


def elman_forward(xw, W_hh, h0, lengths, mask, zh, kind, param, reverse, save_z, train):
    return _forward("elman", xw, W_hh, None, (h0,), lengths, mask, zh, None, [kind], [param], reverse, save_z, train)


def elman_backward(dout, dhT, Z, S, W_hh, lengths, mask, zh, kind, param, reverse):
    empty = S.new_empty(0)
    return _backward("elman", dout, (dhT,), Z, empty, S, empty, empty, dhT, W_hh, lengths, mask, zh, None, [kind],
                     [param], reverse)


def gated_state_forward(xw, W_hh, s0, lengths, mask, zs, kinds, params, reverse, save_z, train):
    return _forward("gated_state", xw, W_hh, None, (s0,), lengths, mask, zs, None, kinds, params, reverse, save_z,
                    train)


def gated_state_backward(dout, dsT, Z, A, S, SN, s0, W_hh, lengths, mask, zs, kinds, params, reverse):
    return _backward("gated_state", dout, (dsT,), Z, A, S, S.new_empty(0), SN, s0, W_hh, lengths, mask, zs, None,
                     kinds, params, reverse)


def last_form() -> str | None:
    """The form the last forward call on this loop ran: ``"persistent"`` (weights in registers),
    ``"persistent (weights through L1)"``, ``"per_step"`` or ``"per_step+graph"`` (None before any; for
    benchmarks)."""
    return _state["last"]


def describe(cell: RecurrentCell) -> str:
    """``explain()``'s phrase for this loop running ``cell``."""
    gates = cell.weight_hh.shape[0] // cell.hidden_size
    which = form(gates, cell.hidden_size, cell.weight_hh.dtype)
    where = "under Triton's interpreter on the CPU" if cell.weight_ih.device.type == "cpu" else "on CUDA"
    if which == "persistent":
        held = ("the recurrent weights held in registers" if resident(gates, cell.hidden_size, cell.weight_hh.dtype)
                else "the recurrent weights re-read each step through L1")
        how = f"persistent kernel (the time loop inside one launch, {held})"
    else:
        how = ("per-step form (one cuBLAS product and one fused elementwise kernel per step"
               + (", the loop replayed as a CUDA graph where a step is small)" if where == "on CUDA" else ")"))
    return f"Triton loop {where}, {how}"
