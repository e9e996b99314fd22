"""The results store: one SQLite file per study (``study.sqlite``), the report's source of truth.

One row per trial, keyed by the hash of its resolved configuration (:func:`~.spec.trial_key`), with
its status (``pending``, ``running``, ``done``, ``failed`` with the reason, ``diverged`` with the
step and tensor), every final metric and baseline, steps, wall time, the machine and the versions;
an ``events`` table logs every start, resume, finish and interruption. The database runs in WAL
mode, so the sweep's progress display reads while workers write; every change is one transaction
(``BEGIN IMMEDIATE``), so a process killed at any point (``kill -9`` included) leaves each trial
either as it was or fully updated, and two workers never claim the same trial.

Only the standard library is imported here.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["Store", "STATUSES", "FINISHED", "STORE_NAME", "SCHEMA_VERSION"]

STORE_NAME = "study.sqlite"
SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "done", "failed", "diverged")
FINISHED = ("done", "failed", "diverged")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY,
    idx INTEGER NOT NULL,
    in_study INTEGER NOT NULL DEFAULT 1,
    name TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    base TEXT NOT NULL,
    task TEXT NOT NULL,
    label TEXT NOT NULL,
    seed INTEGER NOT NULL,
    assignment TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed', 'diverged')),
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    resumed_from INTEGER,
    worker TEXT,
    metric TEXT,
    higher_is_better INTEGER,
    value REAL,
    baseline REAL,
    beats_baseline INTEGER,
    final TEXT,
    baselines TEXT,
    steps INTEGER,
    best_step INTEGER,
    epochs REAL,
    parameters INTEGER,
    engines TEXT,
    seconds_per_epoch REAL,
    train_seconds REAL,
    wall_seconds REAL,
    threads INTEGER,
    machine TEXT,
    versions TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS trials_status ON trials (status, idx);
"""

_JSON = ("assignment", "config", "final", "baselines", "engines", "machine", "versions")


