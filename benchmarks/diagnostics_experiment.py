"""The experiment of docs/diagnostics.md: what six recurrent configurations do to the gradient and to
the loss on the adding task.

Elman with sigmoid and with tanh, LSTM, GRU, IRNN (ReLU Elman, identity init) and an LSTM with ReLU
gates (seed 004's proposal), 64 units each, T = 50; diagnosed at initialisation, trained with Adam
(batch 64, clip 1) with the gradient flow recorded every 50 steps, diagnosed again; three seeds
(initialisation and batch order; the data are the task's seed 0). Figures and summary.json (first
seed) and seeds.json (all) go to docs/figures/diagnostics/; markdown tables go to stdout.

    nice -n 19 .venv/bin/python benchmarks/diagnostics_experiment.py            # about 5-10 min, 1 thread
    nice -n 19 .venv/bin/python benchmarks/diagnostics_experiment.py --steps 20 --out /tmp/diag   # smoke
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import gatelab
from gatelab.diagnostics import ADDING_COMPARISON, compare, verdict
from gatelab.diagnostics._io import write_json
from gatelab.diagnostics.diagnose import write_report


def fmt_verdict(v: dict) -> str:
    horizon = "∞" if v["horizon"] is None else str(v["horizon"])
    return f"{v['slope']:+.3f} / {horizon} / {v['label']}"


def table(summary: dict) -> str:
    base = summary["baseline"]["mse"]
    rows = [
        "| configuration | engine | ∂L/∂h: slope / horizon / verdict, init | same, trained | "
        "‖∂s_T/∂s_0‖ init → trained | its slope init → trained | "
        f"test MSE init → trained (baseline {base:.4f}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in summary["configurations"]:
        i, t = c["initial"], c["trained"]
        rows.append(
            f"| {c['label']} | {c['engine']} | {fmt_verdict(i['gradient'])} | {fmt_verdict(t['gradient'])} | "
            f"{i['jacobian_norm_at_T']:.1e} → {t['jacobian_norm_at_T']:.1e} | "
            f"{i['jacobian']['slope']:+.3f} → {t['jacobian']['slope']:+.3f} | "
            f"{c['test_loss_initial']:.4f} → {c['test_loss']:.4f} |"
        )
    return "\n".join(rows)


def gates_table(summary: dict) -> str:
    rows = ["| configuration | moment | saturated share per gate | dead-unit share |", "|---|---|---|---|"]
    for c in summary["configurations"]:
        for moment in ("initial", "trained"):
            d = c[moment]
            sat = ", ".join(f"{k.rsplit('.', 1)[-1]} {v:.0%}" for k, v in d["saturation"].items())
            dead = ", ".join(f"{k.rsplit('.', 1)[-1]} {v:.0%}" for k, v in d["dead"].items()) or "-"
            rows.append(f"| {c['label']} | {moment} | {sat or '-'} | {dead} |")
    return "\n".join(rows)


def states_table(results: list) -> str:
    """Mean state norm over the batch at the first and last step, and the verdict on ∂L/∂state by lag,
    for every state tensor after training (first seed)."""
    rows = ["| configuration | state | mean ‖s_t‖, t = 0 → t = T-1 | ∂L/∂s_t: slope / horizon / verdict |",
            "|---|---|---|---|"]
    for r in results:
        d = r.trained
        for key, norms in d.gates.state_norms.items():
            v = verdict(d.flow.by_lag(key)).to_dict()
            rows.append(f"| {r.spec.label} | {key.rsplit('.', 1)[-1]} | {norms[0]:.3g} → {norms[-1]:.3g} | "
                        f"{fmt_verdict(v)} |")
    return "\n".join(rows)


def seeds_table(per_seed: dict[int, list[dict]], baseline: float) -> str:
    seeds = sorted(per_seed)
    labels = [c["label"] for c in per_seed[seeds[0]]]
    head = " | ".join(f"seed {k}" for k in seeds)
    rows = [f"| configuration | {head} | mean test MSE (baseline {baseline:.4f}) |", "|---" * (len(seeds) + 2) + "|"]
    for i, label in enumerate(labels):
        cells, losses = [], []
        for k in seeds:
            c = per_seed[k][i]
            losses.append(c["test_loss"])
            v = c["trained"]["gradient"]
            cells.append(f"{c['test_loss']:.4f}, {v['label']} ({v['slope']:+.3f})")
        rows.append(f"| {label} | {' | '.join(cells)} | {sum(losses) / len(losses):.4f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="figures come from the first")
    parser.add_argument("--only", nargs="*", default=None, help="labels of the configurations to run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "figures" / "diagnostics")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    task = gatelab.tasks.get("adding", length=args.length)  # 10 000 / 1 000 / 1 000 sequences, data seed 0
    specs = [s for s in ADDING_COMPARISON if args.only is None or s.label in args.only]
    start = time.perf_counter()
    per_seed: dict[int, list[dict]] = {}
    summary: dict = {}
    first: list = []
    for seed in args.seeds:
        print(f"-- seed {seed}", flush=True)
        results = compare(specs, task, train_steps=args.steps, batch_size=64, lr=args.lr, optimizer="adam", clip=1.0,
                          seed=seed, every=args.every, log=lambda line: print(line, flush=True))
        per_seed[seed] = [r.summary() for r in results]
        if seed == args.seeds[0]:
            first = results
            title = f"adding task, T = {args.length}, 64 units, Adam {args.lr:g}, {args.steps} steps, seed {seed}"
            settings = {"length": args.length, "train_steps": args.steps, "lr": args.lr, "batch_size": 64,
                        "clip": 1.0, "optimizer": "adam", "every": args.every, "seeds": args.seeds,
                        "threads": args.threads, "torch": torch.__version__}
            summary = write_report(results, task, args.out, title=title, source="benchmarks/diagnostics_experiment.py",
                                   settings=settings)
    write_json(args.out / "seeds.json", {"baseline": summary["baseline"], "seeds": per_seed})
    print()
    print(table(summary))
    print()
    print(gates_table(summary))
    print()
    print(states_table(first))
    print()
    print(seeds_table(per_seed, summary["baseline"]["mse"]))
    print(f"\nfigures in {args.out}; {time.perf_counter() - start:.0f} s with {args.threads} thread(s)")


if __name__ == "__main__":
    main()
