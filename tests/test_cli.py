"""The command line end to end on tiny configs: in-process through gatelab.cli.main, and once as a process."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import gatelab
from gatelab.cli import main, parser, result_line
from gatelab.demo import run_demo

REPO = Path(__file__).resolve().parents[1]

TINY = """
name = "tiny"
[task]
name = "adding"
length = 6
n_train = 64
n_val = 32
n_test = 32
[model]
cell = "gru"
hidden_sizes = [6]
gate_activation = "hard_sigmoid"
[train]
steps = 8
batch_size = 16
eval_every = 4
lr = 1e-2
threads = 1
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def test_train_then_evaluate_and_list(tiny, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["train", str(tiny), "--runs", str(runs), "--quiet", "--train.steps=12", "--model.hidden_sizes", "5"]) == 0
    out = capsys.readouterr().out
    assert "tiny: test mse" in out and "baseline" in out
    run = runs / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["engines"] == ["fused"]
    assert "hidden_sizes = [5]" in (run / "config.toml").read_text()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3

    weights = "best.pt" if summary["weights"].startswith("best") else "last.pt"
    assert main(["evaluate", str(run / weights)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test"] == summary["final"]["test"]
    assert evaluated["baseline_test"] == summary["baseline"]["test"]

    assert main(["train", str(tiny), "--runs", str(runs), "--quiet"]) == 1  # exists: resume or overwrite
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", str(tiny), "--runs", str(runs), "--quiet", "--resume", "--train.steps=12",
                 "--model.hidden_sizes=5"]) == 0  # finished run: nothing left to do, same numbers
    assert json.loads((run / "summary.json").read_text())["final"] == summary["final"]

    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    for word in ("gated_state", "hard_sigmoid", "CIFG", "orthogonal", "ucr:GunPoint", "configs/seed004_lstm.toml"):
        assert word in listing


