"""The trainer: beats a baseline, truncated BPTT, resume, checkpoints, configs, NaN stops, reproducibility."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gatelab
from gatelab.callbacks import Callback, ProgressBar
from gatelab.checkpoint import CheckpointError, LockedError, atomic_write, exclusive, load_checkpoint, safe_child
from gatelab.config import ConfigError, TrainConfig, from_dict, load, to_toml
from gatelab.data import Minibatches, StreamWindows, Unit
from gatelab.models import SequenceModel, detach_state
from gatelab.train import NonFiniteError, evaluate, fit, learning_rate, unit_loss

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def config(task=None, model=None, train=None, name="t"):
    """A tiny experiment: adding with T = 8 unless told otherwise; one thread, a few steps."""
    task = task or {"name": "adding", "length": 8, "n_train": 200, "n_val": 50, "n_test": 50}
    model = {"cell": "lstm", "hidden_sizes": [8], **(model or {})}
    train = {"steps": 12, "batch_size": 16, "eval_every": 4, "threads": 1, "lr": 1e-2, **(train or {})}
    return from_dict({"name": name, "task": task, "model": model, "train": train})


def params(run):
    return {k: v.clone() for k, v in run.model.state_dict().items()}


# -- training works ------------------------------------------------------------------------------


def test_adding_t20_beats_the_baseline(tmp_path):
    cfg = config(task={"name": "adding", "length": 20, "n_train": 2000, "n_val": 200, "n_test": 1000},
                 model={"hidden_sizes": [16]},
                 train={"seed": 1, "steps": 600, "batch_size": 50, "lr": 1e-2, "clip_norm": 1.0, "eval_every": 100})
    run = fit(cfg, run_dir=tmp_path / "run", quiet=True)
    test = run.summary["final"]["test"]["mse"]
    assert run.summary["baseline"]["test"]["mse"] == pytest.approx(1 / 6, abs=0.02)
    assert test < 0.05, f"test MSE {test} after 600 steps"  # it leaves the plateau near step 300 (0.012)
    assert run.summary["beats_baseline"]
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.toml", "metrics.jsonl", "summary.json", "last.pt", "best.pt"} <= files
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines] == list(range(100, 601, 100))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["parameters"] == sum(p.numel() for p in run.model.parameters())
    assert summary["seconds_per_epoch"] > 0 and summary["engines"] == ["native"]
    assert load(tmp_path / "run" / "config.toml") == cfg


def test_same_config_and_seed_give_the_same_numbers(tmp_path):
    cfg = config(model={"dropout": 0.3, "hidden_sizes": [8, 8], "gate_activation": "hard_sigmoid"})
    a = fit(cfg, run_dir=tmp_path / "a", quiet=True)
    b = fit(cfg, run_dir=tmp_path / "b", quiet=True)
    assert a.summary["final"] == b.summary["final"]
    for (k, v), w in zip(params(a).items(), params(b).values()):
        assert torch.equal(v, w), k
    c = fit(cfg.replace(**{"train.seed": 1}), run_dir=tmp_path / "c", quiet=True)
    assert c.summary["final"] != a.summary["final"]


# -- truncated BPTT ------------------------------------------------------------------------------


def test_truncated_bptt_with_k1_k2_equal_to_the_length_is_full_bptt(tmp_path):
    task = {"name": "copy", "length": 4, "n_train": 64, "n_val": 16, "n_test": 16}  # 24 steps, a target at each
    full = fit(config(task, train={"steps": 6}), run_dir=tmp_path / "full", quiet=True)
    tbptt = fit(config(task, train={"steps": 6, "tbptt_k1": 24, "tbptt_k2": 24}), run_dir=tmp_path / "tb", quiet=True)
    for (k, v), w in zip(params(full).items(), params(tbptt).values()):
        assert torch.equal(v, w), k
    short = fit(config(task, train={"steps": 6, "tbptt_k1": 8}), run_dir=tmp_path / "short", quiet=True)
    assert short.step == 6 and not torch.equal(params(short)["head.weight"], params(full)["head.weight"])


def test_truncated_window_gradient_equals_a_detached_rerun(gen):
    """k1 = 3, k2 = 5: the loss of steps [6, 9) backpropagates through [4, 9) and no further."""
    torch.manual_seed(0)
    model = SequenceModel(6, 6, cell="gru", hidden_sizes=(5,), head="every", objective="cross_entropy",
                          gate_activation="hard_sigmoid")
    ids = torch.randint(0, 6, (2, 40), generator=gen)
    windows = StreamWindows(ids.reshape(-1), batch_size=2, k1=3, k2=5)
    x, y = windows.x, windows.y
    state = None
    for j in range(3):  # windows ending at 3, 6, 9
        unit = windows(j)
        model.zero_grad()
        loss, carry = unit_loss(model, unit, None if unit.fresh else state)
        loss.backward()
        state = detach_state(carry)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        _, s4 = model(x[:, :4])  # the state at step 4, cut from the graph
    model.zero_grad()
    out, _ = model(x[:, 4:9], None, s4)
    model.criterion(out[:, 2:], y[:, 6:9]).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("k1,k2,T", [(3, 3, 10), (3, 5, 10), (4, 9, 13), (5, 5, 5)])
def test_windows_score_every_target_once(k1, k2, T):
    ds = gatelab.tasks.SequenceDataset(torch.zeros(4, T, 1), torch.arange(T).repeat(4, 1))
    batches = Minibatches(ds, batch_size=4, seed=0, tbptt=(k1, k2))
    units = [batches(j) for j in range(batches.windows)]
    assert torch.cat([u.y[0] for u in units]).tolist() == list(range(T))
    assert all(u.x.shape[1] <= k2 and u.targets <= u.x.shape[1] for u in units)
    assert [u.fresh for u in units] == [True] + [False] * (len(units) - 1)


def test_truncated_bptt_on_a_one_target_task_runs_one_step_per_batch(tmp_path):
    """It used to be refused; now the last k2 steps of each sequence are backpropagated (see the test below)."""
    plain = fit(config(), run_dir=tmp_path / "plain", quiet=True)
    cut = fit(config(train={"tbptt_k1": 4}), run_dir=tmp_path / "cut", quiet=True)
    assert cut.steps_per_epoch == plain.steps_per_epoch and cut.step == plain.step


# -- resume and checkpoints -------------------------------------------------------------------------


class Interrupt(Callback):
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, run, step, loss, batch):
        if step == self.at:
            raise KeyboardInterrupt


def charlm_task(tmp_path: Path) -> dict:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return {"name": f"charlm:{path}", "seq_len": 20}


@pytest.mark.parametrize("kind", ["adding", "charlm"])
def test_resume_after_an_interruption_gives_the_same_final_metrics(kind, tmp_path):
    if kind == "adding":  # dropout draws from the torch RNG, so its state must come back exactly
        cfg = config(model={"hidden_sizes": [8, 8], "dropout": 0.2}, train={"steps": 16, "checkpoint_every": 4})
    else:  # truncated BPTT over a stream: the carried state must come back too
        cfg = config(charlm_task(tmp_path), {"embedding_dim": 6},
                     train={"steps": 16, "checkpoint_every": 4, "tbptt_k1": 5, "tbptt_k2": 7, "batch_size": 4})
    whole = fit(cfg, run_dir=tmp_path / "whole", quiet=True)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, run_dir=tmp_path / "cut", quiet=True, callbacks=[Interrupt(at=10)])
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 8
    resumed = fit(cfg, run_dir=tmp_path / "cut", quiet=True, resume=True)
    assert resumed.summary["final"] == whole.summary["final"]
    for (k, v), w in zip(params(whole).items(), params(resumed).values()):
        assert torch.equal(v, w), k
    strip = lambda p: [{k: v for k, v in json.loads(s).items() if k != "train_seconds"}  # noqa: E731
                       for s in p.read_text().splitlines()]
    assert strip(tmp_path / "cut" / "metrics.jsonl") == strip(tmp_path / "whole" / "metrics.jsonl")


def test_truncated_and_tampered_checkpoints_give_clear_errors(tmp_path):
    fit(config(train={"steps": 4}), run_dir=tmp_path / "run", quiet=True)
    good = (tmp_path / "run" / "last.pt").read_bytes()
    bad = tmp_path / "bad.pt"

    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"bad\.pt: cannot be read: the file is truncated or corrupt"):
        load_checkpoint(bad)

    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # inside tensor data: torch's reader does not notice
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"bad\.pt: the content does not match its SHA-256 digest"):
        load_checkpoint(bad)

    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "gatelab-checkpoint", "model": Payload()}, bad)
    with pytest.raises(CheckpointError, match=r"bad\.pt: refused: .* nothing was executed"):
        load_checkpoint(bad)
    assert not marker.exists()

    bad.write_bytes(pickle.dumps({"format": "gatelab-checkpoint"}))  # not even a torch zip
    with pytest.raises(CheckpointError, match=r"bad\.pt"):
        load_checkpoint(bad)
    torch.save({"format": "something else"}, bad)
    with pytest.raises(CheckpointError, match="not a gatelab checkpoint"):
        load_checkpoint(bad)

    (tmp_path / "run" / "last.pt").write_bytes(good[:100])
    with pytest.raises(CheckpointError, match=r"last\.pt: cannot be read"):
        fit(config(train={"steps": 4}), run_dir=tmp_path / "run", quiet=True, resume=True)


def test_a_failed_write_keeps_the_last_good_file(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    atomic_write(target, b"good")

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"half-written")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_resume_refuses_another_configuration(tmp_path):
    fit(config(train={"steps": 4}), run_dir=tmp_path, quiet=True)
    with pytest.raises(ConfigError, match=r"train.lr: 0.01 -> 0.02"):
        fit(config(train={"steps": 4, "lr": 2e-2}), run_dir=tmp_path, quiet=True, resume=True)
    with pytest.raises(FileExistsError, match="already holds a run"):
        fit(config(train={"steps": 4}), run_dir=tmp_path, quiet=True)


# -- configuration ---------------------------------------------------------------------------------


def test_bad_overrides_and_files_give_clear_errors(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(to_toml(config()))
    cases = [
        (["train.lrr=1e-3"], r"unknown key 'train.lrr'. Did you mean 'train.lr'\?"),
        (["train.lr=fast"], r"train.lr: expected float, got 'fast'"),
        (["train.steps=1.5"], r"train.steps: expected int, got '1.5'"),
        (["model.hidden_sizes=[8, 'a']"], r"model.hidden_sizes: expected a list of int"),
        (["train.deterministic=maybe"], r"train.deterministic: expected bool"),
        (["task.lenght=3"], r"unknown option of task 'adding' 'task.lenght'. Did you mean 'task.length'\?"),
        (["task.length=long"], r"task.length: expected int, got 'long'"),
        (["optim.lr=1"], r"unknown key 'optim.lr'"),
        (["model.cell=transformer"], r"model.cell: expected one of 'lstm', 'gru', 'rnn', 'gated_state'"),
        (["model.gate_activation=sigmod"], r"model.gate_activation: unknown activation 'sigmod'"),
        (["train.optimizer=adagrad"], r"train.optimizer: expected one of"),
        (["train.lr"], r"expected KEY=VALUE"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load(path, overrides)
    path.write_text('[train]\nsteps = "many"\n')
    with pytest.raises(ConfigError, match=r"exp.toml: train.steps: expected int, got 'many' \(str\)"):
        load(path)
    path.write_text("[trian]\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian'"):
        load(path)


def test_overrides_are_typed_and_the_resolved_config_round_trips(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(to_toml(config()))
    cfg = load(path, ["--train.lr=1e-3", "--model.gate_activation", "hard_sigmoid", "model.hidden_sizes=64,32",
                      "model.forget_bias=1", "train.deterministic=false", "task.length=30",
                      'model.options={variant = "CIFG"}', "model.options.zoneout=0.1", "name=other"])
    assert cfg.train.lr == 1e-3 and cfg.model.gate_activation == "hard_sigmoid"
    assert cfg.model.hidden_sizes == (64, 32) and cfg.model.forget_bias == 1.0
    assert cfg.train.deterministic is False and cfg.task.options["length"] == 30
    assert cfg.model.options == {"variant": "CIFG", "zoneout": 0.1} and cfg.name == "other"
    assert load(path, ["model.gate_activation={f = 'sigmoid', i = 'elliott'}"]).model.gate_activation == {
        "f": "sigmoid", "i": "elliott"}
    assert load(path, ["model.forget_bias=none"]).model.forget_bias is None
    path.write_text(to_toml(cfg))
    assert load(path) == cfg


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.toml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load(path)
    assert cfg.name and cfg.train.steps > 0


def test_learning_rate_schedules():
    cos = TrainConfig(lr=1.0, schedule="cosine", warmup_steps=10, min_lr=0.1, steps=110)
    assert learning_rate(cos, 0, 110) == pytest.approx(0.1)
    assert learning_rate(cos, 9, 110) == pytest.approx(1.0)
    assert learning_rate(cos, 60, 110) == pytest.approx(0.55)
    assert learning_rate(cos, 110, 110) == pytest.approx(0.1)
    step = TrainConfig(lr=1.0, schedule="step", step_every=5, gamma=0.5)
    assert [learning_rate(step, s, 20) for s in (0, 4, 5, 10)] == [1.0, 1.0, 0.5, 0.25]
    assert learning_rate(TrainConfig(lr=0.3), 1000, 10) == 0.3


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "rmsprop", "sgd"])
def test_optimisers_clipping_and_regularisers(optimizer, tmp_path):
    seen = {}

    class Grads(Callback):
        def on_step_end(self, run, step, loss, batch):
            seen[step] = max(float(p.grad.abs().max()) for p in run.model.parameters())

    cfg = config(train={"steps": 3, "optimizer": optimizer, "clip_value": 1e-3, "l1": 1e-3, "weight_decay": 1e-2})
    run = fit(cfg, run_dir=tmp_path, quiet=True, callbacks=[Grads()])
    assert type(run.optimizer).__name__.lower() == optimizer
    assert run.optimizer.param_groups[0]["weight_decay"] == 1e-2 and run.optimizer.param_groups[1]["weight_decay"] == 0
    assert max(seen.values()) == pytest.approx(1e-3)  # clipped by value (the raw gradients are larger)


# -- NaN / Inf -------------------------------------------------------------------------------------


def test_a_nan_gradient_stops_the_run_naming_step_and_parameter(tmp_path):
    class Poison(Callback):
        def on_step_end(self, run, step, loss, batch):
            if step == 2:
                run.model.layers[0].cells[0].weight_hh.register_hook(lambda g: g * float("nan"))

    with pytest.raises(NonFiniteError, match=r"stopped at step 3: the gradient of layers.0.weight_hh_l0 is not finite") as err:
        fit(config(), run_dir=tmp_path, quiet=True, callbacks=[Poison()])
    assert (err.value.step, err.value.tensor) == (3, "grad:layers.0.weight_hh_l0")
    report = json.loads((tmp_path / "failure.json").read_text())
    assert report["step"] == 3 and "weight_hh_l0" in report["tensor"]


def test_a_nan_loss_stops_the_run_naming_the_parameter(tmp_path):
    class Poison(Callback):
        def on_step_end(self, run, step, loss, batch):
            if step == 5:
                with torch.no_grad():
                    run.model.head.bias.fill_(float("inf"))

    with pytest.raises(NonFiniteError, match=r"step 6: the loss is (nan|inf) \(non-finite parameters: head.bias\)"):
        fit(config(), run_dir=tmp_path, quiet=True, callbacks=[Poison()])
    assert json.loads((tmp_path / "failure.json").read_text())["tensor"] == "loss"
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4  # the last good checkpoint is kept


# -- callbacks, early stopping, evaluation ------------------------------------------------------------


def test_callbacks_see_the_run_and_can_stop_it(tmp_path):
    events = []

    class Record(Callback):
        def on_train_start(self, run):
            events.append(("start", run.step, run.task.name, type(run.optimizer).__name__, run.run_dir == tmp_path))

        def on_step_end(self, run, step, loss, batch):
            assert isinstance(batch, Unit) and math.isfinite(loss) and step == run.step
            events.append(("step", step))
            run.stop = step == 6

        def on_eval(self, run, step, split, metrics):
            events.append(("eval", step, split, sorted(metrics)))

        def on_train_end(self, run):
            events.append(("end", run.step, run.config.name))

    run = fit(config(), run_dir=tmp_path, quiet=True, callbacks=[Record()])
    assert events[0] == ("start", 0, "adding", "Adam", True)
    assert events[1:6] == [("step", 1), ("step", 2), ("step", 3), ("step", 4), ("eval", 4, "val", ["loss", "mae", "mse"])]
    assert events[-1] == ("end", 6, "t") and run.summary["stopped_early"]


def test_early_stopping_and_best_weights(tmp_path):
    cfg = config(train={"steps": 40, "lr": 1.0, "optimizer": "sgd", "patience": 2, "eval_every": 2})
    run = fit(cfg, run_dir=tmp_path, quiet=True)
    best = run.summary["best"]
    assert run.summary["stopped_early"] and run.step == best["step"] + 2 * 2
    assert run.summary["final"]["val"]["mse"] == pytest.approx(best["value"], abs=0, rel=0)


def test_variable_lengths_are_scored_with_the_task_metrics(tmp_path):
    task = {"name": "adding_1997", "length": 10, "n_train": 64, "n_val": 16, "n_test": 32}  # lengths 10..11
    run = fit(config(task, train={"steps": 4}), run_dir=tmp_path, quiet=True)
    metrics = evaluate(run.model, run.task, "test")
    assert set(metrics) == {"accuracy", "mse", "mae", "loss"}
    assert metrics["loss"] == pytest.approx(metrics["mse"], rel=1e-5)


# -- run directories: names, the lock, stale temporaries, failed writes -----------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/abs", "a\\b", "a\0b", "  "])
def test_a_run_name_that_could_leave_runs_is_refused(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^name: .* cannot name a folder inside runs"):
        fit(config(name=name), quiet=True)
    with pytest.raises(ConfigError, match=r"^--name: "):
        safe_child(tmp_path, name, "--name")
    assert list(tmp_path.iterdir()) == []
    assert safe_child(tmp_path, "run-1.b..c", "--name") == tmp_path / "run-1.b..c"


def test_a_second_process_cannot_train_in_a_held_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    script = ("import time\nfrom gatelab.checkpoint import exclusive\n"
              f"with exclusive({str(run_dir)!r}):\n    print('held', flush=True)\n    time.sleep(60)")
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline().strip() == "held"
            with pytest.raises(LockedError, match=rf"^{run_dir}: another process holds this run directory"):
                fit(config(train={"steps": 4}), run_dir=run_dir, quiet=True)
            assert not (run_dir / "config.toml").exists()
        finally:
            holder.terminate()
    fit(config(train={"steps": 4}), run_dir=run_dir, quiet=True)  # the kernel dropped the lock with its holder
    with exclusive(run_dir), pytest.raises(LockedError):  # held in this process, through another open file
        fit(config(train={"steps": 4}), run_dir=run_dir, quiet=True, overwrite=True)


def test_stale_temporaries_of_a_killed_write_are_removed_on_start_and_resume(tmp_path):
    cfg = config(train={"steps": 4})
    stale = [".last.pt.abcd_123.tmp", ".config.toml.zz9zz9zz.tmp", ".best.pt.00000000.tmp", ".summary.json.k1k2k3k4.tmp"]
    kept = [".other.abcdefgh.tmp", ".last.pt.short.tmp", "x.last.pt.abcdefgh.tmp", ".last.pt.abcdefgh.tmp.keep", "notes.txt"]
    for resume in (False, True):
        run_dir = tmp_path / str(resume)
        if resume:
            fit(cfg, run_dir=run_dir, quiet=True)
        run_dir.mkdir(exist_ok=True)
        for name in stale + kept:
            (run_dir / name).write_bytes(b"half")
        (tmp_path / ".last.pt.abcdefgh.tmp").write_bytes(b"not in the run directory")
        fit(cfg, run_dir=run_dir, quiet=True, resume=resume)
        names = {p.name for p in run_dir.iterdir()}
        assert not names & set(stale) and set(kept) <= names, names
        assert (tmp_path / ".last.pt.abcdefgh.tmp").exists()


def test_a_full_disk_at_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    real, writes = os.fsync, []

    def fsync(fd):
        if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            writes.append(fd)
            if len(writes) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match=r"No space left on device") as err:
        fit(config(train={"steps": 12, "checkpoint_every": 4}), run_dir=tmp_path, quiet=True)
    assert err.value.filename == str(tmp_path / "last.pt")  # the file it was writing, for the one-line error
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_device_that_is_not_there_is_a_config_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match=r"^train.device: 'cuda', but CUDA is not available"):
        fit(config(train={"device": "cuda"}), run_dir=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"train.device: expected 'cpu', 'cuda\[:N\]' or 'auto'"):
        config(train={"device": "cudax"})


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_seeds_torch_and_numpy_cannot_take_are_config_errors(seed):
    with pytest.raises(ConfigError, match=rf"train.seed: expected an integer in \[0, 2\*\*64\), got {seed}"):
        config(train={"seed": seed})
    config(train={"seed": 2**64 - 1})


def test_the_progress_line_says_which_step_its_metric_is_from(tmp_path):
    stream = io.StringIO()
    fit(config(), run_dir=tmp_path, quiet=True, callbacks=[ProgressBar(stream)])
    lines = stream.getvalue().splitlines()
    assert "val mse" not in lines[2] and "val mse" not in lines[3]  # steps 3, 4: no evaluation yet
    assert re.search(r" 5/12 loss \S+ val mse \S+ @ step 4 ", lines[4]), lines[4]
    assert re.search(r" 9/12 loss \S+ val mse \S+ @ step 8 ", lines[8]), lines[8]


def test_a_text_file_is_not_a_checkpoint_rather_than_a_tampered_one(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(to_toml(config()))
    with pytest.raises(CheckpointError, match=r"exp.toml: not a checkpoint: it is a text file"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"exp.toml: is empty"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path)


def test_no_test_never_reads_the_test_split(tmp_path, capsys):
    """train.score_test=false / --no-test: a task that raises when its test split or test baseline is read
    trains and reports validation only."""
    from gatelab import cli, tasks
    from gatelab.tasks.synthetic import AddingTask

    class Sealed(AddingTask):
        def split(self, split):
            if split == "test":
                raise AssertionError("the test split was read")
            return super().split(split)

        def baseline(self, split="test", which=None):
            if split == "test":
                raise AssertionError("the test baseline was read")
            return super().baseline(split, which)

    tasks.register("sealed_adding", Sealed)
    try:
        config = tmp_path / "sealed.toml"
        config.write_text('name = "sealed"\n[task]\nname = "sealed_adding"\nlength = 6\nn_train = 40\nn_val = 10\n'
                          'n_test = 10\n[model]\ncell = "gru"\nhidden_sizes = [4]\n[train]\nsteps = 4\nbatch_size = 8\n')
        assert cli.main(["train", str(config), "--runs", str(tmp_path / "runs"), "--quiet", "--no-test"]) == 0
        summary = json.loads((tmp_path / "runs" / "sealed" / "summary.json").read_text())
        assert set(summary["final"]) == {"val"} and set(summary["baseline"]) == {"val"}
        assert "val mse" in capsys.readouterr().out
        with pytest.raises(AssertionError, match="the test split was read"):
            gatelab.fit(gatelab.config.load(config), run_dir=tmp_path / "with-test", quiet=True)
    finally:
        tasks._TASKS.pop("sealed_adding", None)  # the registry has no public unregister


def test_a_wall_time_budget_fits_the_steps_and_the_schedule_and_ends_with_a_final_evaluation(tmp_path, monkeypatch):
    """train.max_minutes: with every step taking a fake 1 s, a 1-minute budget (10 % kept for the end) fits
    about 54 steps of the asked 1000; the cosine schedule reaches its floor at the fitted end."""
    import gatelab.train as T

    clock = [1000.0]
    real_unit_loss = T.unit_loss

    def slow_unit_loss(*args, **kwargs):
        clock[0] += 1.0
        return real_unit_loss(*args, **kwargs)

    monkeypatch.setattr(T.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(T, "unit_loss", slow_unit_loss)
    lrs = []
    cfg = gatelab.config.load("configs/adding_quick.toml", [
        "train.steps=1000", "train.max_minutes=1.0", "train.schedule=cosine", "train.eval_every=20", "task.length=6",
        "task.n_train=64", "task.n_val=16", "task.n_test=16", "train.batch_size=8"])

    class Record(gatelab.Callback):
        def on_step_end(self, run, step, loss, unit):
            lrs.append(run.optimizer.param_groups[0]["lr"])

    run = gatelab.fit(cfg, run_dir=tmp_path / "budget", quiet=True, callbacks=[Record()])
    s = run.summary
    assert s["budget"]["max_minutes"] == 1.0 and 45 <= s["budget"]["fitted_steps"] <= 56
    assert s["steps"] == s["budget"]["fitted_steps"] and "test" in s["final"]
    assert lrs[-1] < 0.05 * lrs[0]  # the schedule was fitted to the budget, not to the asked 1000 steps


def test_max_steps_caps_epochs_and_steps(tmp_path):
    cfg = gatelab.config.load("configs/adding_quick.toml", ["train.epochs=50", "train.max_steps=7", "task.length=6",
                                                             "task.n_train=64", "task.n_val=16", "task.n_test=16"])
    run = gatelab.fit(cfg, run_dir=tmp_path / "cap", quiet=True)
    assert run.summary["steps"] == 7 and run.summary["budget"]["max_steps"] == 7


def test_fit_names_what_it_takes():
    with pytest.raises(TypeError, match="fit takes an ExperimentConfig .*got function"):
        gatelab.fit(lambda x: x)


def test_truncated_bptt_for_one_target_tasks_backpropagates_the_last_k2_steps():
    """The loss is the full forward's; the gradient is that of the last k2 steps from the prefix's detached
    state; k2 = T is full BPTT exactly."""
    from gatelab.data import Minibatches
    from gatelab.train import unit_loss

    task = gatelab.tasks.get("adding", length=12, n_train=32, n_val=8, n_test=8)
    torch.manual_seed(0)
    model = gatelab.SequenceModel(2, 1, cell="gru", hidden_sizes=(6,), head="last")
    full = Minibatches(task.split("train"), 8, 0)(0)
    cut = Minibatches(task.split("train"), 8, 0, (4, 4), one_target=True)(0)
    same = Minibatches(task.split("train"), 8, 0, (12, 12), one_target=True)(0)
    assert cut.prefix == 8 and same.prefix == 0 and torch.equal(cut.x, full.x)
    grads = {}
    for name, unit in (("full", full), ("cut", cut), ("same", same)):
        model.zero_grad()
        loss, _ = unit_loss(model, unit, None)
        loss.backward()
        grads[name] = (loss.item(), model.layers[0].weight_hh_l0.grad.clone())
    assert grads["cut"][0] == pytest.approx(grads["full"][0], abs=1e-6)  # the same forward
    torch.testing.assert_close(grads["same"][1], grads["full"][1], rtol=0, atol=1e-7)
    with torch.no_grad():
        _, prefix_state = model(full.x[:, :8])
    model.zero_grad()
    out, _ = model(full.x[:, 8:], None, [s.detach() for s in prefix_state])
    model.criterion(out, full.y).backward()
    torch.testing.assert_close(grads["cut"][1], model.layers[0].weight_hh_l0.grad, rtol=0, atol=1e-7)
    assert (grads["cut"][1] - grads["full"][1]).abs().max() > 1e-6  # and it is a truncation


def test_one_target_tbptt_trains_from_a_config(tmp_path):
    cfg = gatelab.config.load("configs/adding_quick.toml", ["train.tbptt_k1=5", "train.steps=4", "task.length=12",
                                                             "task.n_train=40", "task.n_val=10", "task.n_test=10"])
    run = gatelab.fit(cfg, run_dir=tmp_path / "tbptt", quiet=True)
    assert run.step == 4 and math.isfinite(run.summary["final"]["test"]["mse"])


def test_stratified_folds_are_disjoint_cover_everything_and_keep_the_class_shares():
    from gatelab.tasks.base import fold_split, stratified_folds

    labels = np.array([0] * 10 + [1] * 7 + [2] * 3)
    folds = stratified_folds(labels, 4, seed=3)
    together = np.concatenate(folds)
    assert len(together) == len(set(together.tolist())) == len(labels)  # disjoint and covering
    assert sorted(len(f) for f in folds) == [5, 5, 5, 5]
    for c, n in ((0, 10), (1, 7), (2, 3)):  # each class dealt across the folds: counts differ by at most one
        counts = [int((labels[f] == c).sum()) for f in folds]
        assert sum(counts) == n and max(counts) - min(counts) <= 1
    keep, held = fold_split(labels, 4, 2, seed=3)
    assert held.tolist() == folds[2].tolist() and sorted([*keep, *held]) == list(range(20))
    assert stratified_folds(labels, 4, seed=3)[1].tolist() == folds[1].tolist()  # seeded
    with pytest.raises(ValueError, match=r"fold must be in 0..3 \(val_folds = 4\), got 4"):
        fold_split(labels, 4, 4, seed=0)
    with pytest.raises(ValueError, match=r"val_folds must be in 2..20"):
        stratified_folds(labels, 1, seed=0)


def test_ucr_validation_folds_partition_the_official_training_set():
    task_of = gatelab.tasks.get
    train_size = len(task_of("ucr:ItalyPowerDemand").split("train")) + len(task_of("ucr:ItalyPowerDemand").split("val"))
    vals = [task_of("ucr:ItalyPowerDemand", val_folds=3, fold=i) for i in range(3)]
    held = [{tuple(x.flatten().tolist()) for x in t.split("val").xs} for t in vals]
    assert sum(len(h) for h in held) == train_size and not (held[0] & held[1] or held[0] & held[2] or held[1] & held[2])
    for t, h in zip(vals, held):
        assert len(t.split("train")) + len(h) == train_size and len(t.split("test")) == 1029
        assert not h & {tuple(x.flatten().tolist()) for x in t.split("train").xs}
    with pytest.raises(ValueError, match=r"ucr:ItalyPowerDemand: fold must be in 0..2 \(val_folds = 3\), got 3"):
        task_of("ucr:ItalyPowerDemand", val_folds=3, fold=3)
    with pytest.raises(ValueError, match=r"fold = 1 needs val_folds"):
        task_of("ucr:ItalyPowerDemand", fold=1)


def test_cross_validate_runs_every_fold_reports_mean_and_spread_and_never_reads_test(tmp_path, capsys, monkeypatch):
    from gatelab import cli
    from gatelab.tasks.ucr import UCRClassificationTask

    real_split = UCRClassificationTask.split

    def sealed(self, split):
        if split == "test":
            raise AssertionError("the test split was read")
        return real_split(self, split)

    monkeypatch.setattr(UCRClassificationTask, "split", sealed)
    path = tmp_path / "cv.toml"
    path.write_text('name = "cv"\n[task]\nname = "ucr:ItalyPowerDemand"\nval_folds = 3\n[model]\ncell = "gru"\n'
                    'hidden_sizes = [4]\n[train]\nsteps = 3\nbatch_size = 16\n')
    assert cli.main(["train", str(path), "--runs", str(tmp_path / "runs"), "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.match(r"cv: 3-fold val accuracy \d\.\d{4} ± \d\.\d{4} \(\d\.\d{4}-\d\.\d{4}\)", line), line
    cv = json.loads((tmp_path / "runs" / "cv" / "cv.json").read_text())
    values = [f["val"]["accuracy"] for f in cv["folds"]]
    assert [f["fold"] for f in cv["folds"]] == [0, 1, 2] and len(values) == 3
    assert cv["val"]["accuracy"]["mean"] == pytest.approx(sum(values) / 3)
    assert cv["val"]["accuracy"]["min"] == min(values) and cv["val"]["accuracy"]["max"] == max(values)
    assert cv["val"]["accuracy"]["std"] == pytest.approx(float(np.std(values, ddof=1)))
    for k in range(3):
        summary = json.loads((tmp_path / "runs" / "cv" / f"fold_{k}" / "summary.json").read_text())
        assert set(summary["final"]) == {"val"} and summary["final"]["val"] == cv["folds"][k]["val"]
    with pytest.raises(ConfigError, match="set task.val_folds to the number of folds"):
        gatelab.cross_validate(config())


class _SumNet(torch.nn.Module):
    """A model of a user's own: a gatelab GRU and a linear read-out of its last state."""

    def __init__(self, outputs=2):
        super().__init__()
        self.rnn = gatelab.GRU(3, 8, batch_first=True, gate_activation="hard_sigmoid")
        self.out = torch.nn.Linear(8, outputs)

    def forward(self, x, lengths=None):
        _, h = self.rnn(x, lengths=lengths)
        return self.out(h[-1])


