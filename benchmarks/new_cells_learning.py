"""Issue 19's learning table: the new cells against LSTM and GRU under one wall-time budget each.

The adding task at T = 1000 and the copy task at T = 200, cells MinGRU, IndRNN, SLSTM, LSTM, GRU
(one layer of ``--hidden`` units, Adam, gradient norm clipped at 1), seed 0. Every (task, cell, lr)
is trained once for ``--minutes`` of wall time (``train.max_minutes``) with ``train.score_test =
false``, so no run reads the test split while settings are chosen; per (task, cell) the learning
rate with the best validation figure is chosen, and only then is the test split scored, once, with
the weights that run kept (its best validation checkpoint). One torch thread per run, ``--jobs``
runs at a time; run it under ``nice -n 19``::

    nice -n 19 .venv/bin/python benchmarks/new_cells_learning.py --out runs/issue19/learning.json

It prints the Markdown table of docs/results.md and writes every run's figures to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASKS = {
    "adding T=1000": {"name": "adding", "length": 1000, "n_train": 100_000, "n_val": 256, "n_test": 1000},
    "copy T=200": {"name": "copy", "length": 200, "n_train": 10_000, "n_val": 256, "n_test": 1000},
}
CELLS = {"LSTM": "lstm", "GRU": "gru", "MinGRU": "min_gru", "IndRNN": "indrnn", "SLSTM": "slstm"}
LRS = (1e-3, 3e-3)


def config_dict(task: str, cell: str, lr: float, minutes: float, hidden: int) -> dict:
    return {
        "name": f"issue19-{TASKS[task]['name']}-{cell}-lr{lr:g}",
        "task": dict(TASKS[task], seed=0),
        "model": {"cell": CELLS[cell], "hidden_sizes": [hidden]},
        "train": {"seed": 0, "steps": 1_000_000, "batch_size": 50, "optimizer": "adam", "lr": lr, "clip_norm": 1.0,
                  "eval_every": 100, "eval_batch_size": 256, "max_minutes": minutes, "score_test": False,
                  "restore_best": True, "threads": 1},
    }


def train_one(job: tuple[str, str, float, float, int, str]) -> dict:
    """One validation-only run (a worker process: one torch thread)."""
    task, cell, lr, minutes, hidden, runs = job
    import torch

    torch.set_num_threads(1)
    import gatelab
    from gatelab.config import from_dict

    config = from_dict(config_dict(task, cell, lr, minutes, hidden))
    run_dir = Path(runs) / config.name
    t0 = time.perf_counter()
    run = gatelab.fit(config, run_dir=run_dir, quiet=True, overwrite=True)
    s = run.summary
    assert "test" not in s["final"], "a selection run read the test split"
    return {"task": task, "cell": cell, "lr": lr, "val": s["final"]["val"], "steps": s["steps"],
            "weights": s["weights"], "wall_seconds": s["wall_seconds"], "stopped_early": s["stopped_early"],
            "process_seconds": round(time.perf_counter() - t0, 1), "run_dir": str(run_dir),
            "engines": s["engines"], "headline": s["headline"]}


def score_test(chosen: dict) -> dict:
    """The test figure of the chosen run, with the weights it kept."""
    import torch

    torch.set_num_threads(1)
    from gatelab.train import evaluate_checkpoint

    run_dir = Path(chosen["run_dir"])
    path = run_dir / ("best.pt" if chosen["weights"].startswith("best") else "last.pt")
    if not path.exists():
        path = run_dir / "last.pt"
    return evaluate_checkpoint(path, splits=("test",))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=2.0, help="wall-time budget per run (train.max_minutes)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    p.add_argument("--runs", default="runs/issue19")
    p.add_argument("--out", default="runs/issue19/learning.json")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch

    jobs = [(t, c, lr, args.minutes, args.hidden, args.runs) for t in args.tasks for c in args.cells for lr in LRS]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(train_one, jobs))
    rows = []
    for task in args.tasks:
        for cell in args.cells:
            mine = [r for r in runs if r["task"] == task and r["cell"] == cell]
            head = mine[0]["headline"]
            chosen = min(mine, key=lambda r: r["val"][head])  # both headlines (MSE, cross-entropy): lower is better
            test = score_test(chosen)
            rows.append({"task": task, "cell": cell, "chosen_lr": chosen["lr"], "val": chosen["val"][head],
                         "test": test["test"][head], "baseline": test["baseline_test"][head],
                         "steps": chosen["steps"], "wall_seconds": chosen["wall_seconds"],
                         "engines": chosen["engines"], "headline": head,
                         "val_per_lr": {f"{r['lr']:g}": r["val"][head] for r in mine}})
    machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads_per_run": 1, "jobs": args.jobs, "minutes_per_run": args.minutes, "hidden": args.hidden,
               "lrs": list(LRS), "seed": 0, "total_wall_seconds": round(time.perf_counter() - t0, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows, "runs": runs}, indent=1) + "\n")
    # wall s: the trainer's wall time of the chosen run (its budget; the task's data are built before it starts)
    print("| task | cell | lr (chosen on val) | val | **test** | trivial baseline (test) | steps | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} ({r['headline']}) | {r['cell']} | {r['chosen_lr']:g} | {r['val']:.4f} | "
              f"**{r['test']:.4f}** | {r['baseline']:.4f} | {r['steps']} | {r['wall_seconds']:.0f} |")
    print(f"\n{machine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
