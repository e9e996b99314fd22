"""``forecast:NAME``: univariate forecasting on series shipped inside aeon and statsmodels.

The last ``test_size`` points are held out for test, the ``val_size`` points before them for
validation, and everything earlier is the training part. Items are windows: ``x`` is the
``window`` scaled values before a forecast origin ``o`` (``(window, 1)``), ``y`` the next ``horizon``
scaled values (``(horizon,)``). Training origins slide by one step and every target lies inside the
training part; validation and test origins tile their blocks with stride ``horizon``, and their
inputs are the true values before the origin. Scaling (optional log, then z-score) is fitted on the
training part only. Metrics MAE, sMAPE (percent) and RMSE are in the series' original units.

``relative`` chooses what the model sees and predicts, in the scaled units ``z``:

- ``"none"`` (default): the window ``z[o-w:o]`` and the values ``z[o:o+h]``;
- ``"last"``: both relative to the window's last value, ``z[o-w:o] - z[o-1]`` and ``z[o:o+h] - z[o-1]``:
  the model predicts the change from the level at the origin;
- ``"season"``: the input as for ``"last"``, the target relative to the seasonal-naive forecast,
  ``z[o+k] - z[o-m+(k mod m)]``: the model predicts the correction to seasonal naive (with ``log``,
  the year-on-year growth). Training origins start at ``max(window, season)``.

The relative forms remove the level, so a trend that carries the test block beyond every training
value (Airline: 1960 peaks at 622 passengers, 1949-1958 at 505) does not push inputs and targets out
of the range the model was trained on. :meth:`evaluate` adds the anchor back before scoring, so the
metrics and baselines are the same for every form.

Baselines per item at origin ``o`` with season ``m``: seasonal-naive ``ŷ[o+k] = y[o - m + (k mod m)]``
and last-value ``ŷ[o+k] = y[o-1]``. Airline with the last 12 months held out: seasonal-naive MAE
47.83, last-value MAE 76.00.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import _checks as check
from . import metrics as M
from .base import SequenceDataset, Task, quiet_deprecations, require
from .ucr import _aeon_data_dir

__all__ = ["ForecastTask", "SERIES", "RELATIVE", "load_series"]

#: The forms of ``ForecastTask(relative=...)``.
RELATIVE = ("none", "last", "season")


@dataclass(frozen=True)
class SeriesInfo:
    """Where a series comes from and its default forecasting setup."""

    source: str  # "aeon" or "statsmodels"
    description: str
    season: int
    horizon: int
    window: int
    test_size: int


SERIES: dict[str, SeriesInfo] = {
    "Airline": SeriesInfo("aeon", "monthly airline passengers 1949-1960 (Box & Jenkins series G), 144 points",
                          season=12, horizon=12, window=24, test_size=12),
    "Lynx": SeriesInfo("aeon", "annual Canadian lynx trappings 1821-1934, 114 points (cycle ~10 years)",
                       season=10, horizon=10, window=20, test_size=10),
    "ShampooSales": SeriesInfo("aeon", "monthly shampoo sales over three years, 36 points",
                               season=12, horizon=3, window=6, test_size=12),
    "sunspots": SeriesInfo("statsmodels", "yearly sunspot numbers 1700-2008, 309 points (cycle ~11 years)",
                           season=11, horizon=11, window=33, test_size=11),
    "co2": SeriesInfo("statsmodels", "Mauna Loa CO2 (ppm), weekly 1958-2001 averaged to 526 monthly points, "
                      "empty months linearly interpolated", season=12, horizon=12, window=36, test_size=12),
}


def _aeon_csv(name: str) -> np.ndarray:
    """The value column of ``aeon/datasets/data/NAME/NAME.csv`` (read directly: aeon 1.6 deprecates the
    Lynx and ShampooSales loader functions but still ships the files)."""
    require("aeon.datasets", f"the task 'forecast:{name}'")
    root = _aeon_data_dir()
    path = Path(root) / name / f"{name}.csv" if root is not None else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"forecast:{name}: {path} is not in the installed aeon (gatelab needs aeon>=1.6,<1.7)")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return np.array([float(r[1]) for r in rows])


def load_series(name: str) -> np.ndarray:
    """The raw series ``(N,)`` float64 for one of :data:`SERIES`."""
    if name in ("Airline", "Lynx", "ShampooSales"):
        return _aeon_csv(name)
    if name == "sunspots":
        sunspots = require("statsmodels.datasets.sunspots", "the task 'forecast:sunspots'")
        with quiet_deprecations():
            return sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(dtype=np.float64)
    if name == "co2":
        co2 = require("statsmodels.datasets.co2", "the task 'forecast:co2'")
        with quiet_deprecations():
            monthly = co2.load_pandas().data["co2"].resample("MS").mean()
            return monthly.interpolate(method="linear").to_numpy(dtype=np.float64)
    raise ValueError(f"unknown series {name!r}; expected one of {list(SERIES)}")


class ForecastTask(Task):
    """Multi-step forecasting of one series from a window of its past (see the module docstring).

    ``output_size == horizon``: the model emits the whole horizon from its last step. Pass model
    outputs (model units, ``(N, horizon)``) to :meth:`evaluate`; :meth:`forecasts` adds the anchors
    back and un-scales them, and the scores are in original units.
    """

    kind = "forecast"
    input_size = 1
    metrics = ("mae", "smape", "rmse")
    primary_baseline = "seasonal_naive"

    def __init__(
        self,
        name: str,
        horizon: int | None = None,
        window: int | None = None,
        test_size: int | None = None,
        val_size: int | None = None,
        season: int | None = None,
        log: bool = False,
        scale: bool = True,
        relative: str = "none",
    ) -> None:
        super().__init__()
        by_lower = {n.lower(): n for n in SERIES}
        if check.text("forecast", "name", name).lower() not in by_lower:
            raise ValueError(f"unknown forecasting series {name!r}; expected one of {list(SERIES)}")
        self.series_name = by_lower[name.lower()]
        self.name = f"forecast:{self.series_name}"
        info = SERIES[self.series_name]
        # None means the series' default; 0 is refused rather than read as "default".
        self.horizon = check.optional_integer(self.name, "horizon", horizon, 1) or info.horizon
        self.window = check.optional_integer(self.name, "window", window, 1) or info.window
        self.season = check.optional_integer(self.name, "season", season, 1) or info.season
        default_test = info.test_size if info.test_size % self.horizon == 0 else self.horizon
        self.test_size = check.optional_integer(self.name, "test_size", test_size, 1) or default_test
        val_size = check.optional_integer(self.name, "val_size", val_size, 0)
        self.val_size = val_size if val_size is not None else self.horizon
        self.log = check.flag(self.name, "log", log)
        self.scale = check.flag(self.name, "scale", scale)
        self.relative = check.choice(self.name, "relative", relative, RELATIVE)
        self.output_size = self.horizon
        for size, label in ((self.test_size, "test_size"), (self.val_size, "val_size")):
            if size % self.horizon:
                raise ValueError(f"{self.name}: {label} must be a multiple of horizon {self.horizon}, got {size}")
        self.values = load_series(self.series_name)  # (N,) original units
        if self.log and (self.values <= 0).any():
            raise ValueError(f"{self.name}: log=True needs a positive series")
        self.n_train = len(self.values) - self.test_size - self.val_size
        season_history = self.relative == "season"
        history = max(self.window, self.season) if season_history else self.window
        if self.n_train < history + self.horizon:
            what = f"max(window {self.window}, season {self.season})" if season_history else f"window {self.window}"
            raise ValueError(f"{self.name}: {self.n_train} training points cannot hold {what} + horizon {self.horizon}")
        fit = self._transform_log(self.values[: self.n_train])
        self.mean, self.std = (float(fit.mean()), float(fit.std())) if self.scale else (0.0, 1.0)

    def _transform_log(self, v: np.ndarray) -> np.ndarray:
        return np.log(v) if self.log else v

    def transform(self, values: np.ndarray | Tensor) -> np.ndarray:
        """Original units to model units (log if ``log``, then z-score with training-part statistics)."""
        return (self._transform_log(np.asarray(values, dtype=np.float64)) - self.mean) / self.std

    def inverse_transform(self, z: np.ndarray | Tensor) -> np.ndarray:
        """Model units back to original units."""
        if isinstance(z, Tensor):
            z = z.detach().cpu().numpy()
        v = np.asarray(z, dtype=np.float64) * self.std + self.mean
        return np.exp(v) if self.log else v

    def origins(self, split: str) -> np.ndarray:
        """Forecast origins (index of the first forecast step) of the items of ``split``, in order."""
        n_val_end = self.n_train + self.val_size
        if split == "train":
            first = max(self.window, self.season) if self.relative == "season" else self.window
            return np.arange(first, self.n_train - self.horizon + 1)
        if split == "val":
            return np.arange(self.n_train, n_val_end, self.horizon)
        if split == "test":
            return np.arange(n_val_end, len(self.values), self.horizon)
        raise ValueError(f"unknown split {split!r}")

    def anchors(self, split: str) -> np.ndarray:
        """What the targets of ``split`` are relative to, ``(N, horizon)`` in model units (see ``relative``):
        zeros, the window's last value, or the seasonal-naive forecast."""
        origins = self.origins(split)
        z = self.transform(self.values)
        if self.relative == "last":
            return np.repeat(z[origins - 1, None], self.horizon, axis=1)
        if self.relative == "season":
            k = np.arange(self.horizon)
            return z[origins[:, None] - self.season + (k % self.season)[None, :]]
        return np.zeros((len(origins), self.horizon))

    def _build(self) -> dict[str, SequenceDataset]:
        z = self.transform(self.values)
        out = {}
        for split in ("train", "val", "test"):
            origins, anchors = self.origins(split), self.anchors(split)
            shift = z[origins - 1] if self.relative != "none" else np.zeros(len(origins))
            xs = [torch.tensor(z[o - self.window : o, None] - s, dtype=torch.float32) for o, s in zip(origins, shift)]
            ys = [torch.tensor(z[o : o + self.horizon] - a, dtype=torch.float32) for o, a in zip(origins, anchors)]
            out[split] = SequenceDataset(xs, ys)  # x (window, 1), y (horizon,)
        return out

    def targets(self, split: str) -> np.ndarray:
        """The true values ``(N, horizon)`` of ``split`` in original units."""
        return np.stack([self.values[o : o + self.horizon] for o in self.origins(split)])

    def _scores(self, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
        return {"mae": M.mae(y, pred), "smape": M.smape(y, pred), "rmse": M.rmse(y, pred)}

    def baselines(self, split: str = "test") -> dict[str, dict[str, float]]:
        """Seasonal-naive (over items whose origin has a full season of history) and last-value."""
        origins, m, k = self.origins(split), self.season, np.arange(self.horizon)
        seasonal = origins[origins >= m]
        y_seasonal = np.stack([self.values[o : o + self.horizon] for o in seasonal])
        naive = np.stack([self.values[o - m + (k % m)] for o in seasonal])
        last = np.stack([np.full(self.horizon, self.values[o - 1]) for o in origins])
        return {
            "seasonal_naive": self._scores(y_seasonal, naive),
            "last_value": self._scores(self.targets(split), last),
        }

    def forecasts(self, predictions: Tensor | np.ndarray, split: str) -> np.ndarray:
        """Model outputs ``(N, horizon)`` for the items of ``split`` as forecasts in original units."""
        if isinstance(predictions, Tensor):
            predictions = predictions.detach().cpu().numpy()
        anchors = self.anchors(split)
        predictions = np.asarray(predictions, dtype=np.float64)
        if predictions.size != anchors.size:
            raise ValueError(f"{self.name}: expected {anchors.shape[0]} x {self.horizon} predictions for the "
                             f"{split!r} split, got shape {tuple(predictions.shape)}")
        return self.inverse_transform(predictions.reshape(anchors.shape) + anchors)

    def evaluate(self, predictions: Tensor | np.ndarray, split: str) -> dict[str, float]:
        """``predictions``: ``(N, horizon)`` model outputs (model units, relative as ``relative`` says)
        for the items of ``split``, scored in original units."""
        return self._scores(self.targets(split), self.forecasts(predictions, split))