def _sum_data(n, seed, regression=False):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(int(torch.randint(4, 9, (), generator=g)), 3, generator=g) for _ in range(n)]
    return [(x, x[:, 0].sum().reshape(1) if regression else int(x[:, 0].sum() > 0)) for x in xs]


def test_fit_trains_a_module_of_your_own_on_your_own_datasets(tmp_path):
    torch.manual_seed(0)
    task = gatelab.tasks.from_datasets(_sum_data(200, 0), _sum_data(60, 1), _sum_data(60, 2), name="sum_sign")
    assert (task.kind, task.input_size, task.output_size) == ("classification", 3, 2)
    net = _SumNet()
    cfg = gatelab.config.from_dict({"name": "own", "train": {"epochs": 12, "batch_size": 16, "lr": 1e-2,
                                                            "eval_every": 13, "patience": 4}})
    run = fit(cfg, model=net, task=task, run_dir=tmp_path / "own", quiet=True)
    summary = run.summary
    assert summary["task"] == "sum_sign" and summary["engines"] == ["fused"]
    assert summary["weights"].startswith("best.pt (step")  # early stopping restored an earlier step's weights
    assert summary["final"]["test"]["accuracy"] > summary["baseline"]["test"]["accuracy"] + 0.25
    # the module itself holds the weights the summary was scored with (the best checkpoint's)
    best = load_checkpoint(tmp_path / "own" / "best.pt")["model"]
    assert all(torch.equal(p, best["module." + k]) for k, p in net.state_dict().items())
    assert gatelab.train.evaluate(run.model, task, "test") == summary["final"]["test"]
    with pytest.raises(CheckpointError, match=r"holds a model of your own \(_SumNet\)"):
        gatelab.train.load_model(tmp_path / "own" / "best.pt")
    assert "a task of your own (sum_sign)" in (tmp_path / "own" / "config.toml").read_text()


