"""The speed benchmark still runs (at a tiny size: benchmarks are never timed tests)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gatelab_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"gatelab_bench_{name}"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore::UserWarning")  # the profiler may warn about its own setup
def test_speed_benchmark_runs_tiny(tmp_path, capsys):
    speed = _load("speed")
    out = tmp_path / "bench.json"
    assert speed.main(["--tiny", "--cells", "lstm", "gru", "rnn", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["cell"] for r in rows} == {"lstm", "gru", "rnn"}
    assert {r["engine"] for r in rows} == {"fused", "torch", "naive"}
    fused = [r for r in rows if r["engine"] == "fused"]
    assert all(r["median_ms"] > 0 and r["ratio_vs_torch"] > 0 for r in fused)
    assert data["meta"]["threads"] >= 1 and data["meta"]["matmul_gflops"] > 0
    assert "| lstm |" in capsys.readouterr().out


def test_naive_loop_matches_the_fused_layer():
    """The benchmark's 'naive' yardstick computes the same function as the layer it is timed against."""
    import torch

    speed = _load("speed")
    for cell in ("lstm", "gru", "rnn"):
        models = speed.build(cell, 8, 3, 5)
        x = torch.randn(5, 3, 8)
        torch.testing.assert_close(models["naive"](x), models["fused"](x), rtol=1e-5, atol=1e-6)
