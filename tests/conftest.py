"""Shared fixtures, and the session summary of the largest cell-vs-torch parity error."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

# (oracle cell, dtype) -> largest absolute difference seen over outputs and all gradients.
PARITY_ERRORS: dict[tuple[str, str], float] = {}


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed: every test draws its own reproducible numbers."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors on a shared 2-core machine: one intra-op thread is faster and steadier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def parity_log() -> Callable[[str, torch.dtype, float], None]:
    """``log(cell, dtype, err)`` keeps the largest parity error per (cell, dtype) for the summary."""

    def log(cell: str, dtype: torch.dtype, err: float) -> None:
        key = (cell, str(dtype).removeprefix("torch."))
        PARITY_ERRORS[key] = max(PARITY_ERRORS.get(key, 0.0), err)

    return log


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not PARITY_ERRORS:
        return
    terminalreporter.section("largest parity error per cell")
    for (cell, dtype), err in sorted(PARITY_ERRORS.items()):
        terminalreporter.write_line(f"{cell:<20} {dtype:<8} {err:.3e}")