def test_fit_takes_a_module_first_and_regression_datasets(tmp_path):
    torch.manual_seed(0)
    task = gatelab.tasks.from_datasets(_sum_data(120, 0, True), _sum_data(40, 1, True), kind="regression")
    assert task.metrics == ("rmse", "mse", "mae") and len(task.split("test")) == 0
    run = fit(_SumNet(outputs=1), task=task, run_dir=tmp_path / "reg", quiet=True)
    assert set(run.summary["final"]) == {"val"}  # no test split given: nothing scored on test
    assert run.summary["final"]["val"]["rmse"] < run.summary["baseline"]["val"]["rmse"]


def test_fit_with_a_module_of_your_own_says_what_is_wrong(tmp_path):
    task = gatelab.tasks.from_datasets(_sum_data(20, 0), _sum_data(10, 1))
    with pytest.raises(ValueError, match=r"_SumNet: expected an output of shape \(\d+, 2\) \(batch, task outputs\), "
                                         r"got \(\d+, 3\)"):
        fit(_SumNet(outputs=3), task=task, run_dir=tmp_path / "a", quiet=True)
    with pytest.raises(ConfigError, match="truncated BPTT carries a state"):
        fit(gatelab.config.from_dict({"train": {"tbptt_k1": 4}}), model=_SumNet(), task=task, run_dir=tmp_path / "b")
    with pytest.raises(TypeError, match="a module was given both"):
        fit(_SumNet(), model=_SumNet(), task=task)
    with pytest.raises(TypeError, match="task must be a gatelab Task"):
        fit(model=_SumNet(), task=_sum_data(5, 0))
    with pytest.raises(ValueError, match=r"train\[0\]: x must be a \(T, input_size\) array of numbers"):
        gatelab.tasks.from_datasets([(torch.zeros(4), 0)], [(torch.zeros(4, 1), 0)])
    with pytest.raises(ValueError, match="classification targets must be one integer class index per sequence"):
        gatelab.tasks.from_datasets([(torch.zeros(4, 1), 0.5)], [(torch.zeros(4, 1), 1.0)])


