"""GPU speed and memory of the fused engine's Triton loop against cuDNN and the paths before it.

Protocol (shared/BENCHMARKING.md, GPU): one process; every model of a configuration shares weights,
is warmed up, then all run in rotating order (A B C D, B C D A, ...) for ``--rounds`` rounds, each
timed with CUDA events with ``torch.cuda.synchronize()`` around it; we report each model's median and
the median of the per-round ratios. Clocks are not fixed (the script cannot). The yardsticks:

* ``cudnn``: torch.nn.LSTM / GRU with default activations on cuDNN (what users have today);
* ``triton``: gatelab's layer with custom activations (gates hard_sigmoid, candidate relu) on the
  fused engine's Triton loop (checked with ``explain()``; the form the loop ran is recorded per row);
* ``loop``: the same layer on the fused engine's pure-PyTorch loop (``GATELAB_TRITON=off``: the path
  before the Triton loop);
* ``compiled``: the reference cell's step under ``torch.compile`` in a Python loop over time (compiling
  the whole reference loop unrolls T steps: minutes of compile time at T 1000).

Grid: cells {lstm, gru} x dtype {float32, bfloat16} x batch {16, 64, 256} x T {100, 1000} x H {64,
128, 256, 512, 1024}, training step (forward + backward of sum(out)) and no-grad forward, peak memory
of a training step (``torch.cuda.max_memory_allocated``). The slow yardsticks (``loop``,
``compiled``) run at batch 64 only, where they are measured at all. ``--budget-s`` (default 420)
bounds the whole run: configurations left when it is spent are listed as not measured, never guessed.

Usage: ``python benchmarks/gpu_speed.py [--out DIR] [--budget-s 420]``: writes ``gpu_speed.json`` and
``gpu_speed.md`` under DIR ($OUT, else the current directory). ``--tiny`` runs a seconds-long smoke
version; on a machine without CUDA it runs the Triton loop under Triton's interpreter
(``GATELAB_TRITON=interpret``), timed with the CPU clock, which says nothing about GPU speed (CI uses
it to check that the script runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from speed import write_atomic  # noqa: E402

import gatelab  # noqa: E402
from gatelab.engines.fused import gpu  # noqa: E402

CUSTOM = {"gate_activation": "hard_sigmoid", "candidate_activation": "relu"}
GRID = {"batch": (16, 64, 256), "T": (100, 1000), "H": (64, 128, 256, 512, 1024)}
SLOW_BATCH = 64  # the batch at which the slow yardsticks run
MODES = ("train", "no_grad")


@dataclass
class Row:
    cell: str
    dtype: str
    batch: int
    T: int
    hidden: int
    mode: str
    form: str
    ms: dict[str, float] = field(default_factory=dict)  # yardstick -> median ms
    ratio: dict[str, float] = field(default_factory=dict)  # yardstick -> median of (yardstick / triton)
    peak_mb: dict[str, float] = field(default_factory=dict)  # yardstick -> peak MB of one training step


@contextlib.contextmanager
def triton_off() -> Iterator[None]:
    before = os.environ.get("GATELAB_TRITON")
    os.environ["GATELAB_TRITON"] = "off"
    try:
        yield
    finally:
        if before is None:
            del os.environ["GATELAB_TRITON"]
        else:
            os.environ["GATELAB_TRITON"] = before


def build(cell: str, H: int, dtype: torch.dtype, device: torch.device, slow: bool,
          compile_backend: str = "inductor") -> dict[str, Callable]:
    """The yardsticks of one configuration, each ``model(x) -> out``, sharing weights."""
    torch.manual_seed(0)
    layer_cls = {"lstm": gatelab.LSTM, "gru": gatelab.GRU}[cell]
    torch_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
    ref = torch_cls(H, H, device=device, dtype=dtype)
    triton_layer = layer_cls(H, H, backend="fused", strict=True, device=device, dtype=dtype, **CUSTOM)
    if "Triton loop" not in (text := triton_layer.explain()):
        raise SystemExit(f"gpu_speed: the custom-activation layer does not run the Triton loop here:\n{text}")
    with torch.no_grad():
        for name, p in triton_layer.named_parameters():
            p.copy_(getattr(ref, name))
    models: dict[str, Callable] = {"cudnn": lambda x: ref(x)[0], "triton": lambda x: triton_layer(x)[0]}
    if slow:
        def loop(x):
            with triton_off():
                return triton_layer(x)[0]

        cell_mod = triton_layer.cells[0]
        step = torch.compile(lambda x_t, state: cell_mod.step(x_t, state), dynamic=False, backend=compile_backend)

        def compiled(x):
            state = tuple(torch.zeros(x.shape[1], H, device=device, dtype=dtype) for _ in cell_mod.state_names)
            outs = []
            for t in range(x.shape[0]):
                out, state = step(x[t], state)
                outs.append(out)
            return torch.stack(outs)

        models.update(loop=loop, compiled=compiled)
    return models


def timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    """A function that runs ``fn`` once and returns its time in ms (CUDA events on a GPU)."""
    if device.type == "cuda":
        def cuda_ms(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        return cuda_ms

    def cpu_ms(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return cpu_ms


def step_fn(model: Callable, x: torch.Tensor, mode: str) -> Callable[[], None]:
    if mode == "train":
        def train():
            model(x).float().sum().backward()
        return train

    def infer():
        with torch.no_grad():
            model(x)
    return infer


def peak_mb(fn: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(models: dict[str, Callable], x: torch.Tensor, mode: str, rounds: int, warmup: int,
            device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms per yardstick and the median per-round ratio yardstick / triton, rotating the order."""
    fns = {k: step_fn(m, x, mode) for k, m in models.items()}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    clock = timer(device)
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    ratios: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        got = {k: clock(fns[k]) for k in order}
        for k in names:
            times[k].append(got[k])
            ratios[k].append(got[k] / got["triton"])
    return ({k: statistics.median(v) for k, v in times.items()},
            {k: statistics.median(v) for k, v in ratios.items() if k != "triton"})