class Store:
    """The study's SQLite file. Open one per process (or thread); connections are not shared."""

    def __init__(self, path: str | Path, *, timeout: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)  # transactions are explicit
        self.db.row_factory = sqlite3.Row
        self.db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")  # WAL: a crash may lose the last commit, never corrupts
        self._create()

    def _create(self) -> None:
        with self.transaction() as db:
            for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                db.execute(statement)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        version = int(self.meta("schema_version") or 0)
        if version != SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: a study store of schema {version}; this gatelab reads {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): committed when the block ends, rolled back
        when it raises."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- meta ---------------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, values: dict[str, Any]) -> None:
        with self.transaction() as db:
            for key, value in values.items():
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           (key, value if isinstance(value, str) else json.dumps(value)))

    # -- trials -------------------------------------------------------------------------------------

    def sync(self, trials: Iterable[dict[str, Any]], *, retry_failed: bool = False) -> dict[str, int]:
        """Make the store hold exactly these trials (``key``, ``name``, ``run_dir``, ``base``, ``task``,
        ``label``, ``seed``, ``assignment``, ``config``) as the study: new ones become pending, ones the
        study no longer has are kept but left out of it, and ``running`` ones (their sweep was killed;
        the caller holds the study's lock) go back to pending to resume from their checkpoints.
        ``retry_failed`` sets failed trials pending again (diverged ones stay: they would diverge again).
        Returns the counts: new, interrupted, retried."""
        now = time.time()
        counts = {"new": 0, "interrupted": 0, "retried": 0}
        with self.transaction() as db:
            db.execute("UPDATE trials SET in_study = 0")
            for t in trials:
                row = db.execute("SELECT status FROM trials WHERE key = ?", (t["key"],)).fetchone()
                if row is None:
                    db.execute("INSERT INTO trials (key, idx, name, run_dir, base, task, label, seed, assignment, config, "
                               "status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                               (t["key"], t["idx"], t["name"], t["run_dir"], t["base"], t["task"], t["label"], t["seed"],
                                json.dumps(t["assignment"]), json.dumps(t["config"]), now))
                    counts["new"] += 1
                else:
                    db.execute("UPDATE trials SET in_study = 1, idx = ?, label = ?, base = ? WHERE key = ?",
                               (t["idx"], t["label"], t["base"], t["key"]))
            for (key,) in db.execute("SELECT key FROM trials WHERE status = 'running'").fetchall():
                db.execute("UPDATE trials SET status = 'pending', worker = NULL WHERE key = ?", (key,))
                self._event(db, key, "interrupted", "its sweep ended while it ran")
                counts["interrupted"] += 1
            if retry_failed:
                for (key,) in db.execute("SELECT key FROM trials WHERE status = 'failed' AND in_study = 1").fetchall():
                    db.execute("UPDATE trials SET status = 'pending', reason = NULL WHERE key = ?", (key,))
                    self._event(db, key, "retry", None)
                    counts["retried"] += 1
        return counts

    def claim(self, worker: str) -> dict[str, Any] | None:
        """Take the first pending trial of the study (by index) for ``worker``; None when none is left."""
        with self.transaction() as db:
            row = db.execute("SELECT key FROM trials WHERE status = 'pending' AND in_study = 1 ORDER BY idx LIMIT 1"
                             ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE trials SET status = 'running', worker = ?, attempts = attempts + 1, started_at = ?, "
                       "resumed_from = NULL WHERE key = ?", (worker, time.time(), row[0]))
            self._event(db, row[0], "start", worker)
        return self.trial(row[0])

    def resumed(self, key: str, step: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE trials SET resumed_from = ? WHERE key = ?", (step, key))
            self._event(db, key, "resume", f"from step {step}")

    def finish(self, key: str, status: str, *, reason: str | None = None, result: dict[str, Any] | None = None) -> None:
        """Record the end of a trial: ``done`` with ``result`` (the columns above), or ``failed`` /
        ``diverged`` with ``reason`` (and what is known of the run)."""
        if status not in FINISHED:
            raise ValueError(f"finish: status must be one of {', '.join(FINISHED)}, got {status!r}")
        values = {k: (json.dumps(v) if k in _JSON and v is not None else v) for k, v in (result or {}).items()}
        values.update(status=status, reason=reason, finished_at=time.time())
        columns = ", ".join(f"{k} = ?" for k in values)
        with self.transaction() as db:
            db.execute(f"UPDATE trials SET {columns} WHERE key = ?", (*values.values(), key))
            self._event(db, key, status, reason)

    def release(self, key: str, why: str) -> None:
        """A running trial goes back to pending (its worker stopped without finishing it)."""
        with self.transaction() as db:
            db.execute("UPDATE trials SET status = 'pending', worker = NULL WHERE key = ? AND status = 'running'", (key,))
            self._event(db, key, "interrupted", why)

    def trial(self, key: str) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM trials WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(f"{self.path}: no trial {key}")
        return _decode(row)

    def trials(self, *, status: str | Iterable[str] | None = None, in_study: bool = True) -> list[dict[str, Any]]:
        """The study's trials in order (``status``: only those)."""
        sql, args = "SELECT * FROM trials WHERE in_study >= ?", [1 if in_study else 0]
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            sql += f" AND status IN ({', '.join('?' for _ in wanted)})"
            args += wanted
        return [_decode(r) for r in self.db.execute(sql + " ORDER BY idx", args).fetchall()]

    def counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT status, COUNT(*) FROM trials WHERE in_study = 1 GROUP BY status").fetchall()
        return {s: 0 for s in STATUSES} | {r[0]: r[1] for r in rows}

    def events(self, key: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM events", ()
        if key is not None:
            sql, args = sql + " WHERE key = ?", (key,)
        return [dict(r) for r in self.db.execute(sql + " ORDER BY id", args).fetchall()]

    @staticmethod
    def _event(db: sqlite3.Connection, key: str, event: str, detail: str | None) -> None:
        db.execute("INSERT INTO events (key, at, event, detail) VALUES (?, ?, ?, ?)", (key, time.time(), event, detail))


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for k in _JSON:
        if out.get(k) is not None:
            out[k] = json.loads(out[k])
    for k in ("higher_is_better", "beats_baseline", "in_study"):
        if out.get(k) is not None:
            out[k] = bool(out[k])
    return out
