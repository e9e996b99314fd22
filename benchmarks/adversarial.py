"""Bad and edge input against the library and the CLI, classified (the hardening issue's categories).

Each case is a call that must either raise ``ValueError``/``TypeError`` (CLI: exit 1 or 2 with one line
on stderr) whose message matches what it names, or succeed where the input is valid (edge cases such as
an empty batch or bf16). Outcomes:

* ``clear``: the expected error, and its message names the argument (or the run succeeded as it should);
* ``unclear``: an error of the right kind whose message does not name what was wrong;
* ``crash``: any other exception (or a CLI traceback);
* ``silent``: no error where one was expected.

    python benchmarks/adversarial.py [--json out.json] [--only PREFIX]

Prints one line per case that is not ``clear`` and the counts per category.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import gatelab

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"LSTM": gatelab.LSTM, "GRU": gatelab.GRU, "RNN": gatelab.RNN, "GatedStateRNN": gatelab.GatedStateRNN}
BACKENDS = ("auto", "native", "fused", "reference")


@dataclass
class Case:
    category: str
    name: str
    run: Callable[[], object]
    names: str | None  # regex the error must match; None: the call must succeed


def _layer(kind: str, backend: str, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LAYERS[kind](3, 4, backend=backend, **kw)


def library_cases() -> list[Case]:
    cases: list[Case] = []
    acts = {"hard_sigmoid:0": "hard_sigmoid takes", "hard_sigmoid:-1": "hard_sigmoid takes", "elu:-5": "elu takes",
            "leaky_relu:-1e308": "leaky_relu takes", "nosuch": "unknown activation", "relu:2": "takes no parameter",
            "elu:x": "must be a number", "elu:inf": "must be finite"}
    for spec, names in acts.items():
        cases.append(Case("activations", f"get({spec!r})", lambda s=spec: gatelab.activations.get(s), names))
    for spec, names in ((int, "class int"), (type, "class type"), (nn.Module, "module class"), (3, "got int"),
                        (None, "got NoneType")):
        cases.append(Case("activations", f"get({spec!r})", lambda s=spec: gatelab.activations.get(s), names))
    cases.append(Case("activations", "register(output_range='x')",
                      lambda: gatelab.activations.register("adv_probe", torch.tanh, output_range="x"), "output_range"))
    bad_fns = {"sum": lambda x: x.sum(), "slice": lambda x: x[..., :1], "float64": lambda x: x.double(),
               "None": lambda x: None, "scalar": lambda x: 3.0, "Linear(3,3)": nn.Linear(3, 3)}
    for kind in LAYERS:
        slot = "activation" if kind == "RNN" else "candidate_activation"
        for label, fn in bad_fns.items():
            for backend in BACKENDS:
                cases.append(Case("activation output", f"{kind}({slot}={label}, backend={backend})",
                                  lambda k=kind, s=slot, f=fn, b=backend: _layer(k, b, **{s: f}), slot))
    flags = {"LSTM": ["layer_norm", "peephole", "coupled", "bidirectional", "batch_first", "residual", "strict", "bias"],
             "GRU": ["reset_after", "bidirectional", "batch_first", "bias"], "RNN": ["bidirectional", "bias"],
             "GatedStateRNN": ["bidirectional", "bias"]}
    for kind, names in flags.items():
        for flag in names:
            for value in ("no", "maybe", 2):
                cases.append(Case("flags", f"{kind}({flag}={value!r})",
                                  lambda k=kind, f=flag, v=value: _layer(k, "auto", **{f: v}), flag))
    numbers = [("forget_bias", "a"), ("forget_bias", True), ("dtype", torch.int64), ("dtype", "float32"),
               ("dropout", 1.5), ("zoneout", -0.1), ("recurrent_dropout", "x"), ("init", "nosuch"),
               ("backend", "gpu"), ("chrono_max_length", 2.5)]
    for kind in LAYERS:
        for name, value in numbers:
            if name == "forget_bias" and kind == "RNN":
                continue
            cases.append(Case("arguments", f"{kind}({name}={value!r})",
                              lambda k=kind, n=name, v=value: _layer(k, "auto", **{n: v}), name))
        for size, value in (("input_size", 0), ("hidden_size", -1), ("num_layers", 2.0), ("hidden_size", True)):
            cases.append(Case("arguments", f"{kind}({size}={value!r})",
                              lambda k=kind, s=size, v=value: LAYERS[k](**{"input_size": 3, "hidden_size": 4, s: v}),
                              size))
    cases.append(Case("arguments", "RNN(nonlinearity='relu', activation='tanh')",
                      lambda: gatelab.RNN(3, 4, nonlinearity="relu", activation="tanh"), "activation or nonlinearity"))
    bad_inputs = {
        "features": (lambda: torch.randn(5, 2, 2), (), {}, "input features"),
        "rank 1": (lambda: torch.randn(3), (), {}, "expected input of shape"),
        "float32 into float64": (lambda: torch.randn(5, 2, 3, dtype=torch.float32), (), {}, "input is torch.float32"),
        "int input": (lambda: torch.zeros(5, 2, 3, dtype=torch.long), (), {}, "floating-point"),
        "T = 0": (lambda: torch.randn(0, 2, 3), (), {}, "at least one time step"),
        "list input": (lambda: [[0.0] * 3] * 5, (), {}, "input must be a Tensor"),
        "hx shape": (lambda: torch.randn(5, 2, 3), ("bad_hx",), {}, "0 of shape"),
        "hx str": (lambda: torch.randn(5, 2, 3), ("h",), {}, "initial state"),
        "lengths bool": (lambda: torch.randn(5, 2, 3), (), {"lengths": torch.tensor([True, True])}, "lengths"),
        "lengths str": (lambda: torch.randn(5, 2, 3), (), {"lengths": "52"}, "lengths"),
        "lengths float": (lambda: torch.randn(5, 2, 3), (), {"lengths": [1.5, 2.0]}, "lengths"),
        "lengths 0": (lambda: torch.randn(5, 2, 3), (), {"lengths": [0, 2]}, "length must be in"),
        "lengths > T": (lambda: torch.randn(5, 2, 3), (), {"lengths": [6, 2]}, "length must be in"),
        "lengths count": (lambda: torch.randn(5, 2, 3), (), {"lengths": [5, 2, 1]}, "lengths"),
    }
    for kind in LAYERS:
        for backend in BACKENDS:
            for label, (make_x, args, kwargs, names) in bad_inputs.items():
                def call(k=kind, b=backend, make_x=make_x, args=args, kwargs=kwargs, label=label):
                    layer = _layer(k, b, dtype=torch.float64)
                    x = make_x()
                    if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and label != "float32 into float64":
                        x = x.double()
                    if args == ("bad_hx",):
                        sizes = layer.cells[0].state_sizes()
                        bad = tuple(torch.zeros(1, 3, s, dtype=torch.float64) for s in sizes)
                        args = (bad[0] if len(bad) == 1 else bad,)
                    return layer(x, *args, **kwargs)
                cases.append(Case("inputs", f"{kind}[{backend}] {label}", call, names))
            cases.append(Case("edge", f"{kind}[{backend}] B = 0",
                              lambda k=kind, b=backend: _layer(k, b)(torch.randn(4, 0, 3)), None))
            for dtype in (torch.bfloat16, torch.float16):
                cases.append(Case("edge", f"{kind}[{backend}] {dtype}",
                                  lambda k=kind, b=backend, d=dtype: _layer(k, b, dtype=d)(torch.randn(4, 2, 3, dtype=d)),
                                  None))
    return cases


def task_cases() -> list[Case]:
    bad = [("adding", {"n_train": 0}, "n_train"), ("adding", {"length": "x"}, "length"), ("adding", {"length": 2.5}, "length"),
           ("adding", {"seed": "a"}, "seed"), ("adding", {"length": True}, "length"), ("copy", {"delay": -1}, "delay"),
           ("copy", {"n_train": -5}, "n_train"), ("digits", {"mode": "nosuch"}, "mode"), ("adding_1997", {"length": 1}, "length"),
           (None, {}, "task"), ("nosuch", {}, "unknown task"), ("ucr:NoSuchSet", {}, "NoSuchSet"),
           ("forecast:NoSuch", {}, "NoSuch"), ("charlm:/no/such/file.txt", {}, "file")]
    return [Case("tasks", f"tasks.get({name!r}, {kw})", lambda n=name, k=kw: gatelab.tasks.get(n, **k), names)
            for name, kw, names in bad]


def cli_cases(tmp: Path) -> list[Case]:
    from gatelab import cli

    good = ROOT / "configs" / "adding_quick.toml"
    binary = tmp / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    text = tmp / "notes.toml"
    text.write_text("just text\n")
    afile = tmp / "afile"
    afile.write_text("x")
    tiny = ["--train.steps=2", "--task.length=5", "--task.n_train=20", "--task.n_val=10", "--task.n_test=10",
            "--quiet", "--runs", str(tmp / "runs")]

    def main(*argv: str) -> Callable[[], object]:
        def call() -> object:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = cli.main(list(argv))
                except SystemExit as e:  # argparse usage errors
                    code = e.code
            lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
            if code == 0:
                return "exit 0"
            if any("Traceback" in ln for ln in lines):
                raise RuntimeError("traceback: " + " | ".join(lines[-2:]))
            raise ValueError(f"exit {code}: " + " | ".join(lines))
        return call

    cases = [
        ("name ..", main("train", str(good), "--name", "..", *tiny), "name"),
        ("name ../../x", main("train", str(good), "--name", "../../x", *tiny), "name"),
        ("name /abs", main("train", str(good), "--name", str(tmp / "abs"), *tiny), "name"),
        ("name .", main("train", str(good), "--name", ".", *tiny), "name"),
        ("name empty", main("train", str(good), "--name", "", *tiny), "name"),
        ("config is a directory", main("train", str(tmp), *tiny), str(tmp)),
        ("config missing", main("train", str(tmp / "missing.toml"), *tiny), "missing.toml"),
        ("binary config", main("train", str(binary), *tiny), "binary.toml"),
        ("runs is a file", main("train", str(good), *tiny[:-2], "--runs", str(afile)), "afile"),
        ("device cuda", main("train", str(good), *tiny, "--train.device=cuda"), "device"),
        ("seed -1", main("train", str(good), *tiny, "--train.seed=-1"), "seed"),
        ("unknown key", main("train", str(good), *tiny, "--train.nosuch=1"), "nosuch"),
        ("wrong type", main("train", str(good), *tiny, "--train.lr=fast"), "lr"),
        ("flag maybe", main("train", str(good), *tiny, "--model.options.peephole=maybe"), "peephole"),
        ("evaluate a toml", main("evaluate", str(text)), "notes.toml"),
        ("evaluate missing", main("evaluate", str(tmp / "none.pt")), "none.pt"),
        ("diagnose missing", main("diagnose", str(tmp / "missing.pt")), "missing.pt"),
        ("generate missing", main("generate", str(tmp / "missing.pt")), "missing.pt"),
        ("list bad", main("list", "nosuch"), "nosuch|invalid choice"),
    ]
    return [Case("cli", label, call, names) for label, call, names in cases]


def classify(case: Case) -> tuple[str, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            case.run()
    except (ValueError, TypeError) as e:
        if case.names is None:
            return "unclear", f"raised for valid input: {type(e).__name__}: {e}"
        text = str(e)
        return ("clear", text) if re.search(case.names, text) else ("unclear", text)
    except Exception as e:  # noqa: BLE001 - the point is to see everything
        return "crash", f"{type(e).__name__}: {str(e)[:300]}"
    return ("clear", "ran") if case.names is None else ("silent", "no error")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write every case's outcome here")
    p.add_argument("--only", default="", help="only categories starting with this")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cases = [c for c in library_cases() + task_cases() + cli_cases(Path(tmp)) if c.category.startswith(args.only)]
        results = []
        for case in cases:
            outcome, detail = classify(case)
            results.append({"category": case.category, "case": case.name, "outcome": outcome, "detail": detail})
            if outcome != "clear":
                print(f"{outcome:<8} {case.category:<18} {case.name}: {detail[:200]}")
    counts: dict[str, Counter] = {}
    for r in results:
        counts.setdefault(r["category"], Counter())[r["outcome"]] += 1
    total = Counter(r["outcome"] for r in results)
    print(f"\n{'category':<18} {'tried':>6} {'clear':>6} {'unclear':>8} {'crash':>6} {'silent':>7}")
    for cat, c in [*counts.items(), ("all", total)]:
        print(f"{cat:<18} {sum(c.values()):>6} {c['clear']:>6} {c['unclear']:>8} {c['crash']:>6} {c['silent']:>7}")
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": {k: dict(v) for k, v in counts.items()}, "cases": results},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
