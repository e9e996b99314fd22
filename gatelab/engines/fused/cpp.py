"""The C++ time loops of the fused engine: compiled at first use, cached, loaded as torch ops.

Only a C++ compiler is needed (no ninja, nothing downloaded): ``kernels.cpp`` is compiled with the
compiler in ``$CXX`` (default ``c++``) against the installed torch's headers into
``$GATELAB_CACHE/fused/<hash>/`` (default ``~/.cache/gatelab``); the hash covers the source, torch's
version, the flags and the CPU, so a cached build is never stale. A failed build warns once and
the engine uses its pure-PyTorch loop; ``strict=True`` layers raise instead.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.parametrize import type_before_parametrizations

from ...activations import Activation
from ...activations import get as get_activation
from ...cells import ElmanCell, GatedStateCell, GRUCell, LSTMCell, RecurrentCell

# Activation kinds the kernels know, in the order of the C++ enum.
KINDS = ("identity", "sigmoid", "hard_sigmoid", "elliott", "tanh", "hardtanh", "softsign", "relu",
         "leaky_relu", "elu", "selu", "gelu", "silu", "softplus")
_DEFAULT_PARAM = {"hard_sigmoid": 1 / 6, "leaky_relu": 0.01, "elu": 1.0}
# Not -ffast-math: linking with it sets flush-to-zero for the whole process (crtfastmath).
# -fopenmp: at::parallel_for is a header template that runs in parallel only in code compiled with OpenMP
# (else it calls its function inline); the library then uses the libgomp torch has already loaded.
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
         "-fassociative-math", "-freciprocal-math", "-ffp-contract=fast", "-w"]
# The cell classes the kernels have loops for; they take each cell's activations in the order of
# its ``slots`` (LSTM: sigma_i, sigma_f, phi, sigma_o, psi).
CELLS = (LSTMCell, GRUCell, ElmanCell, GatedStateCell)
DEVICE_BLOCKER = "the C++ loop runs on the CPU"
DTYPE_BLOCKER = "the C++ loop runs float32 and float64 (bfloat16 and float16 in float32)"
REDUCED = (torch.bfloat16, torch.float16)  # stored in the layer's dtype, computed in float32

# Compiled together into one library; kernels_scan.cpp (the scan cells' loops, op namespace gatelab_scan)
# is independent of kernels.cpp.
SOURCES = ("kernels.cpp", "kernels_scan.cpp")
HEADERS = ("vmath.h",)  # included by both; part of the cache key

_lock = threading.Lock()
_state: dict[str, Any] = {"loaded": False, "error": None}


def cache_dir() -> Path:
    return Path(os.environ.get("GATELAB_CACHE", Path.home() / ".cache" / "gatelab")) / "fused"


def _cpu_id() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def _arch_flags() -> list[str]:
    return ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []


def _build(sources: list[Path], out: Path) -> None:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH (set $CXX)")
    lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [cxx, *FLAGS, *_arch_flags(), f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           *(f"-I{p}" for p in cpp_extension.include_paths()), *map(str, sources), "-o", str(out),
           f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{lib}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        names = " ".join(s.name for s in sources)
        raise RuntimeError(f"compiling {names} failed ({' '.join(cmd[:3])} ...):\n{result.stderr[-3000:]}")


def load(strict: bool = False) -> bool:
    """Compile (once, cached) and load the kernels; True when they are usable.

    On failure: warn once and return False, or raise ``RuntimeError`` when ``strict``.
    """
    if _state["loaded"]:  # the common case, without the lock (which torch.compile cannot enter)
        return True
    with _lock:
        if _state["loaded"]:
            return True
        if _state["error"] is None and os.environ.get("GATELAB_NO_CPP"):
            _state["error"] = "disabled by $GATELAB_NO_CPP"
        if _state["error"] is None:
            try:
                sources = [Path(__file__).with_name(name) for name in SOURCES]
                headers = [Path(__file__).with_name(name) for name in HEADERS]
                key = hashlib.sha256(b"\0".join([*(s.read_bytes() for s in [*sources, *headers]), torch.__version__.encode(),
                                                 sys.version.encode(), " ".join(FLAGS + _arch_flags()).encode(),
                                                 _cpu_id().encode()]))
                target = cache_dir() / key.hexdigest()[:20] / "gatelab_fused.so"
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                        built = Path(tmp) / target.name
                        _build(sources, built)
                        os.replace(built, target)  # atomic: a half-written library is never loaded
                torch.ops.load_library(str(target))
                _state["loaded"] = True
                return True
            except Exception as e:  # a failed build must never break gatelab
                _state["error"] = f"{type(e).__name__}: {e}"
                if not strict:
                    warnings.warn(f"gatelab: the fused engine's C++ kernels are unavailable ({_state['error'][:500]}); "
                                  "using its pure-PyTorch loop", RuntimeWarning, stacklevel=3)
        if strict:
            raise RuntimeError(f"gatelab: the fused engine's C++ kernels are unavailable: {_state['error']}")
        return False


def loaded() -> bool:
    return bool(_state["loaded"])


def failed() -> bool:
    """True once a build or load has failed (or $GATELAB_NO_CPP disabled the kernels)."""
    return not _state["loaded"] and (_state["error"] is not None or bool(os.environ.get("GATELAB_NO_CPP")))


def status() -> str:
    """A line for ``explain()``: whether the C++ kernels are loaded, untried or failed."""
    if _state["loaded"]:
        return "C++ kernels loaded"
    if _state["error"]:
        return f"C++ kernels unavailable ({_state['error'][:200]})"
    return "C++ kernels not built yet (built at first use)"


def _kind(act: Any) -> tuple[int, float] | None:
    if not isinstance(act, Activation) or act.kind not in KINDS:
        return None
    param = act.param if act.param is not None else _DEFAULT_PARAM.get(act.kind, 0.0)
    return KINDS.index(act.kind), float(param)


def activation(kind: int, param: float) -> Activation:
    """The registry entry a kernel kind and its parameter stand for (the inverse of :func:`_kind`)."""
    name = KINDS[kind]
    return get_activation(f"{name}:{param!r}" if name in _DEFAULT_PARAM else name)


def cell_blockers(cell: RecurrentCell) -> list[str]:
    """Why the C++ loop cannot run ``cell`` (the pure-PyTorch loop still can)."""
    out = []
    if type_before_parametrizations(cell) not in CELLS:
        return [f"no C++ loop for {type(cell).__name__}"]
    if isinstance(cell, LSTMCell):
        for opt in ("coupled", "proj_size"):
            if getattr(cell, opt):
                out.append(f"{opt} runs on the pure-PyTorch loop")
        if cell.peephole and cell.layer_norm:
            out.append("the C++ layer-norm loop has no peepholes")
        if cell.gates != "ifo":
            out.append("removed gates run on the pure-PyTorch loop")
    if isinstance(cell, GRUCell) and not cell.reset_after:
        out.append("reset_after=False runs on the pure-PyTorch loop")
    if out:
        return out
    for slot, act in cell.activation_slots().items():
        if _kind(act) is None:
            out.append(f"{slot} ({getattr(act, 'key', type(act).__name__)}) has no C++ kernel")
    if cell.weight_ih.device.type != "cpu":
        out.append(f"{DEVICE_BLOCKER}, parameters are on {cell.weight_ih.device}")
    if cell.weight_ih.dtype not in (torch.float32, torch.float64, *REDUCED):
        out.append(f"{DTYPE_BLOCKER}, parameters are {cell.weight_ih.dtype}")
    return out


def step_product(cell: RecurrentCell) -> str:
    """What the loaded C++ loop runs a cell's per-step product on (``explain()``): gatelab's AVX-512 kernel
    (float32 and the reduced dtypes, which the loop computes in float32), else the BLAS or oneDNN."""
    if cell.weight_ih.dtype == torch.float64:
        return "the BLAS (float64)"
    if isinstance(cell, LSTMCell) and cell.layer_norm:
        return "the BLAS or oneDNN, by size"
    lib = str(torch.ops.gatelab_fused.gemm_library(1, 1, 1, False, "loop"))
    return {"AVX-512 kernel": "gatelab's AVX-512 kernel", "BLAS": "the BLAS"}.get(lib, lib)


def _needs_input(kind: int, param: float) -> bool:
    """Whether the kernel's derivative for this kind reads the pre-activation (else the output)."""
    name = KINDS[kind]
    return name in ("gelu", "silu") or (name in ("leaky_relu", "elu") and param <= 0)


def matmul(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a @ b (+ bias)`` for the engine's large products: through the kernels' ``matmul`` (oneDNN where it
    is faster than the BLAS on this CPU, see kernels.cpp) once they are loaded, else ``torch.mm``/``addmm``."""
    if _state["loaded"] and a.dtype == b.dtype == torch.float32 and a.device.type == "cpu" == b.device.type:
        return torch.ops.gatelab_fused.matmul(a, b, bias)
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)

