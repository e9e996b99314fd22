"""Studies: expansion and exclusions, the store's transactions, a sweep killed with SIGKILL and resumed,
a diverging trial, the paired statistics, the report's content and the command line."""

from __future__ import annotations

import itertools
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gatelab.cli import main
from gatelab.config import ConfigError
from gatelab.study import STORE_NAME, Store, load_study, plan_workers, sweep, trial_key
from gatelab.study.report import bootstrap_ci, group_rows, wilcoxon_signed_rank

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
[train]
steps = 8
batch_size = 16
eval_every = 4
lr = 1e-2
threads = 1
"""


def write_study(tmp_path: Path, body: str, name: str = "study.toml") -> Path:
    (tmp_path / "tiny.toml").write_text(TINY)
    path = tmp_path / name
    path.write_text(body)
    return path


def table(study_dir: Path) -> list[tuple]:
    """What the report's tables are made of: per trial its status and every final metric."""
    with Store(study_dir / STORE_NAME) as store:
        return [(t["name"], t["status"], t["value"], t["baseline"], t["steps"], str(t["final"])) for t in store.trials()]


# -- expansion ----------------------------------------------------------------------------------------


def test_grid_points_and_exclusions_expand_to_checked_configs(tmp_path):
    path = write_study(tmp_path, """
base = "tiny.toml"
seeds = [3, 4]
[budget]
steps = 5
[set]
"train.lr" = 0.02
[axes]
"model.cell" = ["gru", "lstm"]
model.gate_activation = ["sigmoid", "hard_sigmoid", "relu"]
[[exclude]]
"model.cell" = "lstm"
"model.gate_activation" = "relu"
[[exclude]]
"model.gate_activation" = "hard_sigmoid"
"train.seed" = 4
""")
    trials = load_study(path).trials()
    expected = [(c, a, s) for c, a, s in itertools.product(["gru", "lstm"], ["sigmoid", "hard_sigmoid", "relu"], [3, 4])
                if not (c == "lstm" and a == "relu") and not (a == "hard_sigmoid" and s == 4)]
    got = [(t.config.model.cell, t.config.model.gate_activation, t.config.train.seed) for t in trials]
    assert got == expected  # the seed varies fastest
    assert all(t.config.train.steps == 5 and t.config.train.lr == 0.02 for t in trials)
    assert trials[0].label == "gru/sigmoid" and trials[0].group == ("tiny", "gru/sigmoid")
    assert len({t.key for t in trials}) == len(trials) and len({t.config.name for t in trials}) == len(trials)
    # the key hashes the resolved config, not the name: the same trial in another study has the same key
    assert trials[0].key == trial_key(trials[0].config.replace(name="other"))
    assert trials[0].key != trial_key(trials[0].config.replace(**{"train.lr": 0.03}))


def test_points_cross_the_axes_and_bad_studies_fail_naming_the_key(tmp_path):
    path = write_study(tmp_path, """
base = "tiny.toml"
seeds = [0, 1]
[[points]]
label = "CIFG"
"model.cell" = "lstm"
"model.options.variant" = "CIFG"
[[points]]
label = "GRU"
"model.cell" = "gru"
""")
    trials = load_study(path).trials()
    assert [(t.label, t.seed) for t in trials] == [("CIFG", 0), ("CIFG", 1), ("GRU", 0), ("GRU", 1)]
    assert trials[0].config.model.options == {"variant": "CIFG"}
    bad = {
        '"model.cel" = ["gru"]': "model.cel",
        '"model.cell" = []': "non-empty list",
        '"train.lr" = [-1.0]': "train.lr",
    }
    for axis, message in bad.items():
        p = write_study(tmp_path, f'base = "tiny.toml"\n[axes]\n{axis}\n', "bad.toml")
        with pytest.raises(ConfigError, match=message):
            load_study(p)
    p = write_study(tmp_path, 'base = "tiny.toml"\n[axes]\n"model.cell" = ["gru"]\n[[exclude]]\n"model.cell" = "gru"\n',
                    "none.toml")
    with pytest.raises(ConfigError, match="drop every trial"):
        load_study(p)
    p = write_study(tmp_path, 'base = "tiny.toml"\n[budget]\nlr = 1.0\n', "budget.toml")
    with pytest.raises(ConfigError, match="budget.lr"):
        load_study(p)