def configurations(tiny: bool) -> list[tuple[str, torch.dtype, int, int, int]]:
    if tiny:
        return [("lstm", torch.float32, 16, 5, 16), ("gru", torch.float32, 16, 5, 16)]
    # the slow yardsticks' batch first, so that a spent budget leaves the full comparison measured
    batches = sorted(GRID["batch"], key=lambda b: b != SLOW_BATCH)
    return [(cell, dtype, b, T, H) for dtype in (torch.float32, torch.bfloat16) for b in batches
            for T in GRID["T"] for cell in ("lstm", "gru") for H in GRID["H"]]


def meta(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "device": device.type, "clocks": "not fixed"}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    else:
        info["gpu"] = "none: the Triton loop ran under Triton's interpreter on the CPU (not a speed figure)"
    return info


def run(tiny: bool, budget_s: float, rounds: int, warmup: int) -> tuple[list[Row], list[str], dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ["GATELAB_TRITON"] = "interpret"
    start = time.monotonic()
    rows: list[Row] = []
    skipped: list[str] = []
    for cell, dtype, B, T, H in configurations(tiny):
        label = f"{cell} {str(dtype).removeprefix('torch.')} B{B} T{T} H{H}"
        if time.monotonic() - start > budget_s:
            skipped.append(label)
            continue
        slow = tiny or B == SLOW_BATCH
        # the tiny CPU run compiles with aot_eager: inductor's C++ build would take most of its time
        models = build(cell, H, dtype, device, slow, "aot_eager" if tiny and device.type == "cpu" else "inductor")
        x = torch.randn(T, B, H, device=device, dtype=dtype)
        for mode in MODES:
            row = Row(cell, str(dtype).removeprefix("torch."), B, T, H, mode, "")
            row.ms, row.ratio = measure(models, x, mode, rounds, warmup, device)
            with torch.no_grad():
                models["triton"](x)
            row.form = gpu.last_form() or "unknown"  # what the loop itself says it ran
            if mode == "train":
                for k, m in models.items():
                    if (mb := peak_mb(step_fn(m, x, mode), device)) is not None:
                        row.peak_mb[k] = mb
            rows.append(row)
            print(f"{label} {mode}: triton {row.ms['triton']:.2f} ms, cudnn/triton {row.ratio['cudnn']:.2f}",
                  flush=True)
        del models, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, skipped, meta(device) | {"budget_s": budget_s, "rounds": rounds, "elapsed_s": time.monotonic() - start}


def markdown(rows: list[Row], skipped: list[str], info: dict) -> str:
    head = (f"GPU: {info.get('gpu')}; driver {info.get('driver', '-')}; CUDA {info.get('cuda', '-')}; torch "
            f"{info['torch']}; triton {info['triton']}; clocks {info['clocks']}; {info['rounds']} rounds per size.")
    lines = [head, "",
             "Ratios are per-round medians of (yardstick time / Triton time): above 1, the Triton loop is faster. "
             "`loop` is the fused engine's PyTorch loop, `compiled` the reference step under torch.compile.", "",
             "| cell | dtype | B | T | H | mode | form | Triton ms | cuDNN ms | Triton / cuDNN | loop / Triton "
             "| compiled / Triton | peak MB Triton | peak MB cuDNN |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def ratio(k, r=r):
            return f"{r.ratio[k]:.2f}x" if k in r.ratio else "not run"

        mem = [f"{r.peak_mb[k]:.0f}" if k in r.peak_mb else "-" for k in ("triton", "cudnn")]
        lines.append(f"| {r.cell} | {r.dtype} | {r.batch} | {r.T} | {r.hidden} | {r.mode} | {r.form} | "
                     f"{r.ms['triton']:.2f} | {r.ms['cudnn']:.2f} | {1 / r.ratio['cudnn']:.2f}x | {ratio('loop')} | "
                     f"{ratio('compiled')} | {mem[0]} | {mem[1]} |")
    if skipped:
        lines += ["", f"Not measured (the {info['budget_s']:.0f} s budget was spent): " + "; ".join(skipped) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="where the JSON and table go")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new sizes after this many seconds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI; on the CPU, the interpreter)")
    args = p.parse_args(argv)
    if args.tiny:
        args.rounds, args.warmup = 2, 1
    rows, skipped, info = run(args.tiny, args.budget_s, args.rounds, args.warmup)
    table = markdown(rows, skipped, info)
    print(table)
    write_atomic(args.out / "gpu_speed.json", json.dumps({"meta": info, "rows": [asdict(r) for r in rows],
                                                          "not_measured": skipped}, indent=2))
    write_atomic(args.out / "gpu_speed.md", table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
