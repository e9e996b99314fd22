"""The main job: LSTM, GRU and Elman x three activations on the adding task and the digits data.

``gatelab demo`` (``make demo``) trains every cell type with its gate activation (Elman: its
activation) set to ``sigmoid``, ``hard_sigmoid`` and ``relu``, on each base experiment in
``configs/demo/`` (adding with T = 40 and sklearn's digits read row by row), then prints one table:
the final test metric next to the task's trivial baseline, parameters, seconds per epoch and the
engine that ran. Everything is written under ``runs/demo/``: one run directory per cell of the grid,
``results.md`` and ``results.json``. A run whose loss or gradient turns NaN/Inf is reported as
diverged, with the step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from ._version import __version__
from .cells import registry
from .checkpoint import atomic_write, safe_child, write_json
from .config import ConfigError, ExperimentConfig, load
from .train import HIGHER_IS_BETTER, NonFiniteError, fit

__all__ = ["run_demo", "CELLS", "ACTIVATIONS", "config_dir"]

CELLS = ("lstm", "gru", "rnn")
ACTIVATIONS = ("sigmoid", "hard_sigmoid", "relu")


def config_dir() -> Path:
    """``configs/demo`` of the gatelab checkout (the base experiments of the grid)."""
    return Path(__file__).resolve().parents[1] / "configs" / "demo"


def grid(base: ExperimentConfig, cells: Sequence[str], activations: Sequence[str]) -> list[tuple[str, str, ExperimentConfig]]:
    """The base experiment with each cell type and activation."""
    out = []
    for cell in cells:
        for act in activations:
            roles = registry.get(cell).roles  # the gates' slot, or the only one a gateless cell has
            slot = "gate_activation" if "gate_activation" in roles else next(iter(roles))
            slots = {f"model.{s}": None for s in ("activation", "gate_activation", "candidate_activation",
                                                    "cell_activation")}  # the base's own slots may not fit the cell
            cfg = base.replace(**{**slots, "name": f"{base.name}-{cell}-{act}", "model.cell": cell, f"model.{slot}": act})
            out.append((cell, act, cfg))
    return out


def run_demo(out_dir: str | Path = "runs/demo", *, configs: Sequence[str | Path] | None = None,
             cells: Sequence[str] = CELLS, activations: Sequence[str] = ACTIVATIONS,
             overrides: Sequence[str] = (), quiet: bool = False, stream: TextIO | None = None) -> list[dict[str, Any]]:
    """Run the grid on every base config (default: ``configs/demo/*.toml``); returns the table rows."""
    out_dir, stream = Path(out_dir), stream or sys.stdout
    paths = [Path(p) for p in configs] if configs else sorted(config_dir().glob("*.toml"))
    if not paths:
        raise ConfigError(f"no demo configs found in {config_dir()}")
    bases = [load(p, overrides) for p in paths]
    jobs = [(base, *job) for base in bases for job in grid(base, cells, activations)]
    t0 = time.perf_counter()
    rows = []
    for k, (_, cell, act, cfg) in enumerate(jobs, 1):
        t = time.perf_counter()
        row = _run(cfg, cell, act, safe_child(out_dir, cfg.name, "name"))  # a base config's name cannot escape out_dir
        rows.append(row)
        if not quiet:
            print(f"[{k}/{len(jobs)}] {cfg.name}: {row['status']} ({time.perf_counter() - t:.1f} s)", file=stream,
                  flush=True)
    wall = time.perf_counter() - t0
    table = markdown(rows, wall)
    atomic_write(out_dir / "results.md", table)
    write_json(out_dir / "results.json", {"wall_seconds": round(wall, 1), "threads": torch.get_num_threads(),
                                          "torch": torch.__version__, "gatelab": __version__, "rows": rows})
    if not quiet:
        print("\n" + table, file=stream)
        print(f"written to {out_dir / 'results.md'} and {out_dir / 'results.json'}", file=stream)
    return rows


def _run(cfg: ExperimentConfig, cell: str, act: str, run_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"task": cfg.task.name, "cell": cell, "activation": act, "run": str(run_dir)}
    try:
        run = fit(cfg, run_dir=run_dir, quiet=True, overwrite=True)
    except NonFiniteError as err:
        return {**row, "status": f"diverged at step {err.step} ({err.tensor} not finite)", "diverged": True}
    s = run.summary
    head = s["headline"]
    test, base = s["final"]["test"][head], s["baseline"]["test"][head]
    row.update(engine=",".join(sorted(set(s["engines"]))), parameters=s["parameters"], epochs=s["epochs"],
               seconds_per_epoch=s["seconds_per_epoch"], metric=head, test=test, baseline=base,
               beats_baseline=s["beats_baseline"], threads=s["threads"], diverged=False)
    better = "higher" if head in HIGHER_IS_BETTER else "lower"
    row["status"] = f"test {head} {test:.4g} (baseline {base:.4g}, {better} is better)"
    return row


def markdown(rows: list[dict[str, Any]], wall: float) -> str:
    header = ("task", "cell", "activation", "engine", "params", "epochs", "s/epoch", "test metric", "baseline", "verdict")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        if r["diverged"]:
            cells = (r["task"], r["cell"], r["activation"], "", "", "", "", "", "", r["status"])
        else:
            verdict = "beats baseline" if r["beats_baseline"] else "no better than baseline"
            cells = (r["task"], r["cell"], r["activation"], r["engine"], f"{r['parameters']:,}", f"{r['epochs']:g}",
                     f"{r['seconds_per_epoch']:.3f}", f"{r['metric']} {r['test']:.4f}", f"{r['baseline']:.4f}", verdict)
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    threads = sorted({r["threads"] for r in rows if not r["diverged"]})
    note = (f"\nWall time {wall:.0f} s for the whole grid, torch threads per run: {', '.join(map(str, threads))}, "
            f"torch {torch.__version__}. Elman: the activation is its recurrent nonlinearity; LSTM/GRU: the gate "
            f"activation (candidate and cell activations stay tanh). Final weights: best validation metric.\n")
    return "\n".join(lines) + "\n" + note