def test_workers_times_threads_never_exceed_the_cores():
    assert plan_workers(0, [1, 1], 10, n_cores=2) == (2, 1)
    assert plan_workers(8, [1], 10, n_cores=2) == (2, 1)
    assert plan_workers(0, [2], 10, n_cores=2) == (1, 2)
    assert plan_workers(0, [0], 10, n_cores=4) == (4, 1)
    assert plan_workers(2, [0], 10, n_cores=8) == (2, 4)
    assert plan_workers(0, [1], 1, n_cores=8) == (1, 1)
    for req, th, n, c in itertools.product([0, 1, 3, 9], [0, 1, 2, 3], [1, 5], [1, 2, 3, 8]):
        w, t = plan_workers(req, [th], n, n_cores=c)
        assert w >= 1 and t >= 1 and (w * t <= c or (w == 1 and t == th))


# -- the store ------------------------------------------------------------------------------------------


def rows(n: int) -> list[dict]:
    return [{"key": f"k{i}", "idx": i, "name": f"t{i}", "run_dir": f"trials/t{i}", "base": "b", "task": "adding",
             "label": "l", "seed": i, "assignment": {}, "config": {}} for i in range(n)]


def test_store_is_wal_and_a_failed_transaction_leaves_nothing(tmp_path):
    with Store(tmp_path / STORE_NAME) as store:
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.sync(rows(3)) == {"new": 3, "interrupted": 0, "retried": 0}
        with pytest.raises(RuntimeError, match="boom"):
            with store.transaction() as db:
                db.execute("UPDATE trials SET status = 'done', value = 1.0 WHERE key = 'k0'")
                raise RuntimeError("boom")
        assert store.trial("k0")["status"] == "pending" and store.trial("k0")["value"] is None
        with pytest.raises(sqlite3.IntegrityError):  # the schema refuses a status that does not exist
            with store.transaction() as db:
                db.execute("UPDATE trials SET status = 'finished' WHERE key = 'k1'")
        with pytest.raises(ValueError, match="status"):
            store.finish("k1", "running")
        claimed = store.claim("w")
        assert claimed["key"] == "k0" and claimed["attempts"] == 1 and store.counts()["running"] == 1
        store.finish("k0", "done", result={"metric": "mse", "value": 0.5, "final": {"test": {"mse": 0.5}}})
        store.finish("k1", "failed", reason="no")
        # a second sync (the sweep run again): running goes back to pending, finished stays, failed only on request
        store.claim("w")  # k2 running, as a killed sweep leaves it
        assert store.sync(rows(3)) == {"new": 0, "interrupted": 1, "retried": 0}
        assert [t["status"] for t in store.trials()] == ["done", "failed", "pending"]
        assert store.sync(rows(3), retry_failed=True)["retried"] == 1
        assert store.trial("k0")["final"] == {"test": {"mse": 0.5}}
        assert [e["event"] for e in store.events("k2")] == ["start", "interrupted"]
        store.sync(rows(2))  # a trial the study no longer has is kept, but left out of it
        assert [t["key"] for t in store.trials()] == ["k0", "k1"] and len(store.trials(in_study=False)) == 3


def test_concurrent_claims_never_take_the_same_trial(tmp_path):
    path = tmp_path / STORE_NAME
    with Store(path) as store:
        store.sync(rows(40))
    taken: list[list[str]] = [[] for _ in range(4)]

    def work(i: int) -> None:
        with Store(path) as own:
            while (t := own.claim(f"w{i}")) is not None:
                taken[i].append(t["key"])
                own.finish(t["key"], "done")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [k for keys in taken for k in keys]
    assert sorted(every) == sorted(f"k{i}" for i in range(40)) and len(set(every)) == 40


