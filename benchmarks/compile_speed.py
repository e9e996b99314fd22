"""torch.compile against eager: the same gatelab layer, compiled (fullgraph, inductor) and not.

Same protocol as ``speed.py`` (shared/BENCHMARKING.md): one process, warm-up (which includes the
compilation; its time is reported apart), then interleaved pairs; medians and the median of the
per-pair ratios compiled / eager. Below 1.0 the compiled layer is faster.

Cases: a custom-activation LSTM and GRU (gates ``hard_sigmoid``, candidate ``relu``: the fused
engine's operators, one graph node per direction) and a default LSTM (eager: torch's oneDNN kernel;
compiled: the same kernel through ``torch.ops.gatelab.onednn_lstm``, since torch cannot trace its own
for training). Training step (forward + backward) and no-grad forward.

Then the fixed cost of one call, at T 1, B 1, size 8, where the kernels cost next to nothing: eager
and compiled microseconds of each gatelab layer and, for scale, of ``torch.nn.Linear`` and
``torch.nn.LSTM`` (compiled with ``torch._dynamo.config.allow_rnn``; torch cannot compile its training
step). What compiled adds there is torch.compile's own cost per call (guards, AOT autograd's wrappers),
which a layer whose kernel is the same compiled and eager cannot win back.

Usage: ``python benchmarks/compile_speed.py [--sizes 64 256] [--pairs 7] [--json out.json]``;
``--tiny`` is a seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from speed import compare, cpu_flags, cpu_model, infer_step, timed, train_step, write_atomic  # noqa: E402

import gatelab  # noqa: E402

CUSTOM = {"gate_activation": "hard_sigmoid", "candidate_activation": "relu"}
CASES = {  # label: (layer, options)
    "LSTM hard_sigmoid/relu": (gatelab.LSTM, CUSTOM),
    "GRU hard_sigmoid/relu": (gatelab.GRU, CUSTOM),
    "LSTM default activations": (gatelab.LSTM, {}),
}


def run(sizes: list[int], pairs: int, batch: int, T: int, backend: str) -> tuple[list[dict], dict]:
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    meta = {"machine": f"{cpu_model()} ({cpu_flags()})", "cores": threads, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "batch": batch, "seq_len": T, "pairs": pairs, "compile_backend": backend}
    rows = []
    for label, (cls, options) in CASES.items():
        for H in sizes:
            x = torch.randn(T, batch, H)
            model = cls(H, H, **options)
            compiled = torch.compile(model, fullgraph=True, backend=backend)
            for mode, make in (("fwd+bwd", train_step), ("fwd (no grad)", infer_step)):
                eager_fn = make(lambda x, m=model: m(x)[0], x)
                compiled_fn = make(lambda x, m=compiled: m(x)[0], x)
                start = time.perf_counter()
                compiled_fn()  # the first call compiles (the graph for this grad mode)
                compile_s = time.perf_counter() - start
                t_eager, t_compiled, ratio = compare(eager_fn, compiled_fn, pairs)
                rows.append({"case": label, "hidden": H, "mode": mode, "eager_engine": model.engine_name,
                             "eager_ms": round(t_eager, 3), "compiled_ms": round(t_compiled, 3),
                             "compiled_over_eager": round(ratio, 3), "compile_s": round(compile_s, 1)})
                print(f"  {label} H={H} {mode}: compiled {t_compiled:.2f} ms, eager {t_eager:.2f} ms "
                      f"({model.engine_name}), ratio {ratio:.2f} (compiling took {compile_s:.1f} s)",
                      file=sys.stderr, flush=True)
            torch._dynamo.reset()
    return rows, meta


FIXED_CASES = {  # label: (a module taking (T, B, 8), the mode torch.compile is known to refuse)
    "torch.nn.Linear": (lambda: torch.nn.Linear(8, 8), None),
    "torch.nn.LSTM (allow_rnn)": (lambda: torch.nn.LSTM(8, 8), "fwd+bwd"),  # torch cannot compile its training
    "gatelab.LSTM default activations": (lambda: gatelab.LSTM(8, 8), None),
    "gatelab.LSTM hard_sigmoid/relu": (lambda: gatelab.LSTM(8, 8, **CUSTOM), None),
}


def _first(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _repeat(fn, calls: int):
    def run() -> None:
        for _ in range(calls):
            fn()
    return run


def fixed_costs(pairs: int, calls: int, backend: str) -> list[dict]:
    """Microseconds per call at T 1, B 1, size 8, eager and compiled, interleaved pairs of ``calls``
    calls each. Where torch.compile refuses torch's own LSTM (its training step) the row keeps the
    error instead of the compiled time; any other failure stops the run."""
    x = torch.randn(1, 1, 8)
    rows = []
    for label, (make, refused) in FIXED_CASES.items():
        model = make()
        with torch._dynamo.config.patch(allow_rnn=True):  # only torch.nn.LSTM reads it
            compiled = torch.compile(model, fullgraph=True, backend=backend)
            for mode, step in (("fwd+bwd", train_step), ("fwd (no grad)", infer_step)):
                eager_fn = step(lambda x, m=model: _first(m(x)), x)
                compiled_fn = step(lambda x, m=compiled: _first(m(x)), x)
                row = {"case": label, "mode": mode}
                try:
                    compiled_fn()
                except Exception as e:
                    if mode != refused:
                        raise
                    first_line = (str(e).splitlines() or [""])[0][:80]
                    loop = _repeat(eager_fn, calls)
                    loop()
                    eager_us = statistics.median(timed(loop) for _ in range(pairs)) * 1e3 / calls
                    rows.append({**row, "eager_us": round(eager_us, 1), "compiled_us": None,
                                 "error": f"{type(e).__name__}: {first_line}"})
                    print(f"  fixed cost, {label} {mode}: eager {eager_us:.0f} us, torch.compile fails "
                          f"({rows[-1]['error']})", file=sys.stderr, flush=True)
                    torch._dynamo.reset()
                    continue
                t_eager, t_compiled, _ = compare(_repeat(eager_fn, calls), _repeat(compiled_fn, calls), pairs)
                eager_us, compiled_us = t_eager * 1e3 / calls, t_compiled * 1e3 / calls
                rows.append({**row, "eager_us": round(eager_us, 1), "compiled_us": round(compiled_us, 1),
                             "compiled_minus_eager_us": round(compiled_us - eager_us, 1)})
                print(f"  fixed cost, {label} {mode}: eager {eager_us:.0f} us, compiled {compiled_us:.0f} us",
                      file=sys.stderr, flush=True)
        torch._dynamo.reset()
    return rows


def markdown(rows: list[dict], meta: dict, fixed: list[dict]) -> str:
    lines = [
        f"Machine: {meta['machine']}, {meta['cores']} cores, torch {meta['torch']} with {meta['threads']} threads. "
        f"Batch {meta['batch']}, sequence {meta['seq_len']}, float32, one layer, {meta['pairs']} interleaved pairs; "
        f"torch.compile(fullgraph=True, backend={meta['compile_backend']!r}).",
        "",
        "| layer | H | mode | eager engine | eager ms | compiled ms | compiled / eager | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['hidden']} | {r['mode']} | {r['eager_engine']} | {r['eager_ms']:.2f} | "
                     f"{r['compiled_ms']:.2f} | {r['compiled_over_eager']:.2f}x | {r['compile_s']:.1f} |")
    lines += ["", f"Fixed cost of one call: T 1, B 1, size 8, medians of {meta['pairs']} interleaved pairs of "
              f"{meta['fixed_calls']} calls.", "",
              "| module | mode | eager µs | compiled µs | compiled − eager µs |", "|---|---|---|---|---|"]
    for r in fixed:
        if r["compiled_us"] is None:
            error = r["error"].replace("|", "\\|")
            lines.append(f"| {r['case']} | {r['mode']} | {r['eager_us']:.0f} | torch.compile fails: {error} | |")
        else:
            lines.append(f"| {r['case']} | {r['mode']} | {r['eager_us']:.0f} | {r['compiled_us']:.0f} | "
                         f"{r['compiled_minus_eager_us']:+.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    p.add_argument("--json", type=Path)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI)")
    p.add_argument("--fixed-calls", type=int, default=200, help="calls per timing of the fixed cost (default: 200)")
    args = p.parse_args(argv)
    if args.tiny:
        args.sizes, args.pairs, args.batch, args.seq_len, args.backend = [8], 1, 4, 5, "aot_eager"
        args.fixed_calls = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # inductor calls torch.jit.script_method (torch 2.13)
        rows, meta = run(args.sizes, args.pairs, args.batch, args.seq_len, args.backend)
        fixed = fixed_costs(args.pairs, args.fixed_calls, args.backend)
    meta["fixed_calls"] = args.fixed_calls
    table = markdown(rows, meta, fixed)
    print(table)
    if args.json:
        write_atomic(args.json, json.dumps({"meta": meta, "rows": rows, "fixed_cost": fixed}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