def test_bad_overrides_and_checkpoints_fail_with_one_line(tiny, tmp_path, capsys):
    assert main(["train", str(tiny), "--runs", str(tmp_path), "--train.lr=fast"]) == 2
    assert "train.lr: expected float, got 'fast'" in capsys.readouterr().err
    assert main(["train", str(tiny), "--runs", str(tmp_path), "--model.gate_activaton=relu"]) == 2
    assert "Did you mean 'model.gate_activation'?" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["evaluate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.pt: not a checkpoint: it is a text file" in err and "tampered" not in err
    torch.save({"format": "gatelab-checkpoint", "model": Exception("builds an object")}, bad)
    assert main(["evaluate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.pt: refused" in err and "weights_only" not in err


def test_train_as_a_separate_process(tiny, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gatelab.cli", "train", str(tiny), "--runs", str(tmp_path), "--name", "proc",
         "--train.steps=4"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "proc: test mse" in result.stdout
    assert "proc [" in result.stderr  # the progress bar (not a terminal: whole lines)
    assert json.loads((tmp_path / "proc" / "summary.json").read_text())["steps"] == 4


def test_generate_samples_from_a_charlm_checkpoint(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question. " * 30)
    cfg = tmp_path / "lm.toml"
    cfg.write_text(f'name = "lm"\n[task]\nname = "charlm:{text}"\nseq_len = 16\n[model]\nhidden_sizes = [16]\n'
                   f"embedding_dim = 8\n[train]\nsteps = 6\nbatch_size = 4\ntbptt_k1 = 8\nthreads = 1\n")
    assert main(["train", str(cfg), "--runs", str(tmp_path), "--quiet"]) == 0
    capsys.readouterr()
    ckpt = str(tmp_path / "lm" / "last.pt")
    assert main(["generate", ckpt, "--length", "40", "--prime", "to be", "--temperature", "0.8", "--seed", "3"]) == 0
    first = capsys.readouterr().out.rstrip("\n")
    assert first.startswith("to be") and len(first) == 45 and set(first) <= set(text.read_text())
    assert main(["generate", ckpt, "--length", "40", "--prime", "to be", "--temperature", "0.8", "--seed", "3"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == first  # seeded
    assert main(["generate", ckpt, "--prime", "Zebra"]) == 1
    assert "characters the model never saw: ['Z']" in capsys.readouterr().err


def test_diagnose_calls_the_diagnostics_entry_point(tmp_path, monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("gatelab.diagnostics")
    fake.diagnose_main = lambda target, out_dir, quiet: calls.append((target, out_dir, quiet)) or {"verdict": "x"}
    monkeypatch.setitem(sys.modules, "gatelab.diagnostics", fake)
    monkeypatch.setattr(gatelab, "diagnostics", fake, raising=False)
    assert main(["diagnose", "runs/x/last.pt", "--out", str(tmp_path), "--quiet"]) == 0
    assert calls == [("runs/x/last.pt", tmp_path, True)]
    del fake.diagnose_main
    assert main(["diagnose", "runs/x/last.pt"]) == 1
    assert "diagnostics are not installed" in capsys.readouterr().err


def test_bench_runs_benchmarks_speed(capsys):
    assert main(["bench", "--tiny", "--no-memory", "--cells", "rnn"]) == 0
    assert "| rnn | 8 | fwd+bwd |" in capsys.readouterr().out
    argv0 = sys.argv[0]
    for argv in (["bench", "--help"], ["--debug", "bench", "-h"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: gatelab bench ")
    assert sys.argv[0] == argv0


def test_every_option_has_a_help_text(capsys):
    subcommands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in subcommands.items():
        for action in sub._actions:
            assert action.help or name == "bench", f"gatelab {name} {action.dest}: no help text"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--debug" in capsys.readouterr().out


def test_the_last_line_says_whether_the_run_beat_its_baseline(tiny, tmp_path, capsys):
    summary = {"name": "t", "headline": "mse", "final": {"val": {"mse": 0.2}, "test": {"mse": 0.1}},
               "baseline": {"val": {"mse": 0.17}, "test": {"mse": 0.17}}, "steps": 5, "wall_seconds": 1.0,
               "beats_baseline": True}
    beat = result_line(summary, Path("runs/t"))
    assert beat == "t: test mse 0.1000 (baseline 0.1700), 5 steps, 1.0 s; results in runs/t"
    missed = result_line({**summary, "beats_baseline": False}, Path("runs/t"))
    assert missed != beat and "did not beat the baseline (0.1700)" in missed
    assert "no test split" in result_line({**summary, "final": {"val": {"mse": 0.2}}, "beats_baseline": None},
                                          Path("runs/t"))
    assert main(["train", str(tiny), "--runs", str(tmp_path), "--quiet", "--train.lr=0"]) == 0  # cannot learn
    assert "tiny: test mse" in (out := capsys.readouterr().out) and "did not beat the baseline" in out


def test_demo_grid_writes_its_table_and_reports_divergence(tiny, tmp_path):
    rows = run_demo(tmp_path / "demo", configs=[tiny], cells=("rnn", "lstm"), activations=("relu",),
                    overrides=["train.steps=4"], quiet=True)
    assert [(r["cell"], r["activation"], r["engine"]) for r in rows] == [("rnn", "relu", "native"),
                                                                        ("lstm", "relu", "fused")]
    table = (tmp_path / "demo" / "results.md").read_text()
    assert "| adding | lstm | relu | fused |" in table and "baseline" in table
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["rows"][0]["metric"] == "mse"
    exploding = run_demo(tmp_path / "boom", configs=[tiny], cells=("rnn",), activations=("relu",),
                         overrides=["train.optimizer=sgd", "train.lr=1e10", "train.steps=6"], quiet=True)
    assert exploding[0]["diverged"] and exploding[0]["status"].startswith("diverged at step")
    assert "diverged at step" in (tmp_path / "boom" / "results.md").read_text()


def test_import_makes_user_tasks_and_activations_usable_from_the_cli(tmp_path, capsys):
    plugin = tmp_path / "myplugin.py"
    plugin.write_text(
        "import torch\n"
        "import gatelab\n"
        "from gatelab.tasks.synthetic import AddingTask\n"
        "class ShortAdding(AddingTask):\n"
        "    pass\n"
        "if 'short_adding' not in gatelab.tasks.available():\n"
        "    gatelab.tasks.register('short_adding', ShortAdding)\n"
        "    gatelab.activations.register('plugin_tanh', lambda x: torch.tanh(0.5 * x))\n")
    config = tmp_path / "c.toml"
    config.write_text('name = "plug"\n[task]\nname = "short_adding"\nlength = 6\nn_train = 40\nn_val = 10\nn_test = 10\n'
                      '[model]\ncell = "gru"\nhidden_sizes = [4]\ncandidate_activation = "plugin_tanh"\n'
                      '[train]\nsteps = 3\nbatch_size = 8\n')
    runs = tmp_path / "runs"
    try:
        assert main(["--import", str(plugin), "train", str(config), "--runs", str(runs), "--quiet"]) == 0
        assert main(["evaluate", str(runs / "plug" / "last.pt"), f"--import={plugin}"]) == 0
        assert '"mse"' in capsys.readouterr().out
        assert main(["train", str(config), "--import", str(tmp_path / "missing.py"), "--runs", str(runs)]) == 2
        assert "--import" in capsys.readouterr().err
        assert main(["list", "tasks", "--import", "no_such_module_here"]) == 2
        assert "No module named 'no_such_module_here'" in capsys.readouterr().err
    finally:
        from gatelab import activations, tasks

        tasks._TASKS.pop("short_adding", None)
        activations._FAMILIES.pop("plugin_tanh", None)
