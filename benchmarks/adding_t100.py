"""Issue 5's measurement: steps and wall time for an LSTM of 128 units to reach test MSE < 0.01 on the
adding task at T = 100 (RMSprop lr 1e-3, batch 50, gradient norm clipped at 1; ``configs/adding.toml``).

The run trains with the ordinary trainer; a callback scores the test split at every evaluation
(every ``train.eval_every`` steps), stops at the first one below the target, or when the time cap is
reached. Prints one line and writes ``measure.json`` into the run directory.

Usage: ``python benchmarks/adding_t100.py [--config configs/adding.toml] [--target 0.01]
[--max-minutes 30] [--runs runs] [--quiet] [overrides such as --train.threads=1]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from gatelab.callbacks import Callback  # noqa: E402
from gatelab.checkpoint import write_json  # noqa: E402
from gatelab.config import load  # noqa: E402
from gatelab.train import evaluate, fit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class ReachTarget(Callback):
    """Score the test split at each evaluation; stop at the target or at the time cap."""

    def __init__(self, target: float, max_seconds: float):
        self.target, self.max_seconds = target, max_seconds
        self.trace: list[dict] = []
        self.reached: dict | None = None
        self.timed_out = False

    def on_train_start(self, run) -> None:
        self.t0 = time.perf_counter()

    def on_step_end(self, run, step, loss, batch) -> None:
        if time.perf_counter() - self.t0 > self.max_seconds:
            self.timed_out, run.stop = True, True

    def on_eval(self, run, step, split, metrics) -> None:
        test = evaluate(run.model, run.task, "test", batch_size=run.config.train.eval_batch_size)["mse"]
        point = {"step": step, "val_mse": metrics["mse"], "test_mse": test,
                 "wall_seconds": round(time.perf_counter() - self.t0, 1), "train_seconds": round(run.train_seconds, 1)}
        self.trace.append(point)
        if test < self.target and self.reached is None:
            self.reached, run.stop = point, True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "adding.toml"))
    p.add_argument("--target", type=float, default=0.01)
    p.add_argument("--max-minutes", type=float, default=30.0)
    p.add_argument("--runs", default="runs")
    p.add_argument("--quiet", action="store_true")
    args, overrides = p.parse_known_args(argv)
    config = load(args.config, overrides)
    watch = ReachTarget(args.target, args.max_minutes * 60)
    run = fit(config, run_dir=Path(args.runs) / config.name, callbacks=[watch], quiet=args.quiet, overwrite=True)
    result = {
        "config": str(args.config), "overrides": overrides, "seed": config.train.seed, "target_test_mse": args.target,
        "reached": watch.reached is not None, "reached_at": watch.reached, "timed_out": watch.timed_out,
        "steps_run": run.step, "final_test_mse": watch.trace[-1]["test_mse"] if watch.trace else None,
        "best_test_mse": min((t["test_mse"] for t in watch.trace), default=None),
        "threads": run.summary["threads"], "engines": run.summary["engines"], "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads available", "trace": watch.trace,
    }
    write_json(run.run_dir / "measure.json", result)
    if watch.reached:
        r = watch.reached
        print(f"test MSE {r['test_mse']:.4f} < {args.target} at step {r['step']} after {r['wall_seconds']:.0f} s "
              f"({r['train_seconds']:.0f} s training)")
    else:
        print(f"target {args.target} not reached in {run.step} steps ({'time cap' if watch.timed_out else 'step budget'}); "
              f"best test MSE {result['best_test_mse']}")
    print(json.dumps({k: v for k, v in result.items() if k != "trace"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