def test_runs_with_your_own_model_or_task_are_recorded_as_such(tmp_path):
    """A SequenceModel passed as model= is not the config's model; a task of your own is not the config's
    task: the record says so, resuming needs the same, and loading says how instead of rebuilding wrongly."""
    torch.manual_seed(0)
    task = gatelab.tasks.from_datasets([(np.random.default_rng(i).normal(size=(5, 3)), [float(i % 3)]) for i in range(40)],
                                    [(np.ones((4, 3)), [1.0])], kind="regression", name="mine")
    assert task.split("train").xs[0].dtype == torch.float32  # numpy float64 is cast
    cfg = gatelab.config.from_dict({"name": "rec", "model": {"cell": "gru", "hidden_sizes": [4]},
                                    "train": {"steps": 3, "batch_size": 8}})
    own = gatelab.build_model(gatelab.config.ModelConfig(cell="gru", hidden_sizes=[4],
                                                         candidate_activation="softsign"), task)
    fit(cfg, model=own, task=task, run_dir=tmp_path / "r", quiet=True)
    text = (tmp_path / "r" / "config.toml").read_text()
    assert text.startswith("# trained with a model of your own (SequenceModel)") and "a task of your own (mine)" in text
    with pytest.raises(CheckpointError, match=r"holds a model of your own \(SequenceModel\)"):
        gatelab.train.load_model(tmp_path / "r" / "last.pt")
    with pytest.raises(ConfigError, match="was trained with a model of your own .* resumed with the config's model"):
        fit(cfg, task=task, run_dir=tmp_path / "r", resume=True, quiet=True)
    fit(cfg, task=task, run_dir=tmp_path / "t", quiet=True)  # the config's model on your task: loads, cannot be scored
    model, _, _ = gatelab.train.load_model(tmp_path / "t" / "last.pt")
    with pytest.raises(CheckpointError, match=r"was trained on a task of your own \(mine\)"):
        gatelab.train.evaluate_checkpoint(tmp_path / "t" / "last.pt")
    with pytest.raises(TypeError, match="fit\\(model\\): say what to train it on"):
        fit(_SumNet())


