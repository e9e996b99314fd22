"""Long sequences: MinGRU, MinLSTM, IndRNN and SLSTM against torch.nn.GRU / LSTM.

Protocol (shared/BENCHMARKING.md): one process; each contender and its torch yardstick are built
and warmed up, then run alternately A, B, A, B ...; we report the median time of each and the median
of the per-pair ratios, per sequence length and mode (a training step without the optimiser:
forward + backward of ``out.sum()``; and the forward under ``torch.no_grad()``). Which form of each
cell ran (``layer.explain()``'s engine phrase) is in the table and the JSON.

Grid (issue 19): batch 16, input = hidden = 256, T ∈ {256, 1024, 4096, 16384}, float32, one layer,
unidirectional. Yardsticks: MinGRU and IndRNN against ``torch.nn.GRU``, MinLSTM and SLSTM against
``torch.nn.LSTM``.

Usage: ``python benchmarks/long_sequence.py [--lengths 256 1024 4096 16384] [--cells min_gru indrnn]
[--pairs 7] [--json out.json] [--markdown out.md]``. ``--tiny`` runs a seconds-long smoke version.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gatelab  # noqa: E402

CELLS = {  # name -> (gatelab layer, torch yardstick)
    "min_gru": (gatelab.MinGRU, torch.nn.GRU),
    "min_lstm": (gatelab.MinLSTM, torch.nn.LSTM),
    "indrnn": (gatelab.IndRNN, torch.nn.GRU),
    "slstm": (gatelab.SLSTM, torch.nn.LSTM),
}
MODES = ("fwd+bwd", "fwd (no grad)")


@dataclass
class Row:
    cell: str
    T: int
    mode: str
    median_ms: float
    torch_name: str
    torch_ms: float
    speedup_vs_torch: float  # median over pairs of torch_time / cell_time
    us_per_step: float
    form: str


def machine() -> dict[str, object]:
    """The machine the table was measured on (BENCHMARKING.md: every table names it)."""
    try:
        name = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
        cpu = name.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "mkldnn": torch.backends.mkldnn.is_available(), "python": platform.python_version()}


def runner(module: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]

    def train_step() -> None:
        for p in params:
            p.grad = None
        module(x)[0].sum().backward()

    def forward() -> None:
        with torch.no_grad():
            module(x)

    return train_step if mode == "fwd+bwd" else forward


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(cell: str, T: int, B: int, H: int, pairs: int) -> list[Row]:
    layer_cls, torch_cls = CELLS[cell]
    torch.manual_seed(0)
    layer = layer_cls(H, H, backend="fused")
    yardstick = torch_cls(H, H)
    x = torch.randn(T, B, H)
    form = layer.explain().split(". Runs ", 1)[-1].split(". Under torch.compile", 1)[0]
    rows = []
    for mode in MODES:
        a, b = runner(layer, x, mode), runner(yardstick, x, mode)
        a(), b()  # warm-up (and the C++ build, once)
        ta, tb = [], []
        for _ in range(pairs):
            ta.append(timed(a))
            tb.append(timed(b))
        ratio = statistics.median(y / z for y, z in zip(tb, ta))
        med = statistics.median(ta)
        rows.append(Row(cell, T, mode, med * 1e3, torch_cls.__name__, statistics.median(tb) * 1e3, ratio,
                        med / T * 1e6, form))
    return rows


def markdown(rows: list[Row], meta: dict[str, object]) -> str:
    head = (f"Machine: {meta['cpu']}, {meta['cores']} cores, {meta['threads']} threads, torch {meta['torch']}; "
            f"batch {meta['batch']}, hidden = input = {meta['hidden']}, float32, {meta['pairs']} interleaved pairs.\n\n"
            "| cell | T | mode | ms | torch | torch ms | torch / cell | µs per step |\n|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r.cell} | {r.T} | {r.mode} | {r.median_ms:.1f} | nn.{r.torch_name} | {r.torch_ms:.1f} | "
                   f"{r.speedup_vs_torch:.2f}x | {r.us_per_step:.1f} |\n" for r in rows)
    forms = "".join(f"- {c}: {f}\n" for c, f in dict((r.cell, r.form) for r in rows).items())
    return head + body + "\nForms that ran:\n" + forms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (B 2, H 8, T 8 and 16, 2 pairs)")
    args = p.parse_args(argv)
    if args.tiny:
        args.lengths, args.batch, args.hidden, args.pairs = [8, 16], 2, 8, 2
    torch.set_num_threads(args.threads)
    rows = [r for T in args.lengths for cell in args.cells for r in measure(cell, T, args.batch, args.hidden, args.pairs)]
    meta = {**machine(), "batch": args.batch, "hidden": args.hidden, "pairs": args.pairs, "lengths": args.lengths,
            "date": time.strftime("%Y-%m-%d")}
    table = markdown(rows, meta)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
