"""Metrics: hand-computed values, NaN safety, JSON output, bootstrap intervals, CRPS, padding."""

from __future__ import annotations

import json
from itertools import product

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qwenlite.errors import QwenliteError
from qwenlite.evaluation.metrics import (
    bootstrap_ci,
    crps_from_samples,
    error_by_horizon,
    pad_forecast,
    paired_difference,
    point_metrics,
    summarize,
)

# Two systems, two steps, two variables; the forecast is 0 so the errors are -truth.
TRUTH = np.array([[[1.0, 2.0], [3.0, 4.0]],
                  [[0.0, 0.0], [2.0, -2.0]]])
PRED = np.zeros_like(TRUTH)
CONTEXT = np.array([[[0.0, 5.0], [1.0, 5.0], [3.0, 5.0]],     # naive scales 1.5 and 0
                    [[1.0, 2.0], [1.0, 0.0], [2.0, 2.0]]])    # naive scales 0.5 and 2


def test_point_metrics_by_hand():
    m = point_metrics(PRED, TRUTH, CONTEXT)
    assert m["overall"]["mae"] == pytest.approx(7 / 4)
    assert m["overall"]["mse"] == pytest.approx(19 / 4)
    assert m["per_variable"]["mae"] == pytest.approx([1.5, 2.0])
    assert m["per_variable"]["mse"] == pytest.approx([3.5, 6.0])
    assert m["per_system"]["mae"] == pytest.approx([2.5, 1.0])
    assert m["per_system"]["mse"] == pytest.approx([7.5, 2.0])
    # MAE per (system, variable): 2, 3 / 1, 1. MASE: 2/1.5, undefined (constant) / 1/0.5, 1/2.
    assert m["overall"]["mase"] == pytest.approx((4 / 3 + 2 + 0.5) / 3)
    assert m["per_variable"]["mase"] == pytest.approx([(4 / 3 + 2) / 2, 0.5])
    assert m["per_system"]["mase"] == pytest.approx([4 / 3, 1.25])
    # nMAE: mean |context| 4/3, 5 / 4/3, 4/3.
    assert m["per_system"]["nmae"] == pytest.approx([(1.5 + 0.6) / 2, 0.75])
    assert m["overall"]["nmae"] == pytest.approx((1.5 + 0.6 + 0.75 + 0.75) / 4)
    assert (m["n_systems"], m["horizon"], m["n_nonfinite"]) == (2, 2, 0)


def test_point_metrics_without_context_and_undefined_scales():
    m = point_metrics(PRED, TRUTH)
    assert set(m["overall"]) == {"mse", "mae"}
    flat = np.ones((1, 3, 2))
    m = point_metrics(flat, flat + 1, flat)  # a constant context has no naive scale
    assert m["overall"]["mase"] is None and m["per_system"]["mase"] == [None]
    assert m["overall"]["nmae"] == pytest.approx(1.0)


def test_point_metrics_are_nan_safe_and_json():
    pred = PRED.copy()
    pred[0, 1, 1] = np.nan
    m = point_metrics(pred, TRUTH, CONTEXT)
    assert m["n_nonfinite"] == 1
    assert m["overall"]["mae"] == pytest.approx(10 / 7)  # the NaN error (4) is left out
    assert m["per_system"]["mae"] == pytest.approx([2.0, 1.0])
    text = json.dumps(m, allow_nan=False)
    assert json.loads(text) == m
    for group in ("overall", "per_variable", "per_system"):
        for v in m[group].values():
            assert all(x is None or type(x) is float for x in np.ravel(np.asarray(v, object)))


def test_shape_errors():
    with pytest.raises(QwenliteError):
        point_metrics(PRED, TRUTH[:1])
    with pytest.raises(QwenliteError):
        point_metrics(PRED[0], TRUTH[0])
    with pytest.raises(QwenliteError):
        point_metrics(PRED, TRUTH, CONTEXT[:1])
    with pytest.raises(QwenliteError):
        error_by_horizon(PRED, TRUTH[:, :1])


def test_error_by_horizon_by_hand():
    mae, mse, mae_v, mse_v = error_by_horizon(PRED, TRUTH)
    np.testing.assert_allclose(mae, [3 / 4, 11 / 4])
    np.testing.assert_allclose(mse, [5 / 4, 33 / 4])
    np.testing.assert_allclose(mae_v, [[0.5, 1.0], [2.5, 3.0]])
    np.testing.assert_allclose(mse_v, [[0.5, 2.0], [6.5, 10.0]])
    first_two = error_by_horizon(PRED, TRUTH)[:2]  # how the evaluator takes them
    assert len(first_two) == 2 and first_two[0].shape == (2,)


