"""torch.compile against eager: the same gatelab layer, compiled (fullgraph, inductor) and not.

Same protocol as ``speed.py`` (shared/BENCHMARKING.md): one process, warm-up (which includes the
compilation; its time is reported apart), then interleaved pairs; medians and the median of the
per-pair ratios compiled / eager. Below 1.0 the compiled layer is faster.

Cases: a custom-activation LSTM and GRU (gates ``hard_sigmoid``, candidate ``relu``: the fused
engine's operators, one graph node per direction) and a default LSTM (eager: torch's kernel; compiled:
the fused engine, since torch's RNN kernels do not trace). Training step (forward + backward) and
no-grad forward. Usage: ``python benchmarks/compile_speed.py [--sizes 64 256] [--pairs 7]
[--json out.json]``; ``--tiny`` is a seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from speed import compare, cpu_flags, cpu_model, infer_step, train_step, write_atomic  # noqa: E402

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


def markdown(rows: list[dict], meta: dict) -> str:
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
    args = p.parse_args(argv)
    if args.tiny:
        args.sizes, args.pairs, args.batch, args.seq_len, args.backend = [8], 1, 4, 5, "aot_eager"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # inductor calls torch.jit.script_method (torch 2.13)
        rows, meta = run(args.sizes, args.pairs, args.batch, args.seq_len, args.backend)
    table = markdown(rows, meta)
    print(table)
    if args.json:
        write_atomic(args.json, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
