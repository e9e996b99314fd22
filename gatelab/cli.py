"""The ``gatelab`` command: thin subcommands over importable functions.

    gatelab train CONFIG [--train.lr=1e-3 --model.cell=gru ...] [--name NAME] [--runs DIR] [--quiet]
                         [--resume | --overwrite]
    gatelab evaluate CHECKPOINT [--split val test]
    gatelab list [cells | activations | presets | tasks | configs]
    gatelab generate CHECKPOINT [--length N] [--temperature T] [--prime TEXT] [--seed S]
    gatelab demo [--out runs/demo] [--quiet]
    gatelab diagnose CONFIG_OR_CHECKPOINT [--out DIR] [--quiet]
    gatelab bench [benchmarks/speed.py arguments ...]

Overrides are dotted keys of the config (``--section.key=value`` or ``--section.key value``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .config import load, parse_override_args
    from .train import fit

    parsed = parse_override_args(overrides)
    if args.name:
        parsed["name"] = args.name
    config = load(args.config, parsed)
    run_dir = Path(args.runs) / config.name
    run = fit(config, run_dir=run_dir, quiet=args.quiet, resume=args.resume, overwrite=args.overwrite)
    s = run.summary
    head = s["headline"]
    if "test" in s["final"]:
        print(f"{config.name}: test {head} {s['final']['test'][head]:.4f} (baseline {s['baseline']['test'][head]:.4f}), "
              f"{s['steps']} steps, {s['wall_seconds']:.1f} s; results in {run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .train import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(args.checkpoint, args.split), indent=2))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    print(listing(args.what))
    return 0


def listing(what: str = "all") -> str:
    """What ``gatelab list`` prints: cells, activations, presets, tasks and configs."""
    from . import activations, engines, init, tasks
    from .cells import VARIANTS, registry

    parts = []
    if what in ("all", "cells"):
        entries = [registry.get(name) for name in registry.available()]
        rows = [f"  {e.name:<12} {e.layer.__module__.split('.')[0]}.{e.layer.__name__:<14} slots: {', '.join(e.roles)}"
                for e in entries]
        parts.append("cells (model.cell):\n" + "\n".join(rows))
    if what in ("all", "activations"):
        parts.append("activations (any slot; 'name:param' where one is taken):\n  "
                     + ", ".join(activations.available()))
    if what in ("all", "presets"):
        variants = ", ".join(f"{k} ({', '.join(f'{o}={v}' for o, v in opts.items())})" for k, opts in VARIANTS.items())
        parts.append(f"LSTM variants, Greff et al. 2017 (model.options.variant):\n  {variants}\n"
                     f"init schemes (model.init): {', '.join(init.SCHEMES)}\n"
                     f"backends (model.backend): {', '.join(engines.BACKENDS)}")
    if what in ("all", "tasks"):
        parts.append("tasks (task.name):\n  " + ", ".join(tasks.available()) + ", charlm:/path/to/file.txt")
    if what in ("all", "configs"):
        found = sorted((REPO / "configs").rglob("*.toml"))
        parts.append("configs:\n" + "\n".join(f"  {p.relative_to(REPO)}" for p in found) if found else "configs: none found")
    return "\n\n".join(parts)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate_text

    print(generate_text(args.checkpoint, args.length, args.temperature, args.prime, args.seed))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, quiet=args.quiet)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    try:
        from . import diagnostics
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.diagnostics":
            raise
        diagnostics = None
    fn = getattr(diagnostics, "diagnose_main", None)
    if fn is None:
        print("gatelab diagnose: diagnostics are not installed (gatelab.diagnostics.diagnose_main is missing)",
              file=sys.stderr)
        return 1
    result = fn(args.target, Path(args.out), args.quiet)  # an exit status, or a summary (None, a dict)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    script = REPO / "benchmarks" / "speed.py"
    if not script.is_file():
        print(f"gatelab bench: {script} not found (benchmarks live in the gatelab checkout)", file=sys.stderr)
        return 1
    spec = importlib.util.spec_from_file_location("gatelab_bench_speed", script)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  (dataclasses look their module up there)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return int(module.main(rest) or 0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gatelab", description="gated RNNs with pluggable activations: the workbench")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an experiment config (overrides: --section.key=value)")
    t.add_argument("config", help="experiment TOML file")
    t.add_argument("--name", help="run name (default: the config's name)")
    t.add_argument("--runs", default="runs", help="folder of run directories (default: runs)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from runs/NAME/last.pt")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run of that name")

    e = sub.add_parser("evaluate", help="metrics of a checkpoint on its task's splits")
    e.add_argument("checkpoint")
    e.add_argument("--split", nargs="+", default=["val", "test"], choices=["train", "val", "test"])

    ls = sub.add_parser("list", help="cells, activations, presets, tasks, configs")
    ls.add_argument("what", nargs="?", default="all", choices=["all", "cells", "activations", "presets", "tasks", "configs"])

    g = sub.add_parser("generate", help="sample text from a charlm checkpoint")
    g.add_argument("checkpoint")
    g.add_argument("--length", type=int, default=200)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--prime", default="")
    g.add_argument("--seed", type=int, default=0)

    d = sub.add_parser("demo", help="the comparison grid (LSTM/GRU/Elman x activations)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--quiet", action="store_true")

    dg = sub.add_parser("diagnose", help="gradient-flow diagnostics of a config or checkpoint")
    dg.add_argument("target")
    dg.add_argument("--out", default="runs/diagnose")
    dg.add_argument("--quiet", action="store_true")

    sub.add_parser("bench", help="benchmarks/speed.py (arguments pass through)", add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (errors print one line to stderr)."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .train import NonFiniteError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argparse.Namespace(), argv[1:])
    args, extra = parser().parse_known_args(argv)
    if extra and args.command != "train":
        parser().error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            return cmd_train(args, extra)
        return {"evaluate": cmd_evaluate, "list": cmd_list, "generate": cmd_generate, "demo": cmd_demo,
                "diagnose": cmd_diagnose}[args.command](args)
    except (ConfigError, CheckpointError, NonFiniteError, FileExistsError, ValueError) as err:
        print(f"gatelab {args.command}: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    except KeyboardInterrupt:
        print(f"gatelab {args.command}: interrupted; `gatelab train CONFIG --resume` continues from the last "
              f"checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
