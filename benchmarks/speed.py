"""Speed and memory of gatelab's engines against torch.nn and the naive Python loop.

Protocol (shared/BENCHMARKING.md): everything in one process; each pair of models shares weights,
is warmed up, then run alternately A, B, A, B ...; we report the median time of each and the median
of the per-pair ratios. The yardsticks, all in the same run:

* ``torch``: torch.nn.LSTM / GRU / RNN with default activations (what users have today);
* ``naive``: a per-step autograd loop in Python with the custom activations (what a user who needs
  them writes today);
* the machine's own limit: the recurrence's FLOPs per second next to one large float32 matmul's.

Usage: ``python benchmarks/speed.py [--sizes 64 128 256 512] [--cells lstm gru rnn] [--pairs 7]
[--json out.json] [--markdown out.md]``. ``--tiny`` runs a seconds-long smoke version (CI uses it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gatelab  # noqa: E402

CUSTOM = {"gate_activation": "hard_sigmoid", "candidate_activation": "relu"}  # cell activation stays tanh


@dataclass
class Row:
    cell: str
    hidden: int
    mode: str  # "fwd+bwd" or "fwd (no grad)"
    engine: str
    median_ms: float
    ratio_vs_torch: float
    ratio_vs_naive: float
    gflops: float
    peak_mb: float | None
    torch_peak_mb: float | None
    before_ms: float | None = None  # --before: the same fused layer on the products chosen before the kernel
    ratio_vs_before: float | None = None


# -- the models ----------------------------------------------------------------------------------


def build(cell: str, H: int, batch: int, T: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The contenders for one cell type and size, all with the same weights."""
    torch_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell]
    kw = {"nonlinearity": "relu"} if cell == "rnn" else {}
    ref = torch_cls(H, H, **kw)
    if cell == "rnn":
        fused = gatelab.RNN.from_torch(ref, backend="fused")  # relu: the headline Elman custom activation
    else:
        custom = dict(CUSTOM)
        fused = {"lstm": gatelab.LSTM, "gru": gatelab.GRU}[cell](H, H, backend="fused", **custom)
        fused.load_state_dict(ref.state_dict())
    naive = naive_loop(cell, fused)
    return {"torch": lambda x: ref(x)[0], "fused": lambda x: fused(x)[0], "naive": naive}


def naive_loop(cell: str, layer: gatelab.layers.RecurrentLayer) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a user writes today: a per-step loop of torch ops with the custom activations."""
    W_ih, W_hh, b_ih, b_hh = layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0

    def lstm(x: torch.Tensor) -> torch.Tensor:
        h = c_ = x.new_zeros(x.shape[1], W_hh.shape[1])
        outs = []
        for x_t in x:
            i, f, g, o = (x_t @ W_ih.t() + b_ih + h @ W_hh.t() + b_hh).chunk(4, 1)
            i, f, g, o = F.hardsigmoid(i), F.hardsigmoid(f), torch.relu(g), F.hardsigmoid(o)
            c_ = f * c_ + i * g
            h = o * torch.tanh(c_)
            outs.append(h)
        return torch.stack(outs)

    def gru(x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[1], W_hh.shape[1])
        outs = []
        for x_t in x:
            xr, xz, xn = (x_t @ W_ih.t() + b_ih).chunk(3, 1)
            hr, hz, hn = (h @ W_hh.t() + b_hh).chunk(3, 1)
            r, z = F.hardsigmoid(xr + hr), F.hardsigmoid(xz + hz)
            n = torch.relu(xn + r * hn)
            h = (1 - z) * n + z * h
            outs.append(h)
        return torch.stack(outs)

    def rnn(x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[1], W_hh.shape[1])
        outs = []
        for x_t in x:
            h = torch.relu(x_t @ W_ih.t() + b_ih + h @ W_hh.t() + b_hh)
            outs.append(h)
        return torch.stack(outs)

    return {"lstm": lstm, "gru": gru, "rnn": rnn}[cell]


# -- measuring -----------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def train_step(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        out = model(x)
        out.backward(torch.ones_like(out))
    return run


def infer_step(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(x)
    return run


def peak_memory_mb(fn: Callable[[], None]) -> float | None:
    """Peak memory torch allocates while ``fn`` runs (MB), from the profiler's per-operator records.

    Each operator's self allocation (allocated minus freed, children excluded) is booked at its start;
    the peak of the running sum is the figure. Allocations outside torch operators are not seen.
    """
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted(prof.events(), key=lambda e: e.time_range.start)
        level = peak = 0
        for e in events:
            level += e.self_cpu_memory_usage
            peak = max(peak, level)
        return peak / 2**20
    except Exception:  # the profiler is optional for this figure
        return None


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / (best / 1e3) / 1e9


def recurrence_flops(cell: str, H: int, batch: int, T: int, backward: bool) -> float:
    """Matrix-product FLOPs of one layer with input size H: the forward has two products (input and
    recurrent), the backward three (dW_ih, dW_hh and the recurrent dh; the data needs no dx)."""
    G = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    product = 2 * T * batch * H * G * H
    return product * (5 if backward else 2)


def compare(a: Callable[[], None], b: Callable[[], None], pairs: int, warmup: int = 2) -> tuple[float, float, float]:
    """Median ms of a, of b, and median of the per-pair ratios b/a, alternating a, b."""
    for _ in range(warmup):
        a(), b()
    ta, tb, ratios = [], [], []
    for _ in range(pairs):
        x, y = timed(a), timed(b)
        ta.append(x)
        tb.append(y)
        ratios.append(y / x)
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def on_library(choice: int, fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with the fused C++ loops' products forced onto one library (kernels.cpp set_gemm_library)."""
    def run() -> None:
        previous = torch.ops.gatelab_fused.set_gemm_library(choice)
        try:
            fn()
        finally:
            torch.ops.gatelab_fused.set_gemm_library(previous)
    return run


