"""Running a study: a pool of worker processes that take trials from the store until none is left.

:func:`sweep` holds the study directory's lock (one sweep per study at a time), brings the store in
line with the study (:meth:`Store.sync`: new trials pending, trials a killed sweep left ``running``
pending again), starts the workers and prints one line per finished trial with an overall counter
and bar. Each worker (:func:`worker_loop`) claims the next pending trial in one transaction, trains
it with :func:`gatelab.train.fit` in ``STUDY_DIR/trials/NAME/`` (an ordinary run directory:
``gatelab evaluate`` and ``gatelab diagnose`` work on it), resuming from the trial's ``last.pt`` when
an earlier attempt left one, and records the outcome: ``done`` with the summary's figures,
``diverged`` (a NaN/Inf: :class:`~gatelab.train.NonFiniteError`) or ``failed`` with the reason. The
others go on either way.

Workers x torch threads never exceed the cores: a trial's ``train.threads`` (0: cores / workers)
caps the number of workers. Workers are spawned (not forked) and die with the sweep (Linux:
``PR_SET_PDEATHSIG``; elsewhere a watchdog thread), so a ``kill -9`` of the sweep leaves no trial
training on; running the same command again re-runs nothing finished and resumes what was running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from .._version import __version__
from ..checkpoint import atomic_write, exclusive, safe_child
from ..config import to_dict
from ..distributed import cores
from .spec import Study
from .store import FINISHED, STORE_NAME, Store

__all__ = ["sweep", "run_trial", "worker_loop", "cores", "plan_workers", "study_dir_for", "TRIALS_DIR"]

TRIALS_DIR = "trials"
POLL_SECONDS = 0.2


def plan_workers(requested: int, trial_threads: Sequence[int], n_trials: int, n_cores: int | None = None) -> tuple[int, int]:
    """``(workers, threads per worker)`` with workers x threads <= cores: ``requested`` workers (0: as
    many as fit), fewer when the trials' ``train.threads`` ask for more threads than that leaves, and
    never more workers than trials. A trial with ``train.threads = 0`` gets cores / workers threads."""
    n_cores = n_cores or cores()
    fixed = max((t for t in trial_threads if t > 0), default=0)
    limit = max(1, n_cores // fixed) if fixed else n_cores
    workers = min(requested or limit, limit, max(n_trials, 1))
    return workers, fixed or max(1, n_cores // workers)


def study_dir_for(study: Study, out: str | Path | None = None) -> Path:
    """``out``, else ``runs/<study name>``."""
    return Path(out) if out is not None else safe_child("runs", study.name, "name")


def machine() -> dict[str, Any]:
    return {"host": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "cpus": cores(),
            "python": platform.python_version()}


def versions() -> dict[str, str]:
    import numpy
    import torch

    return {"gatelab": __version__, "torch": torch.__version__, "numpy": numpy.__version__}


# -- one trial -------------------------------------------------------------------------------------


def run_trial(study_dir: Path, trial: dict[str, Any], store: Store | None = None) -> tuple[str, str | None, dict[str, Any]]:
    """Train one trial (resuming from its checkpoint when there is one); returns ``(status, reason,
    result)`` as :meth:`Store.finish` takes them. ``store``: where to note a resume."""
    from ..checkpoint import CheckpointError, load_checkpoint
    from ..config import ConfigError, from_dict
    from ..train import HIGHER_IS_BETTER, NonFiniteError, beats_baseline, fit

    run_dir = Path(study_dir) / trial["run_dir"]
    config = from_dict(trial["config"])
    resume = False
    if (run_dir / "last.pt").exists():
        try:
            step = int(load_checkpoint(run_dir / "last.pt")["step"])
            resume = True
        except CheckpointError:  # a checkpoint it cannot read: the trial starts again
            step = 0
        if resume and store is not None:
            store.resumed(trial["key"], step)
    known = {"machine": machine(), "versions": versions()}
    try:
        try:
            run = fit(config, run_dir=run_dir, quiet=True, resume=resume, overwrite=not resume)
        except (ConfigError, CheckpointError):
            if not resume:
                raise
            run = fit(config, run_dir=run_dir, quiet=True, overwrite=True)  # the checkpoint is another config's
    except NonFiniteError as err:
        return "diverged", f"diverged at step {err.step} ({err.tensor} not finite)", {**known, "steps": err.step}
    except Exception as err:  # recorded; the other trials go on
        detail = "".join(traceback.format_exception_only(type(err), err)).strip()
        atomic_write(run_dir / "error.txt", "".join(traceback.format_exception(err)))
        return "failed", f"{detail} (traceback in {trial['run_dir']}/error.txt)", known
    s = run.summary
    head = s["headline"]
    split = "test" if "test" in s["final"] else "val"  # val: the run never read the test split (train.score_test)
    value, baseline = s["final"][split][head], s["baseline"][split][head]
    result = {
        **known, "metric": head, "higher_is_better": head in HIGHER_IS_BETTER, "value": value, "baseline": baseline,
        "beats_baseline": beats_baseline(head, value, baseline), "final": s["final"], "baselines": s["baseline"],
        "steps": s["steps"], "best_step": s["best"]["step"], "epochs": s["epochs"], "parameters": s["parameters"],
        "engines": sorted(set(s["engines"])), "seconds_per_epoch": s["seconds_per_epoch"],
        "train_seconds": s["train_seconds"], "wall_seconds": s["wall_seconds"], "threads": s["threads"],
    }
    return "done", None, result


# -- workers ---------------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """End this process when the sweep that started it ends, however it ends."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills us when the parent dies
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)

    def watch() -> None:  # where prctl does not exist
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def worker_id(pid: int | None = None) -> str:
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def worker_loop(study_dir: str | Path, threads: int, imports: Sequence[str] = (), limit: int = 0,
                after: Callable[[], None] | None = None) -> int:
    """Claim and run pending trials of the study in ``study_dir`` until none is left (or ``limit``
    of them ran); returns how many ran. What a pool worker and a Ray task run; ``after`` is called
    after each trial."""
    import torch

    if imports:
        from ..cli import import_plugin

        for name in imports:
            import_plugin(name)
    torch.set_num_threads(threads)  # a trial's own train.threads wins inside fit
    study_dir = Path(study_dir)
    me, ran = worker_id(), 0
    with Store(study_dir / STORE_NAME) as store:
        while not limit or ran < limit:
            trial = store.claim(me)
            if trial is None:
                break
            try:
                status, reason, result = run_trial(study_dir, trial, store)
            except KeyboardInterrupt:
                store.release(trial["key"], "interrupted (SIGINT)")
                raise
            store.finish(trial["key"], status, reason=reason, result=result)
            ran += 1
            if after is not None:
                after()
    return ran


