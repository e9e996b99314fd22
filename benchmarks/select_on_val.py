"""Choose among candidate settings of one config on the validation split only.

Each candidate is a set of dotted overrides of the base config; every candidate is trained for every
(``train.seed``, ``task.seed``) pair given, and the script reports, per candidate, the mean and the
worst of the validation figures after training (with the weights the trainer keeps: the best
validation checkpoint when ``restore_best``, else the last). It never reads or prints a test figure,
so the choice it supports cannot leak the test split: every run has ``train.score_test = false``, so
the trainer never reads the test split either (the acceptance runs of ``benchmarks/acceptance.py`` are
what report it).

Usage::

    python benchmarks/select_on_val.py configs/acceptance/ucr_basicmotions_gru.toml \\
        --candidate base= \\
        --candidate last-weights=train.restore_best=false,train.schedule=cosine \\
        --seeds 0 1 2 --task-seeds 0 1 2 --out runs/select/basicmotions.json

A candidate is ``LABEL=KEY=VALUE,KEY=VALUE`` (``LABEL=`` alone: the base config unchanged). The JSON
written to ``--out`` holds every run's validation metrics and a per-candidate summary; it is written
after each run (atomically), so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gatelab  # noqa: E402
from gatelab.checkpoint import atomic_write  # noqa: E402
from gatelab.config import load  # noqa: E402
from gatelab.train import HIGHER_IS_BETTER  # noqa: E402


def parse_candidate(text: str) -> tuple[str, list[str]]:
    label, sep, rest = text.partition("=")
    if not sep or not label:
        raise SystemExit(f"--candidate: expected LABEL=KEY=VALUE[,KEY=VALUE...] or LABEL=, got {text!r}")
    return label, [item for item in rest.split(",") if item]


def summarise(runs: list[dict], metric: str) -> dict[str, dict]:
    higher = metric in HIGHER_IS_BETTER
    out: dict[str, dict] = {}
    for label in dict.fromkeys(r["candidate"] for r in runs):
        values = [r["val"][metric] for r in runs if r["candidate"] == label]
        out[label] = {
            "runs": len(values), "mean": statistics.fmean(values),
            "worst": min(values) if higher else max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="base config (TOML)")
    p.add_argument("--candidate", action="append", required=True, metavar="LABEL=OVERRIDES")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed values")
    p.add_argument("--task-seeds", type=int, nargs="*", default=[],
                   help="task.seed values (tasks whose validation split is drawn at random); default: the config's")
    p.add_argument("--metric", default="", help="validation metric to rank by (default: the task's headline)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="overrides applied to every candidate")
    p.add_argument("--runs", default="runs/select")
    p.add_argument("--out", required=True, help="JSON file for the results")
    args = p.parse_args(argv)

    candidates = [parse_candidate(c) for c in args.candidate]
    out = Path(args.out)
    runs: list[dict] = []
    metric = args.metric
    for label, overrides in candidates:
        for task_seed in args.task_seeds or [None]:
            for seed in args.seeds:
                extra = [*args.overrides, *overrides, f"train.seed={seed}", "train.score_test=false"]
                if task_seed is not None:
                    extra.append(f"task.seed={task_seed}")
                config = load(args.config, extra)
                run_dir = Path(args.runs) / f"{config.name}-{label}-t{task_seed}-s{seed}"
                t0 = time.perf_counter()
                run = gatelab.fit(config, run_dir=run_dir, quiet=True, overwrite=True)
                val = run.summary["final"]["val"]
                metric = metric or run.task.metrics[0]
                runs.append({"candidate": label, "overrides": extra, "seed": seed, "task_seed": task_seed,
                             "val": val, "weights": run.summary["weights"], "steps": run.summary["steps"],
                             "wall_seconds": round(time.perf_counter() - t0, 1)})
                print(f"{label:24s} task.seed={task_seed} seed={seed}: val {metric} {val[metric]:.4f} "
                      f"(loss {val.get('loss', float('nan')):.4f}; {run.summary['weights']})", flush=True)
                atomic_write(out, json.dumps({"config": args.config, "metric": metric, "runs": runs,
                                   "summary": summarise(runs, metric)}, indent=1) + "\n")
    print(f"\nvalidation {metric} per candidate ({len(args.seeds)} seeds x {len(args.task_seeds) or 1} splits):")
    for label, s in summarise(runs, metric).items():
        print(f"  {label:24s} mean {s['mean']:.4f}  worst {s['worst']:.4f}  stdev {s['stdev']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
