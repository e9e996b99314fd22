"""Issue 6's acceptance runs: train each experiment of ``configs/acceptance/`` and compare its test figure
with the issue's target.

| task | metric (test split) | target |
|---|---|---|
| ucr:GunPoint / ItalyPowerDemand / BasicMotions / JapaneseVowels | accuracy, LSTM or GRU | >= 0.90 / 0.95 / 0.95 / 0.95 |
| forecast:Airline (last 12 months held out) | MAE | < 47.83 (seasonal naive) |
| charlm:shakespeare | bits per character | < 2.30 (order-4 Witten-Bell n-gram) |
| copy, T = 100 | cross-entropy (nats), LSTM | < 0.17329 (memoryless) |

Every run goes through the public API (``gatelab.config.load`` + ``gatelab.fit``): the trainer keeps the
weights of the best *validation* score and evaluates the test split once, at the end. The script
writes ``OUT.json`` (one record per run: task, metric, value, target, met, baselines, config, seed,
steps, wall time, machine and device) and ``OUT.md`` (the same as a table). Records already in
``OUT.json`` for other (config, seed) pairs are kept, so runs made on different machines (the UCR and
forecasting sets on a CPU, the copy task and the language model on a GPU) end up in one summary.

Usage::

    python benchmarks/acceptance.py                              # every configs/acceptance/*.toml
    python benchmarks/acceptance.py ucr_gunpoint_gru airline_lstm --seeds 0 1 2
    python benchmarks/acceptance.py copy_t100_lstm --set train.steps=2000 --max-minutes 8
    python benchmarks/acceptance.py --list                       # the configs and their targets
    python benchmarks/acceptance.py --merge gpu/acceptance.json  # add records made elsewhere

Options: ``--runs DIR`` (run directories, default ``runs/acceptance``), ``--out PREFIX`` (default
``runs/acceptance/acceptance``), ``--seeds`` (``train.seed`` values; default the config's own),
``--set KEY=VALUE`` (dotted overrides for every run), ``--max-minutes`` (stop training after that
long; the final evaluation still runs, with the best-validation weights, and the record says so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import gatelab  # noqa: E402
from gatelab.callbacks import Callback  # noqa: E402
from gatelab.config import load, to_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "acceptance"

# task name -> (metric, comparison, target, what the target is)
TARGETS: dict[str, tuple[str, str, float, str]] = {
    "ucr:GunPoint": ("accuracy", ">=", 0.90, "issue 6 (1NN-DTW 0.907, InceptionTime 1.000)"),
    "ucr:ItalyPowerDemand": ("accuracy", ">=", 0.95, "issue 6 (1NN-DTW 0.950, ROCKET 0.970)"),
    "ucr:BasicMotions": ("accuracy", ">=", 0.95, "issue 6 (DTW_D 0.975, InceptionTime 1.000)"),
    "ucr:JapaneseVowels": ("accuracy", ">=", 0.95, "issue 6 (DTW_D 0.949, InceptionTime 0.992)"),
    "forecast:Airline": ("mae", "<", 47.83, "seasonal-naive MAE on the last 12 months"),
    "charlm:shakespeare": ("bpc", "<", 2.30, "order-4 Witten-Bell n-gram 2.301 bpc"),
    "copy": ("cross_entropy", "<", 0.17329, "memoryless 10 ln 8 / (T + 20) at T = 100"),
}


def target_for(config) -> tuple[str, str, float, str]:
    name = config.task.name
    if name.startswith("ucr:"):
        name = "ucr:" + {k.lower(): k for k in ("GunPoint", "ItalyPowerDemand", "BasicMotions",
                                                "JapaneseVowels")}.get(name[4:].lower(), name[4:])
    if name not in TARGETS:
        raise SystemExit(f"{config.name}: task {config.task.name!r} has no acceptance target")
    if name == "copy" and config.task.options.get("length", 100) != 100:
        raise SystemExit(f"{config.name}: the copy target is for T = 100")
    return TARGETS[name]


def met(value: float, comparison: str, target: float) -> bool:
    return value >= target if comparison == ">=" else value < target


class TimeCap(Callback):
    """Stop training after ``seconds`` (the final evaluation still runs)."""

    def __init__(self, seconds: float):
        self.seconds, self.capped = seconds, False

    def on_train_start(self, run) -> None:
        self.t0 = time.perf_counter()

    def on_step_end(self, run, step, loss, batch) -> None:
        if time.perf_counter() - self.t0 > self.seconds:
            self.capped, run.stop = True, True


def machine(device: str) -> str:
    """The processor (or GPU) a run used, in a few words."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def run_one(path: Path, seed: int | None, overrides: list[str], runs: Path, max_minutes: float, quiet: bool) -> dict:
    extra = list(overrides) + ([f"train.seed={seed}"] if seed is not None else [])
    config = load(path, extra)
    metric, comparison, target, source = target_for(config)
    run_dir = runs / f"{config.name}-seed{config.train.seed}"
    cap = TimeCap(max_minutes * 60) if max_minutes else None
    t0 = time.perf_counter()
    run = gatelab.fit(config, run_dir=run_dir, quiet=quiet, overwrite=True, callbacks=[cap] if cap else [])
    wall = time.perf_counter() - t0
    s = run.summary
    value = s["final"]["test"][metric]
    model = config.model
    record = {
        "name": config.name, "task": s["task"], "metric": metric, "value": value, "comparison": comparison,
        "target": target, "target_source": source, "met": met(value, comparison, target),
        "val": s["final"].get("val", {}).get(metric), "baseline": s["baseline"]["test"].get(metric),
        "baselines": run.task.baselines("test"),
        "model": f"{model.cell} {list(model.hidden_sizes)}" + (" bidirectional" if model.bidirectional else "")
                 + (f" head={model.head}" if model.head != "auto" else ""),
        "parameters": s["parameters"], "engines": s["engines"],
        "config": str(path.resolve().relative_to(REPO)) if path.resolve().is_relative_to(REPO) else str(path),
        "overrides": extra, "seed": config.train.seed, "task_seed": config.task.options.get("seed"),
        "steps": s["steps"], "epochs": s["epochs"], "best_step": s["best"]["step"], "weights": s["weights"],
        "stopped_early": s["stopped_early"], "time_capped": bool(cap and cap.capped),
        "train_seconds": s["train_seconds"], "wall_seconds": round(wall, 1),
        "device": s["device"], "machine": machine(s["device"]), "threads": s["threads"],
        "torch": torch.__version__, "gatelab": gatelab.__version__,
        "run_dir": str(run_dir), "resolved_config": to_dict(config),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return record


def fmt(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"


def markdown(records: list[dict]) -> str:
    lines = [
        "| task | metric | model | test value | target | met | val | baseline (test) | config | seed | steps "
        "(best) | wall s | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        steps = f"{r['steps']} ({r['best_step']})" + (" capped" if r.get("time_capped") else "")
        dev = "GPU" if r["device"].startswith("cuda") else "CPU"
        lines.append(
            f"| {r['task']} | {r['metric']} | {r['model']} | **{fmt(r['value'])}** | {r['comparison']} "
            f"{fmt(r['target'])} | {'yes' if r['met'] else 'no'} | {fmt(r['val'])} | {fmt(r['baseline'])} | "
            f"`{r['config']}` | {r['seed']} | {steps} | {r['wall_seconds']:.0f} | {dev}: {r['machine']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*", help="config names in configs/acceptance/ or paths (default: all)")
    p.add_argument("--runs", default="runs/acceptance")
    p.add_argument("--out", default="runs/acceptance/acceptance", help="writes OUT.json and OUT.md")
    p.add_argument("--seeds", type=int, nargs="*", default=None, help="train.seed values (default: the config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-minutes", type=float, default=0.0, help="per run; 0: no cap")
    p.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                   help="add the records of other summaries (e.g. from a GPU machine) to OUT; trains nothing "
                        "unless configs are named too")
    p.add_argument("--list", action="store_true", help="list the configs and their targets, train nothing")
    p.add_argument("--verbose", action="store_true", help="show the progress bar")
    args = p.parse_args(argv)

    paths = [Path(c) if c.endswith(".toml") else CONFIGS / f"{c}.toml" for c in args.configs] \
        or ([] if args.merge else sorted(CONFIGS.glob("*.toml")))
    if args.list:
        for path in paths:
            config = load(path)
            metric, comparison, target, source = target_for(config)
            print(f"{path.stem:32s} {config.task.name:24s} {metric} {comparison} {target}  ({source})")
        return 0

    out_json = Path(args.out + ".json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict] = json.loads(out_json.read_text())["records"] if out_json.exists() else []

    def add(record: dict) -> None:
        nonlocal records
        records = [r for r in records if (r["name"], r["seed"]) != (record["name"], record["seed"])] + [record]
        order = {t: i for i, t in enumerate(TARGETS)}
        records.sort(key=lambda r: (order.get(r["task"], len(order)),
                                    r["name"], r["seed"]))
        out_json.write_text(json.dumps({"records": records}, indent=1) + "\n")
        Path(args.out + ".md").write_text(markdown(records))

    for other in args.merge:
        for record in json.loads(Path(other).read_text())["records"]:
            add(record)
    for path in paths:
        for seed in args.seeds if args.seeds else [None]:
            record = run_one(path, seed, args.overrides, Path(args.runs), args.max_minutes, not args.verbose)
            print(f"{record['name']} seed {record['seed']}: test {record['metric']} {record['value']:.4f} "
                  f"(target {record['comparison']} {record['target']}: {'met' if record['met'] else 'NOT met'}; "
                  f"val {fmt(record['val'])}, baseline {fmt(record['baseline'])}) "
                  f"{record['steps']} steps, {record['wall_seconds']:.0f} s on {record['device']}", flush=True)
            add(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
