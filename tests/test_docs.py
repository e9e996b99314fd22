"""Every ```python block of README.md and docs/*.md runs as written.

Each block runs on its own, in a fresh namespace, in a temporary working directory where the repository's
``configs/`` is reachable (so ``runs/`` lands there). A block that is an illustrative fragment on purpose
carries ``<!-- not run: why -->`` on the line before its fence; only those are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
NOT_RUN = "<!-- not run"


def blocks() -> list[tuple[str, str, bool]]:
    """``(file:line, code, marked not run)`` for every python block."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip("\n").rpartition("\n")[2].strip()
            found.append((f"{path.relative_to(REPO)}:{line}", match.group(1), before.startswith(NOT_RUN)))
    return found


BLOCKS = blocks()


def test_the_docs_have_python_blocks_and_few_are_skipped():
    assert any(where.startswith("README.md") for where, _, _ in BLOCKS)
    assert sum(skip for _, _, skip in BLOCKS) <= len(BLOCKS) // 2


@pytest.mark.parametrize("where,code,skip", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_python_block_runs(where, code, skip, tmp_path, monkeypatch):
    if skip:
        pytest.skip(f"{where} is marked {NOT_RUN} -->")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {"__name__": "__docs__"})  # tracebacks name the doc and its line