def _worker_main(argv: Sequence[str]) -> int:
    study_dir, threads, parent, *imports = argv
    _die_with_parent(int(parent))
    try:
        worker_loop(study_dir, int(threads), imports)
    except KeyboardInterrupt:
        return 130
    return 0


# -- the sweep -------------------------------------------------------------------------------------


def sweep(study: Study, study_dir: str | Path | None = None, *, workers: int = 0, retry_failed: bool = False,
          quiet: bool = False, stream: TextIO | None = None, imports: Sequence[str] = (),
          ray: str | None = None) -> dict[str, Any]:
    """Run every trial of ``study`` not finished yet (see the module docstring); returns the counts by
    status, the trials run and resumed in this call, workers, threads and wall time. ``ray``: run the
    workers as Ray tasks (``"auto"`` or a cluster address) instead of local processes."""
    stream = stream or sys.stderr
    study_dir = study_dir_for(study, study_dir)
    trials = study.trials()
    t0 = time.perf_counter()
    with exclusive(study_dir, "study directory"):
        if study.source:
            atomic_write(study_dir / "study.toml", study.source)
        with Store(study_dir / STORE_NAME) as store:
            store.set_meta({"name": study.name, "description": study.description, "study": study.to_dict(),
                            "gatelab": __version__})
            rows = [{"key": t.key, "idx": t.index, "name": t.config.name,
                     "run_dir": str(Path(TRIALS_DIR) / t.config.name), "base": t.base, "task": t.config.task.name,
                     "label": t.label, "seed": t.seed, "assignment": t.assignment, "config": to_dict(t.config)}
                    for t in trials]
            synced = store.sync(rows, retry_failed=retry_failed)
            counts = store.counts()
            todo = counts["pending"]
            n_workers, threads = plan_workers(workers or study.workers, [t.config.train.threads for t in trials], todo)
            log: Callable[[str], None] = (lambda s: None) if quiet else (lambda s: print(s, file=stream, flush=True))
            earlier = sum(counts[s] for s in FINISHED)
            log(f"study {study.name}: {len(trials)} trials, {earlier} finished earlier"
                + (f", {synced['interrupted']} interrupted (resuming)" if synced["interrupted"] else "")
                + f", {todo} to run on {n_workers} worker{'s' * (n_workers != 1)} x {threads} "
                  f"thread{'s' * (threads != 1)}" + (f" (Ray: {ray})" if ray else "") + f"; store {store.path}")
            started_at = time.time()
            if todo:
                runner = _run_ray if ray else _run_local
                runner(store, study_dir, n_workers, threads, imports, started_at, len(trials), log, ray)
            counts = store.counts()
            session = [t for t in store.trials() if t["finished_at"] and t["finished_at"] >= started_at]
            resumed = [t["name"] for t in session if t["resumed_from"]]
            wall = time.perf_counter() - t0
            result = {"study": study.name, "dir": str(study_dir), "counts": counts, "ran": len(session),
                      "resumed": resumed, "workers": n_workers, "threads": threads, "wall_seconds": round(wall, 2)}
            store.set_meta({"last_sweep": result})
            log(f"study {study.name}: {counts['done']} done, {counts['diverged']} diverged, {counts['failed']} failed, "
                f"{counts['pending'] + counts['running']} left; {len(session)} ran now in {wall:.1f} s"
                + (f" ({len(resumed)} resumed from checkpoints)" if resumed else ""))
    return result



