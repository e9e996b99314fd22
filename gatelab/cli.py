"""The ``gatelab`` command: thin subcommands over importable functions.

    gatelab train CONFIG [--train.lr=1e-3 --model.cell=gru ...] [--name NAME] [--runs DIR] [--quiet]
                         [--resume | --overwrite]   (with task.val_folds = k: k-fold validation)
    gatelab evaluate CHECKPOINT [--split val test]
    gatelab export RUN_DIR_OR_CHECKPOINT [--onnx OUT.onnx] [--safetensors OUT.safetensors]
    gatelab list [cells | activations | presets | tasks | configs]
    gatelab generate CHECKPOINT [--length N] [--temperature T] [--prime TEXT] [--seed S]
    gatelab demo [--out runs/demo] [--quiet]
    gatelab diagnose CONFIG_OR_CHECKPOINT [--out DIR] [--quiet]
    gatelab bench [benchmarks/speed.py arguments ...]
    gatelab sweep STUDY.toml [--out DIR] [--workers N] [--retry-failed] [--ray auto|ADDRESS] [--no-report]
                             [--quiet] [--section.key=value ...]
    gatelab report STUDY_DIR [--reference LABEL] [--gradient-flow LABEL ...]

Overrides are dotted keys of the config (``--section.key=value`` or ``--section.key value``). A mistake
is one line on stderr naming the file, key or flag, with exit status 2 for usage and configuration
errors and 1 for failures; ``--debug``, anywhere on the line, shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]


class UsageError(Exception):
    """A mistake on the command line itself (a flag's value, a missing input file): exit status 2."""


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .checkpoint import safe_child
    from .config import load, parse_override_args
    from .train import cross_validate, fit

    parsed = parse_override_args(overrides)
    if args.no_test:
        parsed["train.score_test"] = "false"
    if args.name is not None:
        parsed["name"] = args.name
    config = load(args.config, parsed)
    runs = writable_folder(args.runs, "--runs")
    run_dir = safe_child(runs, config.name, "--name" if args.name is not None else f"{args.config}: name")
    if config.task.options.get("val_folds") and "fold" not in config.task.options:
        if args.resume:
            raise UsageError("--resume: a k-fold run (task.val_folds) restarts its folds; use --overwrite")
        cv = cross_validate(config, run_dir=run_dir, quiet=args.quiet, overwrite=args.overwrite)
        print(cv_line(cv, run_dir))
        return 0
    run = fit(config, run_dir=run_dir, quiet=args.quiet, resume=args.resume, overwrite=args.overwrite)
    if run.rank == 0:  # under torchrun, one line for the run, not one per process
        print(result_line(run.summary, run_dir))
    return 0


def cv_line(cv: dict, run_dir: Path) -> str:
    """The last line of a k-fold ``gatelab train``: every validation metric as mean ± std (min-max)."""
    parts = [f"{m} {s['mean']:.4f} ± {s['std']:.4f} ({s['min']:.4f}-{s['max']:.4f})" for m, s in cv["val"].items()]
    return f"{cv['name']}: {cv['val_folds']}-fold val " + ", ".join(parts) + f" (test not read); results in {run_dir}"


def result_line(summary: dict, run_dir: Path) -> str:
    """The last line of ``gatelab train``: the test metric against the baseline, and whether it beat it."""
    head, final, baseline = summary["headline"], summary["final"], summary["baseline"]
    split = "test" if "test" in final else "val" if "val" in final else None
    tail = f"{summary['steps']} steps, {summary['wall_seconds']:.1f} s; results in {run_dir}"
    if split is None:
        return f"{summary['name']}: no val or test split to score; {tail}"
    value, base = final[split][head], baseline[split][head]
    if split == "val":
        return f"{summary['name']}: val {head} {value:.4f} (baseline {base:.4f}; no test split), {tail}"
    if summary["beats_baseline"]:
        return f"{summary['name']}: test {head} {value:.4f} (baseline {base:.4f}), {tail}"
    return f"{summary['name']}: test {head} {value:.4f} did not beat the baseline ({base:.4f}), {tail}"


def writable_folder(path: str, flag: str) -> Path:
    """``path`` as a folder that exists (created if missing) and can be written; :class:`UsageError` naming
    ``flag`` otherwise."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{flag} {folder}: cannot create the folder ({err.strerror or err})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: the folder is not writable")
    return folder


def existing_file(path: str, what: str) -> str:
    """``path`` when it is a file; :class:`UsageError` otherwise (before anything is imported or built)."""
    if not Path(path).exists():
        raise UsageError(f"{path}: no such {what} file")
    return path


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .train import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(existing_file(args.checkpoint, "checkpoint"), args.split), indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    if args.onnx is None and args.safetensors is None:
        raise UsageError("export: give --onnx OUT.onnx and/or --safetensors OUT.safetensors")
    written = export_run(args.source, onnx=args.onnx, safetensors=args.safetensors)
    for what in ("safetensors", "config", "onnx"):
        if what in written:
            print(f"{what}: {written[what]}")
    print(f"from {written['checkpoint']}")
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

    print(generate_text(existing_file(args.checkpoint, "checkpoint"), args.length, args.temperature, args.prime,
                        args.seed))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, quiet=args.quiet, resume=args.resume)
    return 0


def cmd_sweep(args: argparse.Namespace, overrides: list[str], imports: Sequence[str] = ()) -> int:
    from .config import parse_override_args
    from .study import load_study, sweep, write_report

    study = load_study(existing_file(args.study, "study"), parse_override_args(overrides))
    out = writable_folder(args.out, "--out") if args.out is not None else None
    result = sweep(study, out, workers=args.workers, retry_failed=args.retry_failed, quiet=args.quiet,
                   imports=imports, ray=args.ray)
    if not args.no_report:
        paths = write_report(result["dir"])
        print(f"report: {paths['html']} (and {paths['markdown'].name})")
    counts = result["counts"]
    return 0 if counts["pending"] + counts["running"] == 0 else 1


def cmd_report(args: argparse.Namespace) -> int:
    from .study import STORE_NAME, write_report

    if not (Path(args.study_dir) / STORE_NAME).is_file():
        raise UsageError(f"{args.study_dir}: not a study directory (no {STORE_NAME}; gatelab sweep STUDY.toml makes one)")
    paths = write_report(args.study_dir, reference=args.reference, gradient_flow=args.gradient_flow)
    print(f"report: {paths['html']} (and {paths['markdown'].name})")
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
    saved = list(sys.argv)
    sys.argv[:1] = ["gatelab bench"]  # argparse names itself after argv[0]: "usage: gatelab bench ..."
    try:
        return int(module.main(rest) or 0)
    finally:
        sys.argv[:] = saved


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gatelab", description="gated RNNs with pluggable activations: the workbench",
        epilog="A mistake prints one line naming the file, key or flag; exit status 2 for usage and configuration "
               "errors, 1 for failures.")
    p.add_argument("--import", dest="imports", action="append", metavar="MODULE", default=[],
                   help="import MODULE (or a .py file) first, for its own tasks, cells or activations (repeatable; "
                        "before or after the command)")
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the full traceback instead of one line (before or after the command)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an experiment config (overrides: --section.key=value)")
    t.add_argument("config", help="experiment TOML file")
    t.add_argument("--name", help="run name, one plain folder name inside --runs (default: the config's name)")
    t.add_argument("--runs", default="runs", help="folder of run directories (default: runs)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--no-test", action="store_true",
                   help="never read the test split (train.score_test=false): choose settings on validation, "
                        "score test once at the end")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from runs/NAME/last.pt")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run of that name")

    e = sub.add_parser("evaluate", help="metrics of a checkpoint on its task's splits")
    e.add_argument("checkpoint", help="a checkpoint a run wrote (runs/NAME/best.pt or last.pt)")
    e.add_argument("--split", nargs="+", default=["val", "test"], choices=["train", "val", "test"],
                   help="the splits to score (default: val test)")

    x = sub.add_parser("export", help="a trained run as ONNX and/or safetensors (+ its config)")
    x.add_argument("source", help="a run directory (its best.pt, else last.pt) or a checkpoint file")
    x.add_argument("--onnx", help="write ONNX here (ONNX's LSTM/GRU/RNN nodes, else a Scan over time)")
    x.add_argument("--safetensors", help="write the weights here (torch's names), the config beside it (.toml)")
    ls = sub.add_parser("list", help="cells, activations, presets, tasks, configs")
    ls.add_argument("what", nargs="?", default="all", choices=["all", "cells", "activations", "presets", "tasks", "configs"],
                    help="what to list (default: all)")

    g = sub.add_parser("generate", help="sample text from a charlm checkpoint")
    g.add_argument("checkpoint", help="a checkpoint of a charlm run")
    g.add_argument("--length", type=int, default=200, help="characters to sample after the prime (default: 200)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature: below 1 more likely characters, above 1 more varied (default: 1.0)")
    g.add_argument("--prime", default="", help="text the sample starts with (characters of the training text)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")

    d = sub.add_parser("demo", help="the comparison grid (LSTM/GRU/Elman x activations)")
    d.add_argument("--out", default="runs/demo", help="folder of the runs and results.md (default: runs/demo)")
    d.add_argument("--quiet", action="store_true", help="no progress lines")
    d.add_argument("--resume", action="store_true",
                   help="keep the trials an earlier (or killed) demo finished, resume the interrupted ones")

    dg = sub.add_parser("diagnose", help="gradient-flow diagnostics of a config or checkpoint")
    dg.add_argument("target", help="a built-in experiment, a diagnose or experiment TOML, or a checkpoint")
    dg.add_argument("--out", default="runs/diagnose", help="folder of the figures and summary.json (default: runs/diagnose)")
    dg.add_argument("--quiet", action="store_true", help="no progress lines")

    sw = sub.add_parser("sweep", help="run a study: cells x activations x seeds ... (overrides: --section.key=value)")
    sw.add_argument("study", help="study TOML file (bases, axes, points, exclusions, budget)")
    sw.add_argument("--out", help="study directory (default: runs/STUDY_NAME); running again resumes it")
    sw.add_argument("--workers", type=int, default=0,
                    help="worker processes (default: the study's, else as many as the cores allow; workers x threads "
                         "never exceed the cores)")
    sw.add_argument("--retry-failed", action="store_true", help="run failed trials again (diverged ones stay)")
    sw.add_argument("--ray", metavar="ADDRESS", help="run the workers as Ray tasks: 'auto', 'local' or a cluster address")
    sw.add_argument("--no-report", action="store_true", help="do not write report.html / report.md at the end")
    sw.add_argument("--quiet", action="store_true", help="no progress lines")

    rp = sub.add_parser("report", help="report.html and report.md of a study directory")
    rp.add_argument("study_dir", help="a study directory (holding study.sqlite)")
    rp.add_argument("--reference", help="the group the paired comparison is against (default: the study's, else the first)")
    rp.add_argument("--gradient-flow", nargs="+", metavar="LABEL",
                    help="the groups whose gradient flow is drawn (default: every group, at its lowest seed)")

    sub.add_parser("bench", help="benchmarks/speed.py (arguments pass through)", add_help=False)
    return p


def _take_imports(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``--import MODULE`` / ``--import=MODULE`` (repeatable) off the command line."""
    rest, plugins = [], []
    items = iter(argv)
    for arg in items:
        if arg == "--import":
            value = next(items, None)
            if value is None:
                raise SystemExit("gatelab: error: --import expects a module name or a .py file")
            plugins.append(value)
        elif arg.startswith("--import="):
            plugins.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return rest, plugins


def import_plugin(name: str) -> None:
    """Import a module (from the working directory too) or a ``.py`` file, so that the tasks, cells and
    activations it registers (``gatelab.tasks.register``, ``gatelab.cells.registry.register``, ...) are
    known to the command that follows."""
    path = Path(name)
    try:
        if path.suffix == ".py":
            if not path.is_file():
                raise UsageError(f"--import {name}: no such file")
            spec = importlib.util.spec_from_file_location(f"gatelab_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[spec.name] = module  # type: ignore[union-attr]
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            if str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            importlib.import_module(name)
    except ImportError as err:
        raise UsageError(f"--import {name}: {err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (errors print one line to stderr, or re-raise
    with ``--debug``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug and --import may stand anywhere; taking them out first lets `bench` pass the rest through
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    argv, plugins = _take_imports(argv)
    command = "bench" if argv[:1] == ["bench"] else None
    try:
        for plugin in plugins:
            import_plugin(plugin)
        if command == "bench":
            return cmd_bench(argparse.Namespace(), argv[1:])
        args, extra = parser().parse_known_args(argv)
        command = args.command
        if extra and command not in ("train", "sweep"):
            parser().error(f"unrecognized arguments: {' '.join(extra)}")
        if command == "train":
            return cmd_train(args, extra)
        if command == "sweep":
            return cmd_sweep(args, extra, plugins)
        return {"evaluate": cmd_evaluate, "list": cmd_list, "generate": cmd_generate, "demo": cmd_demo,
                "diagnose": cmd_diagnose, "export": cmd_export, "report": cmd_report}[command](args)
    except KeyboardInterrupt:
        if debug:
            raise
        hint = ("running the same command again resumes the study" if command == "sweep" else
                "`gatelab train CONFIG --resume` continues from the last checkpoint")
        print(f"gatelab {command}: interrupted; {hint}", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        status, message = describe(err)
        print(f"gatelab {command}: error: {message}", file=sys.stderr)
        return status


def describe(err: Exception) -> tuple[int, str]:
    """The exit status of ``err`` (2: usage or configuration, 1: a failure) and its message as one line."""
    from .checkpoint import CheckpointError, LockedError
    from .config import ConfigError
    from .train import NonFiniteError

    if isinstance(err, (UsageError, ConfigError)):
        status, message = 2, str(err)
    elif isinstance(err, MemoryError):
        status, message = 1, ("out of memory (MemoryError): try a smaller train.batch_size, train.eval_batch_size "
                              "or model; --debug shows where")
    elif isinstance(err, (CheckpointError, LockedError, NonFiniteError)):
        status, message = 1, str(err)
    elif isinstance(err, OSError):
        status = 2 if isinstance(err, FileNotFoundError) else 1  # a missing input is a usage mistake
        message = f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)
    elif isinstance(err, ValueError):
        status, message = 1, str(err)
    else:
        status, message = 1, f"{type(err).__name__}: {err} (--debug shows the traceback)"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return status, " ".join(lines) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
