"""Speed of options torch.nn has no kernel for (zoneout, layer norm), fused against reference and torch.nn.

Same protocol as ``speed.py`` (shared/BENCHMARKING.md): one process, shared weights, warm-up, then
interleaved pairs; medians and the median of per-pair ratios. For each option set and size:

* ``torch``: torch.nn.LSTM / GRU *without* the option (the builtin speed the option should keep);
* ``fused``: gatelab.LSTM / GRU with the option on the fused engine (``backend="fused"``, strict);
* ``reference``: the same layer on the autograd loop (what the option costs a user without gatelab's
  fused engine: a hand-written per-step loop).

Training mode for fwd+bwd (zoneout draws its masks every call), eval mode for the no-grad forward
(zoneout: the expectation). Usage: ``python benchmarks/options_speed.py [--sizes 128 256] [--pairs 7]
[--json out.json]``; ``--tiny`` is a seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from speed import compare, cpu_flags, cpu_model, infer_step, train_step, write_atomic  # noqa: E402

import gatelab  # noqa: E402

OPTIONS = {  # label: (cell, options)
    "LSTM zoneout (h 0.05, c 0.15)": ("lstm", {"zoneout": (0.05, 0.15)}),
    "LSTM zoneout 0.1 + hard_sigmoid gates": ("lstm", {"zoneout": 0.1, "gate_activation": "hard_sigmoid"}),
    "GRU zoneout 0.1": ("gru", {"zoneout": 0.1}),
    "LSTM layer_norm": ("lstm", {"layer_norm": True}),
    "LSTM layer_norm + hard_sigmoid gates": ("lstm", {"layer_norm": True, "gate_activation": "hard_sigmoid"}),
}
LAYERS = {"lstm": (torch.nn.LSTM, gatelab.LSTM), "gru": (torch.nn.GRU, gatelab.GRU)}


def run(sizes: list[int], pairs: int, batch: int, T: int) -> tuple[list[dict], dict]:
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    meta = {"machine": f"{cpu_model()} ({cpu_flags()})", "cores": threads, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "batch": batch, "seq_len": T, "pairs": pairs,
            "fused_impl": gatelab.engines.fused.implementation()}
    rows = []
    for label, (cell, options) in OPTIONS.items():
        builtin, layer = LAYERS[cell]
        for H in sizes:
            x = torch.randn(T, batch, H)
            base = builtin(H, H)
            fused = layer(H, H, backend="fused", strict=True, **options)
            ref = layer(H, H, backend="reference", **options)
            missing, unexpected = fused.load_state_dict(base.state_dict(), strict=False)
            assert not unexpected and all(k.startswith("ln_") for k in missing), (missing, unexpected)  # gains stay at init
            ref.load_state_dict(fused.state_dict())
            models = {"torch": lambda x, m=base: m(x)[0], "fused": lambda x, m=fused: m(x)[0],
                      "reference": lambda x, m=ref: m(x)[0]}
            for mode, make, training in (("fwd+bwd", train_step, True), ("fwd (no grad)", infer_step, False)):
                fused.train(training), ref.train(training)
                fns = {k: make(m, x) for k, m in models.items()}
                t_torch, t_fused, r_torch = compare(fns["torch"], fns["fused"], pairs)
                t_ref, _, r_ref = compare(fns["reference"], fns["fused"], pairs)
                rows.append({"option": label, "hidden": H, "mode": mode, "fused_ms": round(t_fused, 3),
                             "torch_ms": round(t_torch, 3), "reference_ms": round(t_ref, 3),
                             "fused_over_torch": round(r_torch, 3), "reference_over_fused": round(1 / r_ref, 3),
                             "engine": fused.engine_name})
                print(f"  {label} H={H} {mode}: fused {t_fused:.2f} ms = {r_torch:.2f}x torch.nn, "
                      f"{1 / r_ref:.2f}x faster than reference", file=sys.stderr, flush=True)
    return rows, meta


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Machine: {meta['machine']}, {meta['cores']} cores, torch {meta['torch']} with {meta['threads']} threads; "
        f"fused implementation: {meta['fused_impl']}. Batch {meta['batch']}, sequence {meta['seq_len']}, float32, "
        f"one layer, {meta['pairs']} interleaved pairs. torch.nn.LSTM / GRU run without the option.",
        "",
        "| option | H | mode | fused ms | fused / torch.nn | reference / fused | torch ms | reference ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['option']} | {r['hidden']} | {r['mode']} | {r['fused_ms']:.2f} | {r['fused_over_torch']:.2f}x | "
                     f"{r['reference_over_fused']:.2f}x | {r['torch_ms']:.2f} | {r['reference_ms']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--json", type=Path)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI)")
    args = p.parse_args(argv)
    if args.tiny:
        args.sizes, args.pairs, args.batch, args.seq_len = [8], 1, 4, 5
    rows, meta = run(args.sizes, args.pairs, args.batch, args.seq_len)
    table = markdown(rows, meta)
    print(table)
    if args.json:
        write_atomic(args.json, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