def _progress(store: Store, started_at: float, total: int, printed: set[str], log: Callable[[str], None],
              width: int = 20) -> None:
    done = store.trials(status=FINISHED)
    finished = sum(1 for t in done if t["key"] in printed or not t["finished_at"] or t["finished_at"] < started_at)
    for t in sorted(done, key=lambda t: t["finished_at"] or 0.0):
        if t["key"] in printed or not t["finished_at"] or t["finished_at"] < started_at:
            continue
        printed.add(t["key"])
        finished += 1
        filled = int(width * finished / max(total, 1))
        bar = "#" * filled + "." * (width - filled)
        if t["status"] == "done":
            better = "higher" if t["higher_is_better"] else "lower"
            what = f"{t['metric']} {t['value']:.4g} (baseline {t['baseline']:.4g}, {better} is better)"
        else:
            what = f"{t['status']}: {t['reason']}"
        took = t["finished_at"] - (t["started_at"] or t["finished_at"])
        again = f", resumed from step {t['resumed_from']}" if t["resumed_from"] else ""
        log(f"[{finished:>{len(str(total))}}/{total}] [{bar}] {t['name']}: {what} ({took:.1f} s{again})")


def _spawn(study_dir: Path, threads: int, imports: Sequence[str]) -> subprocess.Popen:
    # a fresh interpreter (not a fork: no torch thread pools or locks inherited, and no re-import of the
    # caller's __main__ as multiprocessing's spawn does)
    cmd = [sys.executable, "-m", "gatelab.study.worker", str(study_dir), str(threads), str(os.getpid()), *imports]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL)


def _run_local(store: Store, study_dir: Path, n_workers: int, threads: int, imports: Sequence[str], started_at: float,
               total: int, log: Callable[[str], None], ray: str | None = None) -> None:
    """This process is one worker (it starts at once while the others start their interpreters); a
    thread prints the progress and notes the trials of workers that died."""
    import torch

    procs = [_spawn(study_dir, threads, imports) for _ in range(n_workers - 1)]
    printed: set[str] = set()
    stop = threading.Event()

    def monitor() -> None:
        with Store(store.path) as own:  # a connection per thread
            while True:
                _progress(own, started_at, total, printed, log)
                for p in procs:
                    code = p.poll()
                    if code is None or code == 0 or getattr(p, "handled", False):
                        continue
                    p.handled = True  # type: ignore[attr-defined]
                    for t in own.trials(status="running"):  # it died inside a trial (killed, out of memory)
                        if t["worker"] == worker_id(p.pid):
                            own.finish(t["key"], "failed", reason=f"its worker process died (exit status {code})")
                if stop.wait(POLL_SECONDS):
                    _progress(own, started_at, total, printed, log)
                    return

    watcher = threading.Thread(target=monitor, name="gatelab-sweep-progress", daemon=True)
    watcher.start()
    saved = torch.get_num_threads()
    try:
        worker_loop(study_dir, threads)  # until no trial is pending; the other workers finish theirs
        while any(p.poll() is None for p in procs):
            time.sleep(POLL_SECONDS)
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        for t in store.trials(status="running"):
            store.release(t["key"], "the sweep was interrupted")
        raise
    finally:
        torch.set_num_threads(saved)
        stop.set()
        watcher.join()


def _run_ray(store: Store, study_dir: Path, n_workers: int, threads: int, imports: Sequence[str], started_at: float,
             total: int, log: Callable[[str], None], ray: str | None = None) -> None:
    try:
        import ray as ray_module
    except ImportError as err:
        from ..tasks.base import MissingExtraError

        raise MissingExtraError("gatelab sweep --ray needs Ray, gatelab's ray extra: pip install 'gatelab[ray]'") from err
    if not ray_module.is_initialized():
        # "local" starts a cluster of this process's own (never one RAY_ADDRESS or a `ray start` names)
        local = ray in (None, "local")
        ray_module.init(address="local" if local else ray, num_cpus=n_workers * threads if local else None,
                        include_dashboard=False, log_to_driver=False)
    task = ray_module.remote(num_cpus=threads)(worker_loop)  # the same loop as a local worker
    pending = [task.remote(str(study_dir.resolve()), threads, list(imports)) for _ in range(n_workers)]
    printed: set[str] = set()
    while pending:
        done, pending = ray_module.wait(pending, timeout=POLL_SECONDS)
        ray_module.get(done)  # a worker that raised raises here (its trial was recorded by worker_loop)
        _progress(store, started_at, total, printed, log)
    _progress(store, started_at, total, printed, log)