# -- sweeps ---------------------------------------------------------------------------------------------

KILL_STUDY = """
name = "killme"
base = "tiny.toml"
seeds = [0, 1]
[budget]
steps = 60
[set]
"train.eval_every" = 10
"train.checkpoint_every" = 10
[axes]
"model.cell" = ["gru", "lstm"]
"""


def test_kill_9_then_resume_reruns_nothing_finished_and_matches_an_uninterrupted_sweep(tmp_path):
    path = write_study(tmp_path, KILL_STUDY)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, "-m", "gatelab.cli", "sweep", str(path), "--out", str(killed),
                             "--workers", "1", "--quiet", "--no-report"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    victim = None
    try:
        while time.monotonic() < deadline and victim is None:
            time.sleep(0.02)
            if not (killed / STORE_NAME).exists():
                continue
            with Store(killed / STORE_NAME) as store:
                done = store.trials(status="done")
                running = store.trials(status="running")
            if done and running and (killed / running[0]["run_dir"] / "last.pt").exists():
                victim = running[0]
        assert victim is not None, proc.stderr.read().decode() if proc.poll() is not None else "no trial got that far"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    with Store(killed / STORE_NAME) as store:
        before = {t["key"]: t for t in store.trials()}
    assert before[victim["key"]]["status"] == "running"  # as the kill left it
    finished = {k for k, t in before.items() if t["status"] == "done"}

    result = sweep(load_study(path), killed, workers=2, quiet=True)  # this process and one pool worker
    assert result["counts"]["done"] == 4
    with Store(killed / STORE_NAME) as store:
        after = {t["key"]: t for t in store.trials()}
        events = {k: [e["event"] for e in store.events(k)] for k in after}
    for key in finished:  # nothing finished ran again
        assert after[key]["attempts"] == 1 and events[key] == ["start", "done"]
        assert after[key]["finished_at"] == before[key]["finished_at"]
    assert events[victim["key"]][:3] == ["start", "interrupted", "start"] and "resume" in events[victim["key"]]
    assert after[victim["key"]]["resumed_from"] >= 10 and after[victim["key"]]["name"] in result["resumed"]

    sweep(load_study(path), clean, workers=1, quiet=True)
    assert table(killed) == table(clean)  # the final table equals an uninterrupted sweep's, bitwise

    again = sweep(load_study(path), killed, quiet=True)  # and a third run has nothing to do
    assert again["ran"] == 0


def test_a_diverging_trial_is_recorded_and_the_others_go_on(tmp_path, capsys):
    path = write_study(tmp_path, """
name = "boom"
base = "tiny.toml"
[set]
"train.optimizer" = "sgd"
"model.cell" = "rnn"
"model.activation" = "relu"
"model.gate_activation" = "sigmoid"
[axes]
"train.lr" = [1e10, 0.01]
""")
    with pytest.raises(ConfigError, match="gate_activation"):  # an Elman cell has no gates: checked before running
        load_study(path)
    path.write_text(path.read_text().replace('"model.gate_activation" = "sigmoid"\n', ""))
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "[1/2]" in err and "[2/2]" in err and "diverged at step" in err
    with Store(out / STORE_NAME) as store:
        first, second = store.trials()
    assert first["status"] == "diverged" and first["reason"].startswith("diverged at step")
    assert second["status"] == "done" and second["value"] is not None
    assert (out / first["run_dir"] / "failure.json").exists()
    assert main(["evaluate", str(out / second["run_dir"] / "best.pt")]) == 0  # a trial is an ordinary run directory
    md = (out / "report.md").read_text()
    assert "diverged" in md and "Not finished" in md


# -- statistics and the report --------------------------------------------------------------------------


