"""Datasets: validation of bad files, the simulated default, splits, windows and forecast tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import REAL_DATA, ROOT, requires_real_data

from qwenlite.data import (
    Split,
    default_data_path,
    forecast_examples,
    load_dataset,
    main,
    make_training_windows,
    resolve_data,
    save_dataset,
    simulate,
    simulate_to,
    split_systems,
    summary_statistics,
)
from qwenlite.data.llmtime import LLMTimeSettings, decode, encode
from qwenlite.errors import DataError, QwenliteError
from qwenlite.io import CACHE_ENV


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return simulate_to(tmp_path_factory.mktemp("data") / "small.h5", n_systems=40, n_points=50)


# ----- loading and validation ---------------------------------------------------------------------
def test_load_good_file(small):
    ds = load_dataset(small)
    assert ds.trajectories.shape == (40, 50, 2) and ds.trajectories.dtype == np.float32
    assert ds.time.shape == (50,) and ds.time.dtype == np.float64
    assert (ds.n_systems, ds.n_steps, ds.path) == (40, 50, small)


def _write(path, **datasets):
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            if value is None:
                f.create_group(key)
            else:
                f.create_dataset(key, data=value)


GOOD = np.ones((3, 5, 2), dtype=np.float32)
TIME = np.linspace(0, 8, 5)


def _with(index, value):
    x = GOOD.copy()
    x[index] = value
    return x


def _truncated(path):
    _write(path, trajectories=np.ones((50, 100, 2), dtype=np.float32), time=np.arange(100.0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = {
    "missing trajectories": (lambda p: _write(p, time=TIME), "no /trajectories dataset"),
    "missing time": (lambda p: _write(p, trajectories=GOOD), "no /time dataset"),
    "group, not a dataset": (lambda p: _write(p, trajectories=None, time=TIME), "not a dataset"),
    "text values": (lambda p: _write(p, trajectories=np.array([b"a"]), time=TIME), "dtype"),
    "rank 2": (lambda p: _write(p, trajectories=GOOD[:, :, 0], time=TIME), r"shape \(3, 5\)"),
    "three variables": (lambda p: _write(p, trajectories=np.ones((3, 5, 3)), time=TIME),
                        r"shape \(3, 5, 3\), expected \(N, T, 2\)"),
    "no systems": (lambda p: _write(p, trajectories=np.ones((0, 5, 2)), time=TIME), "N, T >= 1"),
    "2-D time": (lambda p: _write(p, trajectories=GOOD, time=TIME[None]), r"/time has shape"),
    "length mismatch": (lambda p: _write(p, trajectories=GOOD, time=TIME[:4]),
                        "/time has 4 points but /trajectories has 5 timesteps"),
    "NaN": (lambda p: _write(p, trajectories=_with((1, 2, 0), np.nan), time=TIME),
            "1 non-finite .* system 1, step 2, variable 0"),
    "inf": (lambda p: _write(p, trajectories=_with((2, 4, 1), np.inf), time=TIME),
            "1 non-finite .* system 2, step 4, variable 1"),
    "negative": (lambda p: _write(p, trajectories=_with((0, 3, 1), -0.5), time=TIME),
                 "1 negative .* system 0, step 3, variable 1"),
    "time not increasing": (lambda p: _write(p, trajectories=GOOD, time=TIME[::-1]),
                            "not strictly increasing"),
    "time NaN": (lambda p: _write(p, trajectories=GOOD, time=np.full(5, np.nan)), "/time has non"),
    "truncated": (_truncated, "cannot read .* as HDF5"),
    "not HDF5": (lambda p: p.write_text("prey,predator\n1,2\n"), "cannot read .* as HDF5"),
    "empty file": (lambda p: p.write_bytes(b""), "is empty"),
}


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad")
    paths = {}
    for i, (name, (make, _)) in enumerate(BAD_FILES.items()):
        paths[name] = directory / f"bad{i}.h5"
        make(paths[name])
    return paths


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_is_one_clear_error(bad_corpus, name, capsys):
    pattern = BAD_FILES[name][1]
    with pytest.raises(DataError, match=pattern):
        load_dataset(bad_corpus[name])
    assert main(["stats", "--data", str(bad_corpus[name])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad_corpus[name]) in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_files_each_get_their_own_message(bad_corpus):
    messages = []
    for path in bad_corpus.values():
        with pytest.raises(DataError) as info:
            load_dataset(path)
        messages.append(str(info.value).replace(str(path), "FILE"))
    assert len(set(messages)) == len(messages)


def test_cli_exit_status_and_no_traceback(bad_corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), CACHE_ENV: str(tmp_path)}
    for name in ("truncated", "NaN"):
        proc = subprocess.run([sys.executable, "-m", "qwenlite.data", "stats", "--data",
                               str(bad_corpus[name])], capture_output=True, text=True, env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
        assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no dataset file"):
        load_dataset(tmp_path / "nope.h5")
    with pytest.raises(DataError, match="--data .*nope.h5: no such file"):
        resolve_data(str(tmp_path / "nope.h5"))


# ----- the simulator and the default dataset ------------------------------------------------------
def test_simulation_is_deterministic_positive_and_on_the_time_grid():
    a, t, p = simulate(30, 40, seed=3)
    b, _, q = simulate(30, 40, seed=3)
    c, _, _ = simulate(30, 40, seed=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(p, q)
    assert not np.array_equal(a, c)
    assert a.shape == (30, 40, 2) and a.dtype == np.float32 and p.shape == (30, 5)
    assert np.isfinite(a).all() and (a > 0).all()
    np.testing.assert_allclose(t, np.linspace(0, 200, 40))


def test_simulation_solves_the_documented_equations():
    x, t, params = simulate(8, 2001, seed=5, t_max=20.0)
    x = x.astype(np.float64)
    dt = t[1] - t[0]
    a, b, c, d, k = (params[:, i, None] for i in range(5))
    prey, pred = x[:, 1:-1, 0], x[:, 1:-1, 1]
    dprey = (x[:, 2:, 0] - x[:, :-2, 0]) / (2 * dt)
    dpred = (x[:, 2:, 1] - x[:, :-2, 1]) / (2 * dt)
    np.testing.assert_allclose(dprey, a * prey * (1 - prey / k) - b * prey * pred, atol=2e-4)
    np.testing.assert_allclose(dpred, d * prey * pred - c * pred, atol=2e-4)


@requires_real_data
def test_simulated_data_resembles_the_course_data(tmp_path):
    sim = summary_statistics(load_dataset(simulate_to(tmp_path / "sim.h5")))
    real = summary_statistics(load_dataset(REAL_DATA))
    assert sim["shape"] == real["shape"] and sim["time"] == real["time"]
    for var in ("prey", "predator"):
        for stat in ("p50", "mean", "std", "p99"):
            assert sim["variables"][var][stat] == pytest.approx(real["variables"][var][stat],
                                                                 rel=0.2), (var, stat)


def test_default_dataset_is_generated_once_and_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    path = resolve_data(None)
    assert path == default_data_path() == tmp_path / "cache" / "lotka_volterra_simulated.h5"
    assert "generating" in capsys.readouterr().err
    ds = load_dataset(path)
    assert ds.trajectories.shape == (1000, 100, 2) and ds.time[-1] == 200.0
    stamp = path.stat().st_mtime_ns
    assert resolve_data(None) == path and path.stat().st_mtime_ns == stamp
    assert capsys.readouterr().err == ""
    with h5py.File(path, "a") as f:  # made by another simulator version: regenerated
        f.attrs["simulator_version"] = -5
    resolve_data(None)
    assert "generating" in capsys.readouterr().err


def test_simulate_command(tmp_path, capsys):
    out = tmp_path / "sub" / "sim.h5"
    assert main(["simulate", "--out", str(out), "--systems", "12", "--points", "7",
                 "--seed", "2"]) == 0
    ds = load_dataset(out)
    np.testing.assert_array_equal(ds.trajectories, simulate(12, 7, seed=2)[0])
    assert not list(out.parent.glob(".*tmp"))  # written atomically, nothing left behind


def test_save_dataset_reports_unwritable_path(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="cannot write"):
        save_dataset(tmp_path / "file" / "x.h5", GOOD, TIME)


def test_stats_command_compares_files(small, tmp_path, capsys):
    other = simulate_to(tmp_path / "other.h5", n_systems=5, n_points=9, seed=1)
    assert main(["stats", "--data", str(small), "--data", str(other), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert [s["path"] for s in stats] == [str(small), str(other)]
    traj = load_dataset(other).trajectories.astype(np.float64)
    got = stats[1]["variables"]["predator"]
    assert stats[1]["shape"] == [5, 9, 2]
    assert got["max"] == traj[..., 1].max() and got["mean"] == pytest.approx(traj[..., 1].mean())
    assert got["p99"] == pytest.approx(np.percentile(traj[..., 1], 99))
    assert main(["stats", "--data", str(small)]) == 0
    table = capsys.readouterr().out
    assert str(small) in table and "prey" in table and "predator" in table


# ----- splits -------------------------------------------------------------------------------------
def test_split_is_a_deterministic_partition_by_system(tmp_path):
    s = split_systems(1000, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (700, 150, 150)
    every = np.concatenate([s.train, s.val, s.test])
    assert sorted(every.tolist()) == list(range(1000))
    again, other = split_systems(1000, seed=0), split_systems(1000, seed=1)
    assert all(np.array_equal(getattr(s, k), getattr(again, k)) for k in ("train", "val", "test"))
    assert not np.array_equal(s.val, other.val)
    s.save(tmp_path / "split.json")
    loaded = Split.load(tmp_path / "split.json")
    assert loaded.seed == 0 and all(np.array_equal(getattr(s, k), getattr(loaded, k))
                                    for k in ("train", "val", "test"))


@pytest.mark.parametrize("n, fractions, fragment", [
    (100, (0.5, 0.5, 0.5), "summing to 1"), (100, (1.2, -0.1, -0.1), "non-negative"),
    (100, (0.5, 0.5), "3 non-negative"), (2, (0.7, 0.15, 0.15), "would be empty"),
])
def test_bad_split_requests(n, fractions, fragment):
    with pytest.raises(QwenliteError, match=fragment):
        split_systems(n, fractions=fractions)


def test_bad_split_files(tmp_path):
    with pytest.raises(DataError, match="disjoint"):
        Split.from_dict({"train": [0, 1], "val": [1], "test": [2]})
    with pytest.raises(DataError, match="malformed"):
        Split.from_dict({"train": [0, 1], "val": [2]})
    with pytest.raises(DataError, match="no split file"):
        Split.load(tmp_path / "none.json")


# ----- training windows ---------------------------------------------------------------------------
def test_windows_cover_each_series_and_never_cross_systems():
    seqs = [list(range(100, 110)), list(range(200, 207))]
    w = make_training_windows(seqs, 4, stride=4)
    assert w.loss_mask is None and w.input_ids.dtype == torch.long
    assert w.input_ids.tolist() == [[100, 101, 102, 103], [104, 105, 106, 107],
                                    [106, 107, 108, 109], [200, 201, 202, 203],
                                    [203, 204, 205, 206]]
    overlapping = make_training_windows(seqs, 4, stride=3).input_ids.tolist()
    assert overlapping[:3] == [[100, 101, 102, 103], [103, 104, 105, 106], [106, 107, 108, 109]]
    assert make_training_windows(seqs, 5).input_ids.tolist() == [
        list(range(100, 105)), list(range(105, 110)), list(range(200, 205)),
        list(range(202, 207))]


def test_windows_drop_or_pad_short_series():
    seqs = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    assert make_training_windows(seqs, 6).input_ids.tolist() == [[1, 2, 3, 4, 5, 6]]
    padded = make_training_windows(seqs, 6, pad_id=0)
    assert padded.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 0, 0]]
    assert padded.loss_mask.tolist() == [[True] * 6, [True] * 3 + [False] * 3]


@pytest.mark.parametrize("context, stride, fragment", [
    (11, None, "context length 11 is larger than every series .*10 tokens"),
    (0, None, ">= 1"), (4, 0, ">= 1"),
])
def test_bad_window_requests(context, stride, fragment):
    with pytest.raises(QwenliteError, match=fragment):
        make_training_windows([list(range(10)), [1, 2]], context, stride)


# ----- forecasting tasks --------------------------------------------------------------------------
def test_forecast_examples(small):
    traj = load_dataset(small).trajectories
    settings = LLMTimeSettings(alpha=0.3)
    examples = forecast_examples(traj, settings, context_steps=20, horizon=10, systems=[3, 7])
    assert [e.system for e in examples] == [3, 7]
    for e in examples:
        np.testing.assert_array_equal(e.context, traj[e.system, :20])
        np.testing.assert_array_equal(e.target, traj[e.system, 20:30])
        assert e.prompt == encode(e.context, settings) and e.prompt.endswith(";")
        assert decode(e.prompt, settings).n_steps == 20
    assert len(forecast_examples(traj, settings, 49, 1)) == len(traj)
    with pytest.raises(QwenliteError, match="fit in the 50 timesteps"):
        forecast_examples(traj, settings, 45, 6)
