"""The issue-6 acceptance configs parse and name a target; benchmarks/acceptance.py's relative-window
forecasting wrapper un-shifts correctly. No training here (the runs themselves: docs/results.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from gatelab.config import load

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "acceptance").glob("*.toml"))


@pytest.fixture(scope="module")
def acceptance():
    """benchmarks/acceptance.py as a module (importing it registers ``forecast_relative:``)."""
    spec = importlib.util.spec_from_file_location("acceptance", REPO / "benchmarks" / "acceptance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_acceptance_configs():
    names = {p.stem for p in CONFIGS}
    assert {"copy_t100_lstm", "charlm_shakespeare_lstm", "airline_relative_lstm", "ucr_gunpoint_gru",
            "ucr_italypowerdemand_lstm", "ucr_basicmotions_gru", "ucr_japanesevowels_gru"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_has_a_target(acceptance, path):
    config = load(path)
    assert config.name == path.stem
    metric, comparison, target, _ = acceptance.target_for(config)
    assert comparison in (">=", "<") and target > 0
    if config.task.name.startswith("ucr:"):
        assert config.model.cell in ("lstm", "gru")  # the issue asks for an LSTM or a GRU
    if config.task.name == "copy":
        assert config.model.cell == "lstm" and config.task.options["length"] == 100


def test_relative_forecast_zero_change_is_the_last_value_baseline(acceptance):
    pytest.importorskip("aeon")
    import gatelab.tasks

    task = gatelab.tasks.get("forecast_relative:Airline", log=True)
    plain = gatelab.tasks.get("forecast:Airline", log=True)
    assert [len(s) for s in task.splits()] == [len(s) for s in plain.splits()]
    x, y = task.split("test")[0]
    assert float(x[-1, 0]) == 0.0
    # predicting "no change from the origin's level" is the last-value forecast: MAE 76.00
    assert task.evaluate(torch.zeros(1, task.horizon), "test")["mae"] == pytest.approx(76.0, abs=1e-3)
    assert task.baselines("test") == plain.baselines("test")
