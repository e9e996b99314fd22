"""Multi-process training (torchrun, gloo): 2 processes against 1 with the same global batch, exact
resume across processes, rank-0-only files. Each test launches torchrun once (about 10 s here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gatelab.checkpoint import load_checkpoint
from gatelab.config import from_dict, to_toml
from gatelab.data import Unit
from gatelab.distributed import Group, threads_per_rank
from gatelab.train import _check_shards, fit

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

# 2 processes vs 1 differ only in the order of float sums (each rank's loss sum, then DDP's average):
# measured on this machine after 16 Adam steps, at most ~1e-7 in any weight and ~1e-8 in a metric
WEIGHT_TOL = 1e-5
METRIC_TOL = 1e-6

CONFIG = {
    "name": "tiny",
    # 200 sequences in batches of 16: the 13th batch of each epoch has 8 rows, 4 per rank
    "task": {"name": "adding", "length": 8, "n_train": 200, "n_val": 48, "n_test": 48},
    "model": {"cell": "lstm", "hidden_sizes": [8]},
    "train": {"steps": 16, "batch_size": 16, "eval_every": 4, "checkpoint_every": 4, "threads": 1, "lr": 1e-2},
}

SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from gatelab.callbacks import Callback
    from gatelab.config import load
    from gatelab.train import fit

    class Interrupted(Exception):
        pass

    class Interrupt(Callback):  # every rank stops after step `at`, as a kill would (last.pt: step at - 1)
        def __init__(self, at):
            self.at = at

        def on_step_end(self, run, step, loss, batch):
            if step == self.at:
                raise Interrupted

    config, out = load(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")  # a group of the caller's own: fit uses it and leaves it running
    run = fit(config, run_dir=out / "whole", quiet=True)
    torch.save(run.model.state_dict(), out / f"whole.rank{dist.get_rank()}.pt")
    try:
        fit(config, run_dir=out / "cut", quiet=True, callbacks=[Interrupt(5)])
    except Interrupted:
        pass
    run = fit(config, run_dir=out / "cut", quiet=True, resume=True)
    torch.save(run.model.state_dict(), out / f"cut.rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
''')


def torchrun(args, cwd, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_processes_match_one_and_resume_exactly(tmp_path):
    cfg = from_dict(CONFIG)
    (tmp_path / "tiny.toml").write_text(to_toml(cfg))
    one = fit(cfg, run_dir=tmp_path / "one", quiet=True)
    (tmp_path / "script.py").write_text(SCRIPT)
    torchrun([str(tmp_path / "script.py"), "tiny.toml", str(tmp_path)], tmp_path)
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert whole["processes"] == 2 and whole["steps"] == 16 and one.summary["processes"] == 1
    for split in ("val", "test"):
        for metric, value in one.summary["final"][split].items():
            assert whole["final"][split][metric] == pytest.approx(value, abs=METRIC_TOL), (split, metric)
    ref = one.model.state_dict()
    w0, w1 = torch.load(tmp_path / "whole.rank0.pt"), torch.load(tmp_path / "whole.rank1.pt")
    assert max_difference(w0, w1) == 0  # DDP keeps the ranks' replicas identical
    print(f"1 vs 2 processes: max weight difference {max_difference(ref, w0):.3g}")
    assert max_difference(ref, w0) < WEIGHT_TOL
    assert max_difference(ref, load_checkpoint(tmp_path / "whole" / "last.pt")["model"]) < WEIGHT_TOL
    lines = [json.loads(s) for s in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [4, 8, 12, 16]
    for mine, theirs in zip(lines, one.history):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], abs=METRIC_TOL)
    # interrupted after step 5 (last.pt at step 4), resumed on 2 processes: bitwise the uninterrupted run
    assert max_difference(w0, torch.load(tmp_path / "cut.rank0.pt")) == 0
    assert max_difference(w0, torch.load(tmp_path / "cut.rank1.pt")) == 0
    cut = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert cut["final"] == whole["final"]
    timeless = [{k: v for k, v in json.loads(s).items() if k != "train_seconds"}
                for run in ("cut", "whole") for s in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert timeless[:4] == timeless[4:]
    ranks = load_checkpoint(tmp_path / "cut" / "last.pt")["trainer"]["ranks"]
    assert ranks["world_size"] == 2 and len(ranks["rng"]) == 2


def test_torchrun_gatelab_train_writes_once_on_rank_0(tmp_path):
    cfg = from_dict({**CONFIG, "train": {**CONFIG["train"], "steps": 8}})
    (tmp_path / "tiny.toml").write_text(to_toml(cfg))
    one = fit(cfg, run_dir=tmp_path / "one", quiet=True)
    done = torchrun(["-m", "gatelab", "train", "tiny.toml", "--runs", "runs", "--quiet"], tmp_path)
    assert done.stdout.count("tiny: test mse") == 1  # one result line, from rank 0
    run_dir = tmp_path / "runs" / "tiny"
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == [".lock", "best.pt", "config.toml", "last.pt", "metrics.jsonl", "summary.json"]  # no temporaries
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["test"]["mse"] == pytest.approx(one.summary["final"]["test"]["mse"], abs=METRIC_TOL)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2  # one line per evaluation, not per rank


FAILING_SAVE = textwrap.dedent('''
    import sys
    from pathlib import Path

    import torch.distributed as dist

    from gatelab import train
    from gatelab.config import load
    from gatelab.distributed import DistributedError

    def full_disk(path, **parts):
        raise OSError("no space left on device (a test)")

    config, out = load(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:
        train.save_checkpoint = full_disk
    try:
        train.fit(config, run_dir=out / "run", quiet=True)
    except OSError as err:
        print(f"rank {rank}: OSError: {err}", flush=True)
    except DistributedError as err:
        print(f"rank {rank}: DistributedError: {err}", flush=True)
    dist.destroy_process_group()
''')


def test_a_checkpoint_rank_0_cannot_write_stops_every_rank(tmp_path):
    """Rank 0's failed write reaches rank 1 at once (no collective left waiting for the timeout)."""
    (tmp_path / "tiny.toml").write_text(to_toml(from_dict(CONFIG)))
    (tmp_path / "fail.py").write_text(FAILING_SAVE)
    done = torchrun(["fail.py", "tiny.toml", str(tmp_path)], tmp_path, timeout=90)
    assert "rank 0: OSError: no space left on device (a test)" in done.stdout
    assert "rank 1: DistributedError: rank 0 failed, so rank 1 stops: OSError: no space left" in done.stdout


