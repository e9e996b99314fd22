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
    assert speed.main(["--tiny", "--cells", "lstm", "gru", "rnn", "--before", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["cell"] for r in rows} == {"lstm", "gru", "rnn"}
    assert {r["engine"] for r in rows} == {"fused", "torch", "naive"}
    fused = [r for r in rows if r["engine"] == "fused"]
    assert all(r["median_ms"] > 0 and r["ratio_vs_torch"] > 0 for r in fused)
    if data["meta"]["fused_impl"] == "C++":  # --before: the same layer on the earlier products, interleaved
        assert data["meta"]["before"] and all(r["before_ms"] > 0 and r["ratio_vs_before"] > 0 for r in fused)
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


def test_select_on_val_ranks_candidates_on_validation_only(tmp_path, capsys):
    """Two candidates on a tiny adding task: a trained one and one that never steps (lr 0). The
    trained one must rank better on validation MSE, and no test figure appears in the output."""
    select = _load("select_on_val")
    config = tmp_path / "tiny.toml"
    config.write_text('name = "tiny"\n[task]\nname = "adding"\nlength = 10\nn_train = 256\nn_val = 128\nn_test = 128\n'
                      '[model]\ncell = "gru"\nhidden_sizes = [16]\n'
                      '[train]\nsteps = 150\nbatch_size = 32\nlr = 1e-2\nthreads = 1\n')
    out = tmp_path / "select.json"
    argv = [str(config), "--candidate", "trained=", "--candidate", "frozen=train.lr=0", "--seeds", "0", "1",
            "--runs", str(tmp_path / "runs"), "--out", str(out)]
    assert select.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["metric"] == "mse" and len(data["runs"]) == 4
    assert all(set(r["val"]) >= {"mse", "loss"} and "test" not in r for r in data["runs"])
    summary = data["summary"]
    assert summary["trained"]["mean"] < summary["frozen"]["mean"]
    assert summary["frozen"]["worst"] == max(r["val"]["mse"] for r in data["runs"] if r["candidate"] == "frozen")
    printed = capsys.readouterr().out
    assert "trained" in printed and "test" not in printed
    with pytest.raises(SystemExit, match="LABEL=KEY=VALUE"):
        select.main([str(config), "--candidate", "nolabel", "--out", str(out)])


def test_options_speed_benchmark_runs_tiny(tmp_path, capsys):
    bench = _load("options_speed")
    out = tmp_path / "options.json"
    assert bench.main(["--tiny", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["option"] for r in rows} == set(bench.OPTIONS)
    assert all(r["engine"] == "fused" and r["fused_ms"] > 0 and r["reference_over_fused"] > 0 for r in rows)
    assert "| GRU zoneout" in capsys.readouterr().out


def test_compile_speed_benchmark_runs_tiny(tmp_path, capsys):
    bench = _load("compile_speed")
    out = tmp_path / "compile.json"
    assert bench.main(["--tiny", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["case"] for r in rows} == set(bench.CASES) and {r["mode"] for r in rows} == {"fwd+bwd", "fwd (no grad)"}
    assert {r["eager_engine"] for r in rows if r["case"] == "LSTM default activations"} == {"native"}
    assert all(r["compiled_ms"] > 0 and r["compiled_over_eager"] > 0 for r in rows)
    fixed = json.loads(out.read_text())["fixed_cost"]
    assert [(r["case"], r["mode"]) for r in fixed] == [(c, m) for c in bench.FIXED_CASES
                                                       for m in ("fwd+bwd", "fwd (no grad)")]
    assert all(r["eager_us"] > 0 for r in fixed)
    assert all(r["compiled_us"] > 0 for r in fixed if r["compiled_us"] is not None)
    assert all(r["case"] == "torch.nn.LSTM (allow_rnn)" and r["mode"] == "fwd+bwd" and r["error"]
               for r in fixed if r["compiled_us"] is None)  # torch cannot compile its own LSTM's training step
    text = capsys.readouterr().out
    assert "| GRU hard_sigmoid/relu" in text and "| gatelab.LSTM default activations | fwd+bwd |" in text


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
def test_onnx_speed_benchmark_runs_tiny(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    bench = _load("onnx_speed")
    out = tmp_path / "onnx.json"
    assert bench.main(["--tiny", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["node"].startswith("ONNX LSTM node") and row["node_ms"] > 0 and row["scan_ms"] > 0
    assert row["max_error_vs_pytorch"] < 1e-5
    assert data["meta"]["onnxruntime"] and data["meta"]["threads"] >= 1
    assert "| LSTM (torch's activations) | yes |" in capsys.readouterr().out


def test_long_sequence_benchmark_runs_tiny(tmp_path, capsys):
    bench = _load("long_sequence")
    out = tmp_path / "long.json"
    assert bench.main(["--tiny", "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["cell"] for r in rows} == set(bench.CELLS) and {r["T"] for r in rows} == {8, 16}
    assert all(r["median_ms"] > 0 and r["speedup_vs_torch"] > 0 and "fused engine" in r["form"] for r in rows)
    assert data["meta"]["cpu"] and "| min_gru | 16 |" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo, compiling the `compiled` yardstick's step, reads .grad
def test_gpu_benchmark_runs_tiny_and_names_what_ran(tmp_path, monkeypatch):
    """benchmarks/gpu_speed.py at a tiny size (on a machine without CUDA its Triton loop runs under the
    interpreter, which the table says): every yardstick timed, the form recorded, JSON and table written."""
    pytest.importorskip("triton")
    monkeypatch.setenv("GATELAB_TRITON", "interpret")
    bench = _load("gpu_speed")
    assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_speed.json").read_text())
    assert {(r["cell"], r["mode"]) for r in data["rows"]} == {(c, m) for c in ("lstm", "gru") for m in ("train", "no_grad")}
    for r in data["rows"]:
        assert set(r["ms"]) == {"cudnn", "triton", "loop", "compiled"} and all(v > 0 for v in r["ms"].values())
        assert r["form"] == "persistent"
    table = (tmp_path / "gpu_speed.md").read_text()
    assert "| lstm | float32 | 16 | 5 | 16 | train | persistent |" in table
    import torch

    if not torch.cuda.is_available():
        assert "interpreter on the CPU (not a speed figure)" in table