def test_wilcoxon_exact_and_bootstrap():
    # n = 5, all positive: W+ = 15, the most extreme of 32 patterns on either side: p = 2/32
    w, p, n = wilcoxon_signed_rank([0.1, 0.2, 0.3, 0.4, 0.5])
    assert (w, n) == (15.0, 5) and p == pytest.approx(2 / 32)
    w, p, n = wilcoxon_signed_rank([1.0, -2.0, 3.0, 0.0])  # zero dropped; ranks 1, 2, 3; W+ = 4 of 0..6
    assert (w, n) == (4.0, 3) and p == pytest.approx(6 / 8)  # |W+ - 3| >= 1 in 6 of the 8 sign patterns
    scipy = pytest.importorskip("scipy.stats")
    d = np.random.default_rng(0).normal(0.3, 1.0, 12)
    assert wilcoxon_signed_rank(d)[1] == pytest.approx(scipy.wilcoxon(d, method="exact").pvalue, rel=1e-9)
    lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0])
    assert 1.0 <= lo < 2.5 < hi <= 4.0
    assert bootstrap_ci([2.0, 2.0]) == (2.0, 2.0)


def test_report_tables_rank_and_compare(tmp_path, capsys):
    path = write_study(tmp_path, """
name = "rep"
base = "tiny.toml"
seeds = [0, 1, 2]
reference = "gru"
[axes]
"model.cell" = ["gru", "lstm"]
""")
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--no-report", "--quiet"]) == 0
    assert main(["report", str(out), "--gradient-flow", "lstm"]) == 0
    assert "report.html" in capsys.readouterr().out
    with Store(out / STORE_NAME) as store:
        groups = group_rows(store)["tiny"]
    by = {g.label: g for g in groups}
    assert sorted(g.rank for g in groups) == [1, 2]
    best = min(groups, key=lambda g: g.mean)
    assert best.rank == 1 and len(best.values) == 3
    md = (out / "report.md").read_text()
    assert f"| 1 | {best.label} | {best.mean:.4f} ± {best.std:.4f} | 3/3 |" in md
    assert "Paired against **gru**" in md and "| lstm | 3 |" in md
    diff = np.mean(np.array(by["lstm"].values) - np.array(by["gru"].values))
    assert f"{diff:+.4g}" in md
    page = (out / "report.html").read_text()
    assert page.count("<table") == 2 and "<svg" in page and "data:image/png;base64," in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)|url\(\s*["']?(https?:|//)|@import""", page)  # nothing to fetch
    assert main(["report", str(tmp_path)]) == 2  # not a study directory


# -- logging callbacks ----------------------------------------------------------------------------------


def _extra_present(*modules: str) -> bool:
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except ModuleNotFoundError:
        return False


def _logged_run(tmp_path: Path, logger: str):
    """A 12-step run of the tiny config with ``train.log = [logger]``: (config, run dir, its metrics.jsonl rows)."""
    import json

    from gatelab.config import load
    from gatelab.train import fit

    (tmp_path / "tiny.toml").write_text(TINY)
    cfg = load(tmp_path / "tiny.toml", {"train.log": f'["{logger}"]', "train.steps": "12"})
    assert cfg.train.log == (logger,)
    run_dir = tmp_path / "run"
    fit(cfg, run_dir=run_dir, quiet=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return cfg, run_dir, rows


def _evals(rows: list[dict]) -> dict[tuple[str, int], float]:
    """(split/metric, step) -> value of every evaluation metrics.jsonl recorded."""
    meta = {"step", "epoch", "split", "lr", "train_loss", "grad_norm", "train_seconds"}
    return {(f"{row['split']}/{k}", row["step"]): v for row in rows for k, v in row.items() if k not in meta}


@pytest.mark.parametrize("logger, module", [("tensorboard", "torch.utils.tensorboard"), ("mlflow", "mlflow.tracking")])
def test_train_log_names_a_missing_extra(tmp_path, monkeypatch, logger, module):
    from gatelab.config import from_dict, load
    from gatelab.train import fit

    with pytest.raises(ConfigError, match="train.log"):
        from_dict({"train": {"log": ["wandb"]}})
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as without the extra
    (tmp_path / "tiny.toml").write_text(TINY)
    cfg = load(tmp_path / "tiny.toml", {"train.log": f'["{logger}"]', "train.steps": "4"})
    with pytest.raises(ImportError, match=rf"gatelab\[{logger}\]"):
        fit(cfg, run_dir=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "last.pt").exists()  # it fails before training


@pytest.mark.skipif(not _extra_present("torch.utils.tensorboard", "tensorboard"),
                    reason="the tensorboard extra is not installed (make setup installs it)")
def test_tensorboard_logger_writes_what_the_trainer_measured(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, rows = _logged_run(tmp_path, "tensorboard")
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "val/mse"} <= tags
    evals = _evals(rows)
    assert evals and any(k[0] == "val/mse" for k in evals)
    for (tag, step), value in evals.items():  # every evaluation, at its step, to float32
        logged = {e.step: e.value for e in acc.Scalars(tag)}
        assert logged[step] == pytest.approx(value, rel=1e-6), (tag, step)
    assert [e.step for e in acc.Scalars("train/loss")] == [10]  # every 10 steps of 12
    lr = acc.Scalars("train/lr")[0].value
    assert lr == pytest.approx(1e-2)


@pytest.mark.skipif(not _extra_present("mlflow"), reason="the mlflow extra is not installed (make setup installs it)")
def test_mlflow_logger_writes_a_file_store_run_with_params_and_metrics(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # teardown restores the variable as it was
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    cfg, run_dir, rows = _logged_run(tmp_path, "mlflow")
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"  # the logger opted in for its file store
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name(cfg.name)
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["gatelab.run_dir"] == str(run_dir)
    assert run.data.params["model.cell"] == "gru" and float(run.data.params["train.lr"]) == 1e-2
    for (tag, step), value in _evals(rows).items():
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag.replace("/", "_"))}
        assert history[step] == pytest.approx(value, rel=1e-12), (tag, step)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [10]


# -- Ray ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not _extra_present("ray"), reason="the ray extra is not installed (make setup installs it)")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="Ray's local mode is asked for 2 CPUs")
def test_ray_local_mode_on_two_cpus_gives_the_local_pools_table(tmp_path):
    import ray

    path = write_study(tmp_path, """
base = "tiny.toml"
seeds = [0, 1]
[axes]
"model.cell" = ["gru", "lstm"]
""")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    sweep(load_study(path), local, workers=2, quiet=True)
    try:
        result = sweep(load_study(path), on_ray, workers=2, quiet=True, ray="local")
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2
    finally:
        ray.shutdown()
    assert result["counts"]["done"] == 4 and result["ran"] == 4
    with Store(on_ray / STORE_NAME) as store:
        workers = {t["worker"] for t in store.trials()}
    assert all(w and not w.endswith(f":{os.getpid()}") for w in workers)  # the trials ran in Ray's processes
    assert table(on_ray) == table(local)  # the same numbers, bitwise


def test_a_study_that_never_reads_test_reports_validation_and_judges_the_baseline_on_it(tmp_path):
    path = write_study(tmp_path, """
base = "tiny.toml"
[set]
"train.score_test" = false
"train.steps" = 40
[axes]
"train.lr" = [3e-2, 1e-9]
""")
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    with Store(out / STORE_NAME) as store:
        trials = store.trials()
    for t in trials:
        assert "test" not in t["final"] and t["value"] == t["final"]["val"]["mse"]
        assert t["baseline"] == t["baselines"]["val"]["mse"]
    trained, untrained = sorted(trials, key=lambda t: -t["config"]["train"]["lr"])
    assert trained["value"] < trained["baseline"] < untrained["value"]
    assert trained["beats_baseline"] is True and untrained["beats_baseline"] is False  # judged on validation
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "validation mse, mean" in md and "test mse" not in md
    assert "validation split's trivial baseline" in page and "test split" not in page
