"""Every user mistake on the command line is one line on stderr naming the file, key or flag, with exit
status 2 for usage and configuration errors and 1 for failures; ``--debug`` shows the traceback."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import gatelab.train
from gatelab.checkpoint import CheckpointError, exclusive
from gatelab.cli import main

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
threads = 1
"""


def tiny(tmp_path: Path, extra: str = "", name: str = "tiny") -> Path:
    """The tiny config with ``extra`` lines appended to its [train] section."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.replace('name = "tiny"', f"name = {name!r}", 1) + extra)
    return path


def train(tmp_path: Path, *args: str, config: Path | None = None) -> list[str]:
    return ["train", str(config or tiny(tmp_path)), "--runs", str(tmp_path / "runs"), "--quiet", *args]


def out_of_memory(*args, **kwargs):
    raise MemoryError


def disk_full_at_last_pt(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):  # the temporary file of last.pt
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def held(tmp_path: Path, stack: contextlib.ExitStack) -> list[str]:
    stack.enter_context(exclusive(tmp_path / "runs" / "tiny"))
    return train(tmp_path)


# (id, argv from (tmp_path, monkeypatch, stack), exit status, what the line must name or say)
Case = tuple[str, Callable[[Path, pytest.MonkeyPatch, contextlib.ExitStack], list[str]], int, list[str]]
CASES: list[Case] = [
    ("name-dotdot", lambda t, m, s: train(t, "--name", "../../x"), 2, ["--name", "'../../x'"]),
    ("name-absolute", lambda t, m, s: train(t, "--name", str(t / "abs")), 2, ["--name", "abs'"]),
    ("name-parent", lambda t, m, s: train(t, "--name", ".."), 2, ["--name", "'..'"]),
    ("name-dot", lambda t, m, s: train(t, "--name", "."), 2, ["--name", "'.'"]),
    ("name-empty", lambda t, m, s: train(t, "--name", ""), 2, ["--name", "''"]),
    ("name-separator", lambda t, m, s: train(t, "--name", "a/b"), 2, ["--name", "'a/b'"]),
    ("toml-name", lambda t, m, s: train(t, config=tiny(t, name="../../evil")), 2, ["tiny.toml: name: '../../evil'"]),
    ("config-is-a-folder", lambda t, m, s: train(t, config=t), 2, [" is a folder"]),
    ("config-missing", lambda t, m, s: train(t, config=t / "nope.toml"), 2, ["nope.toml: no such config file"]),
    ("runs-is-a-file", lambda t, m, s: ["train", str(tiny(t)), "--runs", str(tiny(t)), "--quiet"], 2,
     ["--runs", "tiny.toml: is a file"]),
    ("runs-unwritable", lambda t, m, s: ["train", str(tiny(t)), "--runs", "/proc/gatelab-runs", "--quiet"], 2,
     ["--runs /proc/gatelab-runs: cannot create"]),
    ("cuda-without-cuda", lambda t, m, s: train(t, "--train.device=cuda"), 2, ["train.device", "CUDA is not available"]),
    ("out-of-memory", lambda t, m, s: m.setattr(gatelab.train, "train_loop", out_of_memory) or train(t), 1,
     ["out of memory", "train.batch_size"]),
    ("disk-full", lambda t, m, s: disk_full_at_last_pt(m) or train(t), 1, ["last.pt: No space left on device"]),
    ("diagnose-missing", lambda t, m, s: ["diagnose", str(t / "missing.pt")], 2, ["missing.pt"]),
    ("binary-config", lambda t, m, s: (t / "bin.toml").write_bytes(b"\xff\xfe\x00[train]") and train(t, config=t / "bin.toml"),
     2, ["bin.toml", "UTF-8"]),
    ("negative-seed", lambda t, m, s: train(t, config=tiny(t, "seed = -1\n")), 2, ["tiny.toml", "train.seed", "-1"]),
    ("text-as-checkpoint", lambda t, m, s: ["evaluate", str(tiny(t))], 1, ["tiny.toml: not a checkpoint", "text file"]),
    ("missing-checkpoint", lambda t, m, s: ["evaluate", str(t / "gone.pt")], 2, ["gone.pt: no such checkpoint file"]),
    ("run-dir-held", lambda t, m, s: held(t, s), 1, ["runs/tiny: another process holds"]),
]


@pytest.fixture
def stack():
    with contextlib.ExitStack() as s:
        yield s


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_naming_what_is_wrong(case: Case, tmp_path, monkeypatch, stack, capsys):
    name, make_argv, status, says = case
    if name == "cuda-without-cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    argv = make_argv(tmp_path, monkeypatch, stack)
    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line
    assert err.startswith(f"gatelab {argv[0]}: error: ") and "Traceback" not in err
    for words in says:
        assert words in err, err
    assert "tampered" not in err


def test_an_escaping_name_writes_nothing(tmp_path, capsys):
    runs = tmp_path / "a" / "runs"
    assert main(["train", str(tiny(tmp_path, name="../../evil")), "--runs", str(runs), "--quiet"]) == 2
    assert main(["train", str(tiny(tmp_path)), "--runs", str(runs), "--quiet", "--name", "../x"]) == 2
    assert "cannot name a folder inside" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "runs", "tiny.toml"]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, tmp_path):
    argv = ["evaluate", str(tiny(tmp_path))]
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        main(["--debug", *argv] if where == "before" else [*argv, "--debug"])
