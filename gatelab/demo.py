"""The main job: LSTM, GRU and Elman x three activations x two seeds on the adding task and the digits data.

``gatelab demo`` (``make demo``) is a small study run through the study machinery
(:mod:`gatelab.study`): every cell type with its gate activation (Elman: its activation) set to
``sigmoid``, ``hard_sigmoid`` and ``relu``, with seeds 0 and 1, on each base experiment in
``configs/demo/`` (adding with T = 40 and sklearn's digits read row by row), on a local process
pool. It prints one table: per task, cell and activation the final test metric (mean ± std over the
seeds) next to the task's trivial baseline, parameters, seconds per epoch and the engine that ran.
Everything is written under ``runs/demo/``: the study store, one run directory per trial in
``trials/``, ``results.md`` and ``results.json`` (that table), and ``report.html`` / ``report.md``
(:func:`gatelab.study.write_report`: the tables with ranks, a paired comparison against the LSTM
with sigmoid gates, learning curves and a gradient-flow figure). A trial whose loss or gradient
turns NaN/Inf is reported as diverged, with the step.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from ._version import __version__
from .cells import registry
from .checkpoint import atomic_write, write_json
from .config import ConfigError, load
from .study import STORE_NAME, Store, study_from_dict, sweep, write_report
from .study.report import group_rows
from .study.runner import TRIALS_DIR

__all__ = ["run_demo", "CELLS", "ACTIVATIONS", "SEEDS", "config_dir", "points"]

CELLS = ("lstm", "gru", "rnn")
ACTIVATIONS = ("sigmoid", "hard_sigmoid", "relu")
SEEDS = (0, 1)
SLOTS = ("activation", "gate_activation", "candidate_activation", "cell_activation")


def config_dir() -> Path:
    """``configs/demo`` of the gatelab checkout (the base experiments of the grid)."""
    return Path(__file__).resolve().parents[1] / "configs" / "demo"


def points(cells: Sequence[str], activations: Sequence[str]) -> list[dict[str, Any]]:
    """The study's points: each cell type with each activation in its gates' slot (or the only slot a
    gateless cell has); the other slots are cleared, since a base's own slots may not fit the cell."""
    out = []
    for cell in cells:
        roles = registry.get(cell).roles
        slot = "gate_activation" if "gate_activation" in roles else next(iter(roles))
        for act in activations:
            out.append({"label": f"{cell}/{act}", "model.cell": cell, **{f"model.{s}": None for s in SLOTS},
                        f"model.{slot}": act})
    return out


def run_demo(out_dir: str | Path = "runs/demo", *, configs: Sequence[str | Path] | None = None,
             cells: Sequence[str] = CELLS, activations: Sequence[str] = ACTIVATIONS, seeds: Sequence[int] = SEEDS,
             overrides: Sequence[str] = (), quiet: bool = False, stream: TextIO | None = None, workers: int = 0,
             resume: bool = False, report: bool = True) -> list[dict[str, Any]]:
    """Run the study on every base config (default: ``configs/demo/*.toml``); returns the table's rows
    (one per task, cell and activation, over the seeds). ``resume``: keep what an earlier demo in
    ``out_dir`` finished (default: start afresh, so the table is this code's)."""
    out_dir, stream = Path(out_dir), stream or sys.stdout
    paths = [Path(p) for p in configs] if configs else sorted(config_dir().glob("*.toml"))
    if not paths:
        raise ConfigError(f"no demo configs found in {config_dir()}")
    bases = [load(p, overrides) for p in paths]
    study = study_from_dict({"name": "demo", "description": "LSTM, GRU and Elman x gate activation x seeds on the demo's "
                             "tasks (configs/demo)", "seeds": list(seeds), "points": points(cells, activations),
                             "reference": f"{cells[0]}/{activations[0]}"}, bases=bases)
    if not resume:
        for name in (STORE_NAME, f"{STORE_NAME}-wal", f"{STORE_NAME}-shm", "results.md", "results.json"):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / TRIALS_DIR, ignore_errors=True)
    t0 = time.perf_counter()
    progress = sys.stderr if stream is sys.stdout else stream
    sweep(study, out_dir, workers=workers, quiet=quiet, stream=progress)
    wall = time.perf_counter() - t0
    with Store(out_dir / STORE_NAME) as store:
        groups = group_rows(store)
        trials = store.trials()
    rows = [_row(g) for gs in groups.values() for g in gs]
    table = markdown(rows, wall)
    atomic_write(out_dir / "results.md", table)
    write_json(out_dir / "results.json", {"wall_seconds": round(wall, 1), "threads": torch.get_num_threads(),
                                          "torch": torch.__version__, "gatelab": __version__, "seeds": list(seeds),
                                          "rows": rows, "trials": [_trial(t) for t in trials]})
    paths_written = write_report(out_dir) if report else None
    if not quiet:
        print("\n" + table, file=stream)
        print(f"written to {out_dir / 'results.md'} and {out_dir / 'results.json'}", file=stream)
        if paths_written:
            print(f"report: open {paths_written['html']} (markdown: {paths_written['markdown']})", file=stream)
    return rows


