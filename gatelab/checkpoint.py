"""Checkpoints and run files, written atomically and read without unpickling code.

A checkpoint is a ``torch.save`` of plain data only (tensors, numbers, strings, lists, dicts): the
model's and optimiser's ``state_dict``, the scheduler's state, the RNG states (torch, numpy, Python,
CUDA), the step, the resolved configuration as a dict, and what the trainer needs to continue
(best value, carried state), plus a SHA-256 digest of all of it. :func:`load_checkpoint` reads it
with ``torch.load(weights_only=True)``, so a file that asks to build arbitrary objects is refused,
checks the digest (torch's zip reader does not notice changed tensor bytes), and turns every failure
into a :class:`CheckpointError` naming the file. The digest is unkeyed: it detects corruption, not a
deliberate edit (whoever changes the file can recompute it); loading never executes code either way.

Every file is written to a temporary file in the same folder (``.NAME.XXXXXXXX.tmp``), flushed and
fsynced, then renamed over the target (:func:`atomic_write`): a crash leaves either the old file or
the new one, never half of one, so the last good checkpoint survives a failed write; a kill can leave
the temporary file, which :func:`remove_stale_temporaries` clears.

A run directory is held by one process at a time (:func:`exclusive`), and a name from a config or the
command line becomes a folder only through :func:`safe_child`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import pickle
import random
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "LockedError",
    "FORMAT",
    "VERSION",
    "atomic_write",
    "write_json",
    "safe_child",
    "exclusive",
    "remove_stale_temporaries",
    "save_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "digest",
]

FORMAT = "gatelab-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "step", "config", "model", "optimizer", "scheduler", "rng", "trainer", "digest")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, of another format, or holds something it must not."""


class LockedError(RuntimeError):
    """Another process holds the folder (see :func:`exclusive`)."""


def _temporary_pattern(name: str) -> re.Pattern[str]:
    # what tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp") makes: 8 characters of [a-z0-9_] between
    return re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp")


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file ``.NAME.XXXXXXXX.tmp`` in the same folder, fsync,
    then rename. An ``OSError`` (a full disk) leaves the old file as it was and names ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:  # write(), fsync() do not
            err.filename = str(path)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` leaves in ``folder`` when killed mid-write,
    for the targets ``names`` only (``.last.pt.XXXXXXXX.tmp`` for ``last.pt``); returns them.

    Only safe while no other process writes there: hold :func:`exclusive` on ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = [_temporary_pattern(name) for name in names]
    stale = [p for p in folder.iterdir() if any(pat.fullmatch(p.name) for pat in patterns) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def safe_child(parent: str | Path, name: str, what: str) -> Path:
    """``parent / name`` when ``name`` is one plain folder name; :class:`~gatelab.config.ConfigError`
    naming ``what`` (the key or flag it came from) when it is empty, ``.``, ``..``, absolute or holds a
    path separator or NUL, i.e. anything that could reach outside ``parent``."""
    from .config import ConfigError

    separators = {"/", "\\", "\0", os.sep, *([os.altsep] if os.altsep else [])}
    if not isinstance(name, str) or name.strip() in ("", ".", "..") or any(c in name for c in separators):
        raise ConfigError(f"{what}: {name!r} cannot name a folder inside {parent}: expected one plain folder name "
                          f"(not empty, '.' or '..'; no '/', '\\' or NUL)")
    return Path(parent) / name


@contextlib.contextmanager
def exclusive(folder: str | Path, what: str = "run directory") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if missing) until the block ends.

    The lock is ``fcntl.flock`` on ``folder/.lock``, taken without waiting: if another process (or
    another open of it in this one) holds it, :class:`LockedError` names the folder at once. The
    kernel drops the lock when its holder exits, however it exits, so a killed run leaves no stale
    lock; the file itself stays (removing it would let two processes lock different files)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise LockedError(f"{folder}: another process holds this {what} (lock {lock}); wait for it to end or "
                              f"use another folder") from None
        yield folder
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON, atomically."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# -- RNG states as plain data ------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """torch, numpy and Python RNG states (and CUDA's when present) as tensors and numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- checkpoints --------------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path,
    *,
    step: int,
    config: Mapping[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Mapping[str, Any],
    trainer: Mapping[str, Any],
) -> None:
    """Write a checkpoint atomically (see the module docstring for what it holds)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "config": dict(config),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": dict(scheduler),
        "rng": rng_state(),
        "trainer": dict(trainer),
    }
    payload["digest"] = digest(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU without unpickling code; :class:`CheckpointError` on any problem."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    _check_header(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the checks below speak for it
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: its pickled content is corrupt or asks to build objects a checkpoint never "
            f"holds (it may have been tampered with); nothing was executed ({_unpickler_detail(err)})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot be read: the file is truncated or corrupt ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a gatelab checkpoint (no format marker {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')!r}, this gatelab reads {VERSION}")
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    if digest(payload) != payload["digest"]:
        raise CheckpointError(f"{path}: the content does not match its SHA-256 digest: the file is corrupt or was "
                              f"modified after it was written")
    return payload


def _check_header(path: Path) -> None:
    """A torch.save file is a zip archive (or, from old torch, a pickle); anything else is no checkpoint,
    so say that rather than let the unpickler call it corrupt or tampered with."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err})") from None
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return
    if not head:
        raise CheckpointError(f"{path}: is empty, not a checkpoint (a write that never finished?)")
    try:
        head.decode("utf-8")
        kind = "a text file"
    except UnicodeDecodeError:
        kind = f"a file starting with {head[:8]!r}"
    raise CheckpointError(f"{path}: not a checkpoint: it is {kind}, and a gatelab checkpoint is a torch.save zip file")


def _unpickler_detail(err: Exception) -> str:
    """The specific reason in torch's weights-only error, without its boilerplate (and its advice to
    load with ``weights_only=False``, which is exactly what must not be done with such a file)."""
    text = str(err).split("WeightsUnpickler error:")[-1]
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    lines = [s for s in lines if not s.startswith(("Weights only load failed", "Check the documentation", "(1)", "(2)"))]
    detail = " ".join(lines).split(" Please use ")[0].strip()  # torch's advice on allowlisting the global
    return detail or type(err).__name__


def digest(payload: Mapping[str, Any]) -> str:
    """SHA-256 over every key, number, string and tensor (dtype, shape, bytes) of ``payload`` but its
    ``digest`` entry, in a fixed order."""
    h = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, Mapping):
            keys = sorted((k for k in obj if obj is not payload or k != "digest"), key=repr)
            h.update(f"D{len(keys)}".encode())
            for key in keys:
                h.update(repr(key).encode())
                feed(obj[key])
        elif isinstance(obj, (list, tuple)):
            h.update(f"L{len(obj)}".encode())
            for item in obj:
                feed(item)
        else:
            h.update(f"V{obj!r}".encode())

    feed(payload)
    return h.hexdigest()