def run(sizes: list[int], cells: list[str], pairs: int, batch: int, T: int, memory: bool,
        before: bool = False) -> tuple[list[Row], dict]:
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    peak = matmul_gflops()
    meta = {
        "machine": cpu_model(), "cpu_flags": cpu_flags(), "cores": threads, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "matmul_gflops": round(peak, 1), "batch": batch, "seq_len": T,
        "fused_impl": gatelab.engines.fused.implementation(), "pairs": pairs,
        "libraries": f"MKL {'yes' if torch.backends.mkl.is_available() else 'no'}, oneDNN "
                     f"{'enabled' if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled else 'off'}",
        "step_gemm": {cell: {H: step_gemm_library(cell, H, batch) for H in sizes} for cell in cells},
        "dense_gemm": {H: dense_gemm_library(H, batch * T) for H in sizes},
    }
    rows: list[Row] = []
    for cell in cells:
        for H in sizes:
            x = torch.randn(T, batch, H)
            models = build(cell, H, batch, T)
            for mode, make in (("fwd+bwd", train_step), ("fwd (no grad)", infer_step)):
                fns = {k: make(m, x) for k, m in models.items()}
                t_torch, t_fused, r_torch = compare(fns["torch"], fns["fused"], pairs)
                t_naive, t_fused2, r_naive = compare(fns["naive"], fns["fused"], pairs)
                t_before = r_before = None
                if before:
                    t_before, _, r_before = compare(on_library(GEMM_LIBRARIES["by-size"], fns["fused"]), fns["fused"],
                                                    pairs)
                fl = recurrence_flops(cell, H, batch, T, mode == "fwd+bwd")
                mem = peak_memory_mb(fns["fused"]) if memory and mode == "fwd+bwd" else None
                tmem = peak_memory_mb(fns["torch"]) if memory and mode == "fwd+bwd" else None
                rows.append(Row(cell, H, mode, "fused", round(t_fused, 3), round(r_torch, 3), round(r_naive, 3),
                                round(fl / (t_fused / 1e3) / 1e9, 1), mem and round(mem, 1), tmem and round(tmem, 1),
                                t_before and round(t_before, 3), r_before and round(r_before, 3)))
                rows.append(Row(cell, H, mode, "torch", round(t_torch, 3), 1.0, round(t_torch / t_naive, 3),
                                round(fl / (t_torch / 1e3) / 1e9, 1), tmem and round(tmem, 1), tmem and round(tmem, 1)))
                rows.append(Row(cell, H, mode, "naive", round(t_naive, 3), round(t_naive / t_torch, 3), 1.0,
                                round(fl / (t_naive / 1e3) / 1e9, 1), None, None))
                print(f"  {cell} H={H} {mode}: fused {t_fused:.2f} ms = {r_torch:.2f}x torch, "
                      f"{1 / r_naive:.2f}x faster than naive", file=sys.stderr, flush=True)
    return rows, meta


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what platform says."""
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The vector-extension flags that decide which kernels the libraries pick."""
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return ""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    have = set(line.split(":", 1)[1].split())
    return " ".join(f for f in wanted if f in have)


GEMM_LIBRARIES = {"auto": 0, "blas": 1, "onednn": 2, "kernel": 3, "by-size": 4}


def step_gemm_library(cell: str, H: int, batch: int) -> str:
    """The library the fused C++ loop runs the per-step product ``(B × H)(H × G·H)`` on (float32)."""
    if gatelab.engines.fused.implementation() != "C++":
        return "PyTorch loop (torch.mm)"
    G = {"lstm": 4, "gru": 3, "rnn": 1}[cell] * H
    return str(torch.ops.gatelab_fused.gemm_library(batch, G, H, False, cell))