def test_from_datasets_copies_checks_and_never_changes_what_it_is_given():
    train = gatelab.tasks.get("digits").split("train")
    before = train.ys.clone()
    task = gatelab.tasks.from_datasets(train, train, kind="regression")
    assert torch.equal(train.ys, before) and task.split("train").ys.dtype == torch.float32
    with pytest.raises(ValueError, match=r"data: train\[1\]: y has shape \(1,\), train\[0\]'s has \(\): every target"):
        gatelab.tasks.from_datasets([(np.ones((3, 2)), 0), (np.ones((3, 2)), torch.tensor([1]))], None)
    with pytest.raises(ValueError, match=r"train\[0\]: x must be a \(T, input_size\) array of numbers with T >= 1"):
        gatelab.tasks.from_datasets([(np.ones((0, 2)), 0)], None)
    with pytest.raises(TypeError, match=r"train\[0\]: x and y must be numbers or tensors"):
        gatelab.tasks.from_datasets([(np.ones((3, 2)), "cat")], None)
    with pytest.raises(ValueError, match=r"val's targets have shape \(2,\), train's \(1,\)"):
        gatelab.tasks.from_datasets([(np.ones((3, 2)), [1.0])], [(np.ones((3, 2)), [1.0, 2.0])], kind="regression")


def test_a_class_with_one_series_cannot_be_folded():
    from gatelab.tasks.base import stratified_folds

    with pytest.raises(ValueError, match="class 2 has a single item: the fold holding it would train without"):
        stratified_folds(np.array([0, 0, 1, 1, 2]), 2, seed=0)
    with pytest.raises(ValueError, match=r"ucr:ItalyPowerDemand: val_folds = 500 is more than the 67 training series"):
        gatelab.tasks.get("ucr:ItalyPowerDemand", val_folds=500).splits()
