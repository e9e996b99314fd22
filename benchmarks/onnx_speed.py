"""ONNX speed in onnxruntime on the CPU: ONNX's own LSTM/GRU node against the Scan form, same layer.

Each layer is one ONNX's nodes can express, exported twice with the same weights:
``gatelab.onnx.export(..., form="auto")`` (ONNX's ``LSTM`` / ``GRU`` node) and ``form="scan"`` (a Scan
over time whose body is one step: what every layer with activations ONNX's nodes lack exports to).
Same protocol as ``speed.py`` (shared/BENCHMARKING.md): one process, both sessions built and warmed
up, then interleaved pairs (node, Scan, node, Scan ...); the medians and the median of the per-pair
ratios Scan/node. Forward only (inference), float32, one layer, unidirectional; with and without
padded ``lengths``. onnxruntime's intra-op threads are fixed to the machine's cores (inter-op 1).

Usage: ``python benchmarks/onnx_speed.py [--hidden 128] [--seq-len 100] [--batch 32] [--pairs 9]
[--json out.json] [--markdown out.md]``; ``--tiny`` is a smoke run (one layer, H 8, T 5).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from speed import cpu_flags, cpu_model, write_atomic  # noqa: E402

import gatelab  # noqa: E402
import gatelab.onnx as gonnx  # noqa: E402

LAYERS = {  # label: (layer class, options); each one ONNX's own node expresses
    "LSTM (torch's activations)": (gatelab.LSTM, {}),
    "LSTM hard_sigmoid gates, relu candidate, tanh cell": (gatelab.LSTM, {"gate_activation": "hard_sigmoid",
                                                                         "candidate_activation": "relu"}),
    "GRU (torch's activations)": (gatelab.GRU, {}),
}


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def compare(a, b, pairs: int, warmup: int) -> tuple[float, float, float]:
    """Median ms of a, of b, and the median of the per-pair ratios b/a, alternating a, b."""
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for _ in range(pairs):
        ta.append(timed(a))
        tb.append(timed(b))
    return float(np.median(ta)), float(np.median(tb)), float(np.median([y / x for x, y in zip(ta, tb)]))


def run(H: int, T: int, batch: int, pairs: int, warmup: int, threads: int, tmp: Path, layers: dict,
        lengths_cases: tuple[bool, ...] = (False, True)) -> list[dict]:
    rows = []
    x = torch.randn(T, batch, H)
    lengths = torch.randint(max(1, T // 2), T + 1, (batch,))
    lengths[0] = T
    for label, (cls, options) in layers.items():
        torch.manual_seed(0)
        layer = cls(H, H, **options).eval()
        for with_lengths in lengths_cases:
            args = (x, None, lengths) if with_lengths else (x,)
            dynamic = ({0: "T", 1: "B"}, None, {0: "B"}) if with_lengths else ({0: "T", 1: "B"},)
            feed = [x.numpy(), lengths.numpy()] if with_lengths else [x.numpy()]
            sessions = {}
            for form in ("auto", "scan"):
                path = tmp / f"{len(rows)}_{form}.onnx"
                gonnx.export(layer, args, dynamic_shapes=dynamic, form=form).save(path)
                s = session(path, threads)
                sessions[form] = (s, dict(zip([i.name for i in s.get_inputs()], feed)))
            with torch.no_grad():
                want = layer(x, lengths=lengths if with_lengths else None)[0].numpy()
            err = max(float(np.abs(s.run(None, f)[0] - want).max()) for s, f in sessions.values())
            node, scan = (lambda s=sessions[f]: s[0].run(None, s[1]) for f in ("auto", "scan"))
            node_ms, scan_ms, ratio = compare(node, scan, pairs, warmup)
            rows.append({"layer": label, "hidden": H, "seq_len": T, "batch": batch, "lengths": with_lengths,
                         "node": gonnx.form(layer), "node_ms": round(node_ms, 3), "scan_ms": round(scan_ms, 3),
                         "scan_over_node": round(ratio, 3), "max_error_vs_pytorch": err})
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"ONNX speed in onnxruntime {meta['onnxruntime']} ({meta['provider']}, {meta['threads']} intra-op "
             f"threads), {meta['machine']} [{meta['cpu_flags']}], {meta['cores']} cores; batch {meta['batch']}, "
             f"T {meta['seq_len']}, H {meta['hidden']}, float32 forward, median of {meta['pairs']} interleaved pairs.",
             "", "| layer | lengths | ONNX node ms | Scan ms | Scan / node | max err vs PyTorch |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {'yes' if r['lengths'] else 'no'} | {r['node_ms']:.2f} | {r['scan_ms']:.2f} | "
                     f"{r['scan_over_node']:.2f} | {r['max_error_vs_pytorch']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=128, help="hidden size = input size")
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pairs", type=int, default=9)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="onnxruntime intra-op threads")
    p.add_argument("--json", type=Path, help="write the rows and machine info as JSON here")
    p.add_argument("--markdown", type=Path, help="write the markdown table here")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI)")
    args = p.parse_args(argv)
    layers, lengths_cases = LAYERS, (False, True)
    if args.tiny:  # one layer, both forms, with lengths
        args.hidden, args.seq_len, args.batch, args.pairs, args.warmup = 8, 5, 2, 1, 1
        layers, lengths_cases = dict(list(LAYERS.items())[:1]), (True,)
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    for name in ("torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    meta = {"machine": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count() or 1, "threads": args.threads,
            "onnxruntime": ort.__version__, "provider": "CPUExecutionProvider", "torch": torch.__version__,
            "hidden": args.hidden, "seq_len": args.seq_len, "batch": args.batch, "pairs": args.pairs}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and registration notes
        rows = run(args.hidden, args.seq_len, args.batch, args.pairs, args.warmup, args.threads, Path(tmp), layers,
                   lengths_cases)
    table = markdown(rows, meta)
    print(table)
    if args.json:
        write_atomic(args.json, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    if args.markdown:
        write_atomic(args.markdown, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