def dense_gemm_library(H: int, rows: int) -> str:
    """The library of the fused engine's large products (input projection (T·B × H)(H × 4H), gradients)."""
    if gatelab.engines.fused.implementation() != "C++":
        return "torch.mm"
    return str(torch.ops.gatelab_fused.gemm_library(rows, 4 * H, H, True))


def markdown(rows: list[Row], meta: dict) -> str:
    paths = "; ".join(f"{cell} " + ", ".join(f"H {H}: {lib}" for H, lib in by_h.items())
                      for cell, by_h in meta["step_gemm"].items())
    lines = [
        f"Machine: {meta['machine']} ({meta['cpu_flags']}), {meta['cores']} cores, torch {meta['torch']} with "
        f"{meta['threads']} threads (torch.set_num_threads), {meta['libraries']}; fused implementation: "
        f"{meta['fused_impl']}. Batch {meta['batch']}, sequence {meta['seq_len']}, float32, one layer, {meta['pairs']} "
        f"interleaved pairs. Largest 2048² float32 matmul: {meta['matmul_gflops']} GFLOP/s.",
        "",
        f"The fused loop's per-step product runs on: {paths}; its large products (the input projection of all "
        f"steps, the gradients after the loop) on: "
        + ", ".join(f"H {H}: {lib}" for H, lib in meta["dense_gemm"].items())
        + ". torch.nn runs its own kernels (oneDNN's RNN primitive where torch enables it).",
        "",
        "Custom activations: gates hard_sigmoid, candidate relu, cell tanh (Elman: relu). torch runs its defaults.",
        "",
        "| cell | H | mode | fused ms | fused / torch | naive / fused | torch ms | naive ms | fused GFLOP/s | "
        "fused peak MB | torch peak MB |" + (" fused before ms | fused / before |" if meta.get("before") else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if meta.get("before") else ""),
    ]
    by = {(r.cell, r.hidden, r.mode, r.engine): r for r in rows}
    for r in rows:
        if r.engine != "fused":
            continue
        t, n = by[(r.cell, r.hidden, r.mode, "torch")], by[(r.cell, r.hidden, r.mode, "naive")]
        mem = "" if r.peak_mb is None else f"{r.peak_mb:.1f}"
        tmem = "" if r.torch_peak_mb is None else f"{r.torch_peak_mb:.1f}"
        before = f" {r.before_ms:.2f} | {r.ratio_vs_before:.2f}x |" if r.before_ms is not None else ""
        lines.append(f"| {r.cell} | {r.hidden} | {r.mode} | {r.median_ms:.2f} | {r.ratio_vs_torch:.2f}x | "
                     f"{1 / r.ratio_vs_naive:.2f}x | {t.median_ms:.2f} | {n.median_ms:.2f} | {r.gflops:.1f} | {mem} | {tmem} |"
                     + before)
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn"], choices=["lstm", "gru", "rnn"])
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", type=Path, help="write the rows and machine info as JSON here")
    p.add_argument("--markdown", type=Path, help="write the markdown table here")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI)")
    p.add_argument("--gemm", choices=list(GEMM_LIBRARIES), default="auto",
                   help="the fused C++ loop's products: chosen by size and CPU (auto: the loops' per-step products "
                        "on gatelab's AVX-512 kernel where built, the rest by size), or forced (blas: MKL/the linked "
                        "BLAS everywhere, as before oneDNN was used; onednn everywhere; kernel: the AVX-512 kernel; "
                        "by-size: BLAS or oneDNN by size, as before the kernel)")
    p.add_argument("--before", action="store_true",
                   help="also time the fused layer on the products chosen before gatelab's kernel (BLAS/oneDNN by "
                        "size), interleaved with the fused layer as it runs otherwise (the automatic choice, or --gemm's)")
    args = p.parse_args(argv)
    if args.tiny:
        args.sizes, args.pairs, args.batch, args.seq_len = [8], 2, 2, 5
    if args.gemm != "auto" and gatelab.engines.fused.implementation() == "C++":
        torch.ops.gatelab_fused.set_gemm_library(GEMM_LIBRARIES[args.gemm])
    before = args.before and gatelab.engines.fused.implementation() == "C++"
    rows, meta = run(args.sizes, args.cells, args.pairs, args.batch, args.seq_len, not args.no_memory, before)
    meta["gemm"], meta["before"] = args.gemm, before
    table = markdown(rows, meta)
    print(table)
    if args.json:
        write_atomic(args.json, json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    if args.markdown:
        write_atomic(args.markdown, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