def test_metrics_agree_with_a_direct_computation():
    rng = np.random.default_rng(1)
    pred, truth, ctx = rng.normal(size=(5, 7, 2)), rng.normal(size=(5, 7, 2)), rng.normal(
        size=(5, 9, 2))
    m = point_metrics(pred, truth, ctx)
    assert m["overall"]["mse"] == pytest.approx(np.mean((pred - truth) ** 2))
    assert np.mean(error_by_horizon(pred, truth).mae) == pytest.approx(m["overall"]["mae"])
    mase = np.empty((5, 2))
    for s, v in product(range(5), range(2)):
        scale = np.mean(np.abs(ctx[s, 1:, v] - ctx[s, :-1, v]))
        mase[s, v] = np.mean(np.abs(pred[s, :, v] - truth[s, :, v])) / scale
    assert m["per_variable"]["mase"] == pytest.approx(list(mase.mean(0)))
    assert m["per_system"]["mase"] == pytest.approx(list(mase.mean(1)))
    assert m["overall"]["mase"] == pytest.approx(mase.mean())


# ----- bootstrap ----------------------------------------------------------------------------------
def test_bootstrap_contains_the_statistic_and_narrows():
    rng = np.random.default_rng(0)
    small, large = rng.exponential(size=20), rng.exponential(size=2000)
    for values in (small, large):
        for stat in (np.mean, np.median):
            point, lo, hi = bootstrap_ci(values, stat)
            assert point == pytest.approx(stat(values))
            assert lo <= point <= hi
    _, lo_s, hi_s = bootstrap_ci(small)
    _, lo_l, hi_l = bootstrap_ci(large)
    assert hi_l - lo_l < 0.5 * (hi_s - lo_s)
    # covers the true mean (1) at roughly the nominal rate
    hits = [lo <= 1.0 <= hi for lo, hi in
            (bootstrap_ci(rng.exponential(size=60), seed=i, n_boot=500)[1:] for i in range(100))]
    assert 0.85 <= np.mean(hits) <= 1.0


def test_bootstrap_is_deterministic_and_level_widens():
    v = np.random.default_rng(3).normal(size=50)
    assert bootstrap_ci(v, seed=7) == bootstrap_ci(v, seed=7)
    _, lo90, hi90 = bootstrap_ci(v, level=0.9)
    _, lo99, hi99 = bootstrap_ci(v, level=0.99)
    assert lo99 < lo90 and hi90 < hi99
    _, lo, hi = bootstrap_ci(v, stat=lambda a: float(np.percentile(a, 75)), n_boot=200)
    assert lo <= np.percentile(v, 75) <= hi  # statistics without an axis argument work too


def test_bootstrap_edge_cases():
    assert all(np.isnan(bootstrap_ci([])))
    assert all(np.isnan(bootstrap_ci([np.nan, np.inf])))
    assert bootstrap_ci([np.nan, 2.0]) == (2.0, 2.0, 2.0)
    with pytest.raises(QwenliteError):
        bootstrap_ci([1.0, 2.0], level=1.5)


def test_summarize():
    v = np.r_[np.arange(10.0), np.nan]
    s = summarize(v)
    assert s["mean"] == pytest.approx(4.5) and s["median"] == pytest.approx(4.5)
    assert s["mean_ci"][0] <= 4.5 <= s["mean_ci"][1]
    assert s["median_ci"][0] <= 4.5 <= s["median_ci"][1]
    assert (s["n"], s["n_nonfinite"]) == (10, 1)
    assert json.loads(json.dumps(s, allow_nan=False)) == s
    empty = summarize([None, None])
    assert empty["mean"] is None and empty["median_ci"] == [None, None] and empty["n"] == 0
    per_system = point_metrics(PRED, TRUTH, CONTEXT)["per_system"]
    assert summarize(np.asarray(per_system["mae"]))["mean"] == pytest.approx(1.75)


# ----- CRPS ---------------------------------------------------------------------------------------
def crps_brute(samples: np.ndarray, y: float) -> float:
    x = samples[np.isfinite(samples)]
    return np.mean(np.abs(x - y)) - 0.5 * np.mean(np.abs(x[:, None] - x[None, :]))


def test_crps_single_sample_is_the_absolute_error():
    rng = np.random.default_rng(0)
    pred, truth = rng.normal(size=(4, 5, 2)), rng.normal(size=(4, 5, 2))
    np.testing.assert_allclose(crps_from_samples(pred[None], truth, reduce=False),
                               np.abs(pred - truth))
    np.testing.assert_allclose(crps_from_samples(pred[None], truth),
                               point_metrics(pred, truth)["per_system"]["mae"])


def test_crps_small_example_by_hand():
    # samples {0, 1}, truth 0: E|X - y| = 1/2, E|X - X'| = 2/4.
    assert crps_from_samples(np.array([0.0, 1.0]).reshape(2, 1, 1, 1),
                             np.zeros((1, 1, 1)))[0] == pytest.approx(0.25)