# -- without processes -------------------------------------------------------------------------------


def test_the_timeout_and_the_main_process_come_from_the_environment(monkeypatch):
    from gatelab import distributed

    monkeypatch.delenv(distributed.TIMEOUT_VARIABLE, raising=False)
    assert distributed.timeout_minutes() == 30
    monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, "2.5")
    assert distributed.timeout_minutes() == 2.5
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, bad)
        with pytest.raises(distributed.DistributedError, match="must be a positive number of minutes"):
            distributed.timeout_minutes()
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.main_process()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert not distributed.main_process()
    monkeypatch.setenv("RANK", "0")
    assert distributed.main_process()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # a group of the caller's own wins
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    assert not distributed.main_process()


def test_a_batch_that_does_not_split_is_refused():
    from gatelab.config import ConfigError

    with pytest.raises(ConfigError, match="multiple of 2"):
        _check_shards(15, 200, 2)
    with pytest.raises(ConfigError, match="last batch of 1"):
        _check_shards(16, 193, 2)
    _check_shards(16, 200, 2)


def test_shards_are_disjoint_and_cover_the_batch_in_order():
    x = torch.arange(10.0).reshape(10, 1, 1)
    unit = Unit(x, x[:, 0], torch.full((10,), 1))
    parts = [Group(rank=r, world=3).shard(unit) for r in range(3)]
    assert torch.equal(torch.cat([p.x for p in parts]), x)
    assert [p.x.shape[0] for p in parts] == [3, 4, 3] and all(p.lengths.shape[0] == p.x.shape[0] for p in parts)


def test_threads_times_ranks_never_exceed_the_cores():
    two = Group(rank=0, world=2, local_world=2)
    assert threads_per_rank(1, two, n_cores=2) == (1, None)
    assert threads_per_rank(0, two, n_cores=8) == (4, None)
    threads, message = threads_per_rank(4, two, n_cores=2)
    assert threads == 1 and "need 8 cores" in message and "each rank uses 1" in message
    assert threads_per_rank(4, Group(), n_cores=2) == (4, None)  # one process: as configured


def test_python_m_gatelab_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "gatelab", "list", "cells"], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and "lstm" in done.stdout
