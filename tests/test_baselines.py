"""Baselines: exact where they should be, a Lotka–Volterra fit that recovers known systems and
survives garbage, and the ODE baseline beating the naive ones on the real data."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REAL_DATA, requires_real_data
from scipy.integrate import solve_ivp

from qwenlite.errors import QwenliteError
from qwenlite.evaluation.baselines import (
    BASELINES,
    fit_lotka_volterra,
    linear,
    lotka_volterra,
    persistence,
)


def simulate(rates, initial, t):
    """(T, 2) ``dx/dt = a x - b x y - e x², dy/dt = d x y - g y - f y²``, solved accurately."""
    a, b, d, g, e, f = rates

    def rhs(_t, z):
        x, y = z
        return [x * (a - b * y - e * x), y * (d * x - g - f * y)]

    sol = solve_ivp(rhs, (t[0], t[-1]), initial, t_eval=t, method="DOP853", rtol=1e-11,
                    atol=1e-12)
    return sol.y.T


# ----- persistence and linear ---------------------------------------------------------------------
def test_registry():
    assert set(BASELINES) == {"persistence", "linear", "lv_ode"}
    ctx = 1.0 + np.abs(np.sin(np.arange(40.0)))[:, None] * np.array([1.0, 0.5])
    for fn in BASELINES.values():
        out = fn(ctx, 7, np.linspace(0.0, 10.0, 47))
        assert out.shape == (7, 2) and out.dtype == np.float64 and np.all(np.isfinite(out))
        assert fn(ctx, 0).shape == (0, 2)


def test_persistence_repeats_the_last_value():
    np.testing.assert_array_equal(persistence(np.full((10, 2), 3.5), 4), np.full((4, 2), 3.5))
    ctx = np.array([[1.0, 2.0], [3.0, np.nan]])
    np.testing.assert_array_equal(persistence(ctx, 2), [[3, 2], [3, 2]])  # last finite value
    assert persistence(np.arange(5.0), 3).shape == (3, 1)  # 1-D: one variable


def test_linear_is_exact_on_lines():
    t = np.sort(np.random.default_rng(0).uniform(0, 10, 30))  # unevenly spaced
    series = np.c_[2.0 + 0.5 * t, 7.0 - 0.1 * t]
    np.testing.assert_allclose(linear(series[:25], 5, t), series[25:], rtol=1e-12)
    steps = np.arange(30.0)
    series = np.c_[1.0 + 2.0 * steps, 100.0 - 3.0 * steps]
    np.testing.assert_allclose(linear(series[:20], 10), series[20:], rtol=1e-12)


def test_linear_uses_only_the_window_and_clips_populations():
    ctx = np.r_[np.full(10, 50.0), 5.0 - np.arange(5.0)][:, None]  # a fall over the last 5
    np.testing.assert_allclose(linear(ctx, 3)[:, 0], [0.0, 0.0, 0.0])  # 0, -1, -2 clipped
    np.testing.assert_allclose(linear(ctx, 3, clip=False)[:, 0], [0.0, -1.0, -2.0], atol=1e-12)
    signed = np.r_[-1.0, 5.0 - np.arange(5.0)][:, None]  # negative values: not a population
    np.testing.assert_allclose(linear(signed, 2, window=5)[:, 0], [0.0, -1.0], atol=1e-12)
    np.testing.assert_allclose(linear(ctx, 3, window=2)[:, 0], 0.0, atol=1e-12)
    with pytest.raises(QwenliteError):
        linear(ctx, 3, window=1)


def test_linear_falls_back_to_persistence_without_two_points():
    ctx = np.array([[np.nan, 1.0], [np.nan, 2.0], [4.0, 3.0]])
    np.testing.assert_allclose(linear(ctx, 2), [[4.0, 4.0], [4.0, 5.0]])


@pytest.mark.parametrize("fn", list(BASELINES.values()))
def test_argument_errors(fn):
    ctx = np.ones((10, 2))
    for kwargs in ({"horizon": -1}, {"horizon": 2.5}, {"horizon": 3, "time": np.arange(12.0)},
                   {"horizon": 2, "time": np.r_[np.arange(11.0), 5.0]}):
        with pytest.raises(QwenliteError):
            fn(ctx, **kwargs)
    with pytest.raises(QwenliteError):
        fn(np.ones((2, 3, 2)), 2)


# ----- the Lotka–Volterra fit ---------------------------------------------------------------------
SYSTEMS = [  # rates a, b, d, g, e, f; initial x, y; time span of 100 points
    ((0.5, 0.3, 0.2, 0.6, 0.0, 0.0), (1.5, 1.0), 30.0),    # classic: closed orbits
    ((0.2, 0.3, 0.1, 0.2, 0.01, 0.0), (1.0, 1.0), 200.0),  # the coursework's time axis, damped
    ((1.0, 0.5, 0.3, 0.8, 0.1, 0.1), (3.0, 0.5), 40.0),    # both crowding terms
]


@pytest.mark.parametrize("rates, initial, span", SYSTEMS)
def test_lv_fit_recovers_a_noiseless_system(rates, initial, span):
    t = np.linspace(0.0, span, 100)
    series = simulate(rates, initial, t)
    forecast = lotka_volterra(series[:80], 20, t)
    np.testing.assert_allclose(forecast, series[80:], rtol=1e-3, atol=1e-3 * series.max())
    fit = fit_lotka_volterra(series[:80], t[:80])
    np.testing.assert_allclose(fit.rates, rates, rtol=0.02, atol=2e-3)
    np.testing.assert_allclose(fit.initial, initial, rtol=0.01)
    assert fit.rms < 1e-3


def test_lv_fit_does_not_depend_on_the_time_unit():
    t = np.linspace(0.0, 30.0, 100)
    series = simulate(SYSTEMS[0][0], SYSTEMS[0][1], t)
    noisy = series * np.exp(0.05 * np.random.default_rng(0).normal(size=series.shape))
    a = lotka_volterra(noisy[:80], 20, t)
    b = lotka_volterra(noisy[:80], 20, 7.0 + 3.0 * t)  # shifted and stretched time
    np.testing.assert_allclose(a, b, rtol=1e-6)
    fit_a = fit_lotka_volterra(noisy[:80], t[:80])
    fit_b = fit_lotka_volterra(noisy[:80], 7.0 + 3.0 * t[:80])
    np.testing.assert_allclose(fit_a.rates, 3.0 * fit_b.rates, rtol=1e-6, atol=1e-12)


def test_lv_fit_beats_naive_baselines_on_noisy_data():
    t = np.linspace(0.0, 30.0, 100)
    series = simulate(SYSTEMS[0][0], SYSTEMS[0][1], t)
    noisy = series * np.exp(0.05 * np.random.default_rng(1).normal(size=series.shape))
    err = {name: np.mean(np.abs(fn(noisy[:80], 20, t) - series[80:]))
           for name, fn in BASELINES.items()}
    assert err["lv_ode"] < 0.25 * min(err["persistence"], err["linear"])


def test_lv_classic_model_option():
    t = np.linspace(0.0, 30.0, 100)
    series = simulate(SYSTEMS[0][0], SYSTEMS[0][1], t)
    fit = fit_lotka_volterra(series[:80], t[:80], crowding=False)
    assert fit.rates[4] == fit.rates[5] == 0.0
    np.testing.assert_allclose(fit.rates[:4], SYSTEMS[0][0][:4], rtol=0.02)
    np.testing.assert_allclose(fit.predict(t)[80:], series[80:], rtol=1e-3, atol=1e-3)
    with pytest.raises(QwenliteError):
        fit.predict(t - 1.0)  # before the context


RNG = np.random.default_rng(0)
GARBAGE = {
    "zeros": np.zeros((80, 2)),
    "constant": np.full((80, 2), 3.0),
    "extinct predator": np.c_[np.linspace(1, 2, 80), np.zeros(80)],
    "spike": np.r_[np.ones((40, 2)), [[1e6, 1e-9]], np.ones((39, 2))],
    "uniform noise": RNG.random((80, 2)),
    "wild log-normal": np.exp(RNG.normal(0.0, 5.0, (80, 2))),
    "negative": RNG.normal(size=(80, 2)),
    "nan holes": np.where(RNG.random((80, 2)) < 0.3, np.nan, 1.0 + RNG.random((80, 2))),
    "all nan": np.full((80, 2), np.nan),
    "inf": np.r_[np.ones((79, 2)), [[np.inf, 1.0]]],
    "too short": np.ones((3, 2)),
    "exponential": np.exp(np.c_[np.linspace(0, 20, 80), np.linspace(0, -20, 80)]),
    "huge": np.full((80, 2), 1e300),
    "step": np.r_[np.ones((40, 2)), 5.0 * np.ones((40, 2))],
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_lv_never_raises_or_returns_nan(name):
    ctx = GARBAGE[name]
    with np.errstate(all="raise"):  # no floating-point trouble leaks out either
        out = lotka_volterra(ctx, 20)
    assert out.shape == (20, 2) and np.all(np.isfinite(out)) and np.all(out >= 0)
    finite = ctx[np.isfinite(ctx)]
    if finite.size:
        assert out.max() <= 100 * np.abs(finite).max()


def test_lv_falls_back_to_persistence_when_unusable():
    for ctx in (GARBAGE["zeros"], GARBAGE["too short"], GARBAGE["extinct predator"]):
        np.testing.assert_array_equal(lotka_volterra(ctx, 5), persistence(ctx, 5))
    assert fit_lotka_volterra(GARBAGE["all nan"]) is None
    with pytest.raises(QwenliteError):
        lotka_volterra(np.ones((20, 3)), 5)


# ----- the real data ------------------------------------------------------------------------------
@requires_real_data
def test_lv_beats_naive_baselines_on_the_real_data():
    import h5py

    with h5py.File(REAL_DATA, "r") as f:
        series = f["trajectories"][:40].astype(np.float64)
        t = f["time"][:]
    err = {name: [] for name in BASELINES}
    for s in series:
        for name, fn in BASELINES.items():
            err[name].append(np.mean(np.abs(fn(s[:80], 20, t) - s[80:])))
    mae = {name: float(np.mean(v)) for name, v in err.items()}
    assert mae["lv_ode"] < 0.3 * mae["persistence"] < 0.3 * mae["linear"]
    assert np.median(err["lv_ode"]) < 0.1 * np.median(err["persistence"])