def _trial(t: dict[str, Any]) -> dict[str, Any]:
    keep = ("name", "run_dir", "base", "task", "label", "seed", "status", "reason", "metric", "value", "baseline",
            "beats_baseline", "steps", "parameters", "engines", "seconds_per_epoch", "wall_seconds", "threads")
    return {k: t.get(k) for k in keep}


def _row(g: Any) -> dict[str, Any]:
    cell, act = g.label.split("/", 1)
    first = g.trials[0]
    row: dict[str, Any] = {"task": first["task"], "cell": cell, "activation": act, "seeds": [t["seed"] for t in g.trials],
                           "runs": [t["run_dir"] for t in g.trials]}
    bad = [t for t in g.trials if t["status"] != "done"]
    notes = "; ".join(f"seed {t['seed']} {t['reason'] or t['status']}" for t in bad)
    done = g.done
    if not done:
        reasons = sorted({t["reason"] or t["status"] for t in bad})
        seeds = f" ({len(bad)}/{len(g.trials)} seeds)" if len(g.trials) > 1 else ""
        return {**row, "status": "; ".join(reasons) + seeds, "diverged": True}
    d = done[0]
    row.update(engine=",".join(d["engines"]), parameters=d["parameters"],
               epochs=statistics.fmean(t["epochs"] for t in done),
               seconds_per_epoch=statistics.fmean(t["seconds_per_epoch"] for t in done), metric=d["metric"],
               test=g.mean, test_std=g.std, baseline=g.baseline,
               beats=sum(bool(t["beats_baseline"]) for t in done), finished=len(done),
               beats_baseline=all(t["beats_baseline"] for t in done), threads=d["threads"], diverged=False)
    better = "higher" if d["higher_is_better"] else "lower"
    spread = f" ± {g.std:.4g}" if g.std is not None else ""
    row["status"] = f"test {d['metric']} {g.mean:.4g}{spread} (baseline {g.baseline:.4g}, {better} is better)" + (
        f"; {notes}" if notes else "")
    return row


def markdown(rows: list[dict[str, Any]], wall: float) -> str:
    header = ("task", "cell", "activation", "engine", "params", "epochs", "s/epoch", "test metric (mean ± std)",
              "baseline", "verdict")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        if r["diverged"]:
            cells = (r["task"], r["cell"], r["activation"], "", "", "", "", "", "", r["status"])
        else:
            n, k = r["finished"], r["beats"]
            verdict = ("beats baseline" if k == n else "no better than baseline" if k == 0 else
                       f"beats baseline on {k} of {n} seeds")
            if n < len(r["seeds"]):
                verdict += f"; {r['status'].split('; ', 1)[1]}"
            spread = f" ± {r['test_std']:.4f}" if r["test_std"] is not None else ""
            cells = (r["task"], r["cell"], r["activation"], r["engine"], f"{r['parameters']:,}", f"{r['epochs']:g}",
                     f"{r['seconds_per_epoch']:.3f}", f"{r['metric']} {r['test']:.4f}{spread}", f"{r['baseline']:.4f}",
                     verdict)
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    threads = sorted({r["threads"] for r in rows if not r["diverged"]})
    seeds = sorted({s for r in rows for s in r["seeds"]})
    note = (f"\nWall time {wall:.0f} s for the whole study (seeds {', '.join(map(str, seeds))}; mean ± std over them), "
            f"torch threads per run: {', '.join(map(str, threads))}, torch {torch.__version__}. Elman: the activation is "
            f"its recurrent nonlinearity; LSTM/GRU: the gate activation (candidate and cell activations stay tanh). "
            f"Final weights: best validation metric.\n")
    return "\n".join(lines) + "\n" + note