def test_crps_matches_brute_force_with_ties_and_nans():
    rng = np.random.default_rng(2)
    samples = np.round(rng.normal(size=(9, 3, 4, 2)), 1)  # ties
    samples[rng.random(samples.shape) < 0.2] = np.nan
    samples[:, 0, 0, 0] = np.nan  # no usable sample at all
    truth = rng.normal(size=(3, 4, 2))
    got = crps_from_samples(samples, truth, reduce=False)
    for s, i, v in product(range(3), range(4), range(2)):
        if (s, i, v) == (0, 0, 0):
            assert np.isnan(got[s, i, v])
        else:
            assert got[s, i, v] == pytest.approx(crps_brute(samples[:, s, i, v], truth[s, i, v]))
    per_system = crps_from_samples(samples, truth)
    assert per_system.shape == (3,) and np.all(np.isfinite(per_system))
    assert per_system[1] == pytest.approx(np.mean(got[1]))


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, (6, 1, 3, 1), elements=st.floats(-1e3, 1e3)),
       arrays(np.float64, (1, 3, 1), elements=st.floats(-1e3, 1e3)))
def test_crps_properties(samples, truth):
    got = crps_from_samples(samples, truth, reduce=False)
    assert np.all(got >= -1e-9)
    assert np.all(got <= np.mean(np.abs(samples - truth), axis=0) + 1e-9)
    for i in range(3):
        assert got[0, i, 0] == pytest.approx(crps_brute(samples[:, 0, i, 0], truth[0, i, 0]),
                                             abs=1e-9)


def test_crps_shape_errors():
    with pytest.raises(QwenliteError):
        crps_from_samples(np.zeros((2, 3, 4)), np.zeros((3, 4)))
    with pytest.raises(QwenliteError):
        crps_from_samples(np.zeros((2, 3, 4, 2)), np.zeros((3, 5, 2)))


# ----- padding failed forecasts -------------------------------------------------------------------
CTX = np.array([[1.0, 2.0], [3.0, 4.0]])


def test_pad_complete_forecast_is_unchanged():
    values = np.arange(6.0).reshape(3, 2)
    out, missing = pad_forecast(values, 3, CTX)
    np.testing.assert_array_equal(out, values)
    assert missing == 0
    out, missing = pad_forecast(np.arange(10.0).reshape(5, 2), 3, CTX)  # too long: truncated
    np.testing.assert_array_equal(out, values)
    assert missing == 0


def test_pad_short_forecast_repeats_its_last_step():
    out, missing = pad_forecast(np.array([[5.0, 6.0]]), 3, CTX)
    np.testing.assert_array_equal(out, [[5, 6], [5, 6], [5, 6]])
    assert missing == 2


def test_pad_empty_forecast_uses_the_context():
    for empty in (np.zeros((0, 2)), np.zeros(0), None):
        out, missing = pad_forecast(empty, 2, CTX)
        np.testing.assert_array_equal(out, [[3, 4], [3, 4]])
        assert missing == 2
    out, missing = pad_forecast(None, 2, np.array([[1.0, 2.0], [np.nan, 4.0]]))
    np.testing.assert_array_equal(out, [[1, 4], [1, 4]])  # last *finite* context value


def test_pad_non_finite_entries_carry_forward():
    values = np.array([[np.nan, 6.0], [7.0, np.inf], [8.0, 9.0]])
    out, missing = pad_forecast(values, 4, CTX)
    np.testing.assert_array_equal(out, [[3, 6], [7, 6], [8, 9], [8, 9]])
    assert missing == 3
    assert pad_forecast(values, 0, CTX)[0].shape == (0, 2)


def test_pad_errors():
    with pytest.raises(QwenliteError):
        pad_forecast(np.zeros((2, 3)), 2, CTX)
    with pytest.raises(QwenliteError):
        pad_forecast(np.zeros((2, 2)), -1, CTX)


def test_paired_difference_cancels_what_the_systems_share():
    """Systems of very different difficulty, one forecaster 0.1 better on each: the paired
    interval is tight around -0.1 (an unpaired one would span the spread between systems)."""
    rng = np.random.default_rng(0)
    hard = rng.lognormal(0.0, 1.5, size=40)
    d = paired_difference(hard - 0.1, hard)
    assert d["mean"] == pytest.approx(-0.1)
    assert d["ci"] == pytest.approx([-0.1, -0.1])
    assert (d["lower"], d["ties"], d["n"]) == (40, 0, 40)
    _, lo, hi = bootstrap_ci(hard - 0.1)
    assert hi - lo > 0.5  # what the unpaired interval of one forecaster spans


def test_paired_difference_counts_ties_drops_nonfinite_and_checks_lengths():
    a = np.array([1.0, 2.0, 3.0, np.nan, 5.0])
    b = np.array([1.0, 3.0, 1.0, 1.0, np.inf])
    d = paired_difference(a, b)
    assert (d["lower"], d["ties"], d["n"]) == (1, 1, 3)
    assert d["mean"] == pytest.approx((0 - 1 + 2) / 3)
    assert d["ci"][0] <= d["mean"] <= d["ci"][1]
    noisy = paired_difference([0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0])
    assert noisy["ci"][0] < 0 < noisy["ci"][1]  # as often better as worse: 0 inside
    with pytest.raises(QwenliteError, match="differ in length"):
        paired_difference([1.0, 2.0], [1.0])
