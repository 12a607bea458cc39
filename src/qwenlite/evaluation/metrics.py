"""Forecast metrics: point errors, scale-free errors, errors by horizon, bootstrap intervals, CRPS.

Shapes: ``S`` systems, ``h`` forecast steps, ``V`` variables, ``k`` context steps, ``n`` samples.

Everything is NaN-safe: non-finite errors are left out of every mean (and counted), undefined
values (a mean over nothing, a ratio to a zero scale) are NaN in arrays and ``None`` in the
dictionaries, which hold only Python ``float``/``int``/``list``/``None`` and so go to JSON as
they are (``json.dumps(..., allow_nan=False)`` works).

Failed forecasts are not dropped: :func:`pad_forecast` fills the steps a model did not produce
and reports how many, so failures are scored (and penalised) like any other forecast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from qwenlite.errors import QwenliteError


# ----- helpers ------------------------------------------------------------------------------------
def _array(a, ndim: int, name: str) -> np.ndarray:
    x = np.asarray(a, dtype=np.float64)
    if x.ndim != ndim:
        raise QwenliteError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    return x


def _nanmean(a: np.ndarray, axis=None) -> np.ndarray:
    """Mean of the finite entries (NaN where there are none), without warnings."""
    ok = np.isfinite(a)
    total = np.where(ok, a, 0.0).sum(axis=axis)
    count = ok.sum(axis=axis)
    return np.divide(total, count, out=np.full(np.shape(total), np.nan), where=count > 0)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` where ``den`` is finite and > 0, else NaN."""
    ok = np.isfinite(den) & (den > 0)
    return np.divide(num, den, out=np.full(np.shape(num), np.nan), where=ok)


def _py(x):
    """Arrays and numpy scalars as (nested lists of) Python floats; non-finite as ``None``."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        return float(a) if np.isfinite(a) else None
    return [_py(v) for v in a]


# ----- point metrics ------------------------------------------------------------------------------
def point_metrics(pred, truth, context=None) -> dict:
    """Point-forecast errors overall, per variable and per system.

    * ``mse``, ``mae``: mean squared / absolute error.
    * ``mase`` (needs ``context``): MAE divided by the in-sample MAE of the one-step naive
      forecast on the context, ``mean_t |c[t] - c[t-1]|``, per system and variable; undefined
      (``None``/NaN, left out of means) where that scale is 0 (a constant context).
    * ``nmae`` (needs ``context``): MAE divided by the mean ``|c|`` of the context, per system
      and variable; undefined where that is 0.

    Overall and per-variable MSE/MAE average all finite errors; MASE and nMAE average the ratios
    of the (system, variable) pairs. Per-system values average over steps and variables.

    Args:
        pred: (S, h, V) forecasts.
        truth: (S, h, V) true values.
        context: (S, k, V) the contexts the forecasts were made from, or ``None``.

    Returns:
        ``{"overall": {metric: float}, "per_variable": {metric: [V floats]},
        "per_system": {metric: [S floats]}, "n_systems": S, "horizon": h,
        "n_nonfinite": errors left out}``; undefined values are ``None``.

    Raises:
        QwenliteError: shapes that do not match.
    """
    p, y = _array(pred, 3, "pred"), _array(truth, 3, "truth")
    if p.shape != y.shape:
        raise QwenliteError(f"pred {p.shape} and truth {y.shape} differ in shape")
    err = p - y
    sq, ab = err ** 2, np.abs(err)
    out = {
        "overall": {"mse": _nanmean(sq), "mae": _nanmean(ab)},
        "per_variable": {"mse": _nanmean(sq, axis=(0, 1)), "mae": _nanmean(ab, axis=(0, 1))},
        "per_system": {"mse": _nanmean(sq, axis=(1, 2)), "mae": _nanmean(ab, axis=(1, 2))},
    }
    if context is not None:
        c = _array(context, 3, "context")
        if c.shape[0] != p.shape[0] or c.shape[2] != p.shape[2]:
            raise QwenliteError(f"context {c.shape} does not match the forecasts {p.shape}")
        mae_sv = _nanmean(ab, axis=1)  # (S, V)
        naive = _nanmean(np.abs(np.diff(c, axis=1)), axis=1)  # NaN for k = 1
        for name, scale in (("mase", naive), ("nmae", _nanmean(np.abs(c), axis=1))):
            ratio = _ratio(mae_sv, scale)
            out["overall"][name] = _nanmean(ratio)
            out["per_variable"][name] = _nanmean(ratio, axis=0)
            out["per_system"][name] = _nanmean(ratio, axis=1)
    result = {group: {m: _py(v) for m, v in values.items()} for group, values in out.items()}
    result.update(n_systems=int(p.shape[0]), horizon=int(p.shape[1]),
                  n_nonfinite=int((~np.isfinite(err)).sum()))
    return result


class HorizonErrors(NamedTuple):
    """Errors per forecast step (NaN where a step has no finite error).

    Attributes:
        mae: (h,) MAE over systems and variables.
        mse: (h,) MSE over systems and variables.
        mae_per_variable: (h, V).
        mse_per_variable: (h, V).
    """

    mae: np.ndarray
    mse: np.ndarray
    mae_per_variable: np.ndarray
    mse_per_variable: np.ndarray


def error_by_horizon(pred, truth) -> HorizonErrors:
    """MAE and MSE as functions of the forecast step.

    Args:
        pred: (S, h, V) forecasts.
        truth: (S, h, V) true values.

    Returns:
        :class:`HorizonErrors` (a tuple: ``mae, mse = error_by_horizon(p, t)[:2]``).
    """
    p, y = _array(pred, 3, "pred"), _array(truth, 3, "truth")
    if p.shape != y.shape:
        raise QwenliteError(f"pred {p.shape} and truth {y.shape} differ in shape")
    err = p - y
    return HorizonErrors(_nanmean(np.abs(err), axis=(0, 2)), _nanmean(err ** 2, axis=(0, 2)),
                         _nanmean(np.abs(err), axis=0), _nanmean(err ** 2, axis=0))


# ----- uncertainty over systems -------------------------------------------------------------------
def bootstrap_ci(values, stat: Callable = np.mean, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Percentile-bootstrap confidence interval of a statistic over systems.

    Non-finite values are dropped first.

    Args:
        values: (S,) one value per system.
        stat: statistic of a 1-D array; called as ``stat(a, axis=1)`` on (n_boot, S)
            resamples when it accepts ``axis`` (``np.mean``, ``np.median`` do), else per resample.
        n_boot: resamples.
        seed: seed of the resampling (the same seed gives the same interval).
        level: coverage of the interval, in (0, 1).

    Returns:
        ``(point, lo, hi)`` as floats: the statistic of the values and the interval; all NaN
        when no value is finite, all equal to the value when there is one.
    """
    if not 0 < level < 1:
        raise QwenliteError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise QwenliteError(f"n_boot must be positive, got {n_boot}")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    point = float(stat(v))
    if v.size == 1:
        return point, point, point
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    rows = max(1, 2_000_000 // v.size)  # bound the memory of a chunk of resamples
    for start in range(0, n_boot, rows):
        sample = v[rng.integers(0, v.size, size=(min(rows, n_boot - start), v.size))]
        try:
            stats[start:start + len(sample)] = stat(sample, axis=1)
        except TypeError:
            stats[start:start + len(sample)] = [stat(s) for s in sample]
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return point, float(lo), float(hi)


def summarize(per_system_values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean and median over systems with bootstrap intervals (see :func:`bootstrap_ci`).

    Args:
        per_system_values: (S,) values; ``None`` and non-finite entries are left out.
        n_boot, seed, level: as in :func:`bootstrap_ci`.

    Returns:
        ``{"mean", "mean_ci": [lo, hi], "median", "median_ci": [lo, hi], "n", "n_nonfinite"}``
        with ``None`` for what is undefined.
    """
    v = np.asarray(per_system_values, dtype=np.float64).ravel()
    mean, mlo, mhi = bootstrap_ci(v, np.mean, n_boot, seed, level)
    med, dlo, dhi = bootstrap_ci(v, np.median, n_boot, seed, level)
    n = int(np.isfinite(v).sum())
    return {"mean": _py(mean), "mean_ci": [_py(mlo), _py(mhi)], "median": _py(med),
            "median_ci": [_py(dlo), _py(dhi)], "n": n, "n_nonfinite": int(v.size - n)}



def paired_difference(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """How two forecasters differ on the same systems: ``a - b`` per system, its mean with a
    bootstrap interval over systems (resampled in pairs, so what the systems share cancels),
    and on how many systems ``a`` is lower and on how many the two are equal.

    Args:
        a, b: (S,) one value per system for each forecaster (e.g. per-system MAE), same order.
        n_boot, seed, level: as in :func:`bootstrap_ci`.

    Returns:
        ``{"mean", "ci": [lo, hi], "lower": systems where a < b, "ties": where a == b,
        "n": systems compared}``;
        systems where either value is not finite are left out.

    Raises:
        QwenliteError: ``a`` and ``b`` of different lengths.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise QwenliteError(f"paired values differ in length: {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    mean, lo, hi = bootstrap_ci(x - y, np.mean, n_boot, seed, level)
    return {"mean": _py(mean), "ci": [_py(lo), _py(hi)], "lower": int((x < y).sum()),
            "ties": int((x == y).sum()), "n": int(keep.sum())}

# ----- probabilistic forecasts --------------------------------------------------------------------
def crps_from_samples(samples, truth, reduce: bool = True) -> np.ndarray:
    """Continuous ranked probability score of sampled forecasts.

    The empirical distribution of the samples is scored in the energy form
    ``E|X - y| - 0.5 E|X - X'|``, with the pair term from the sorted samples in
    O(n log n): ``sum_ij |x_i - x_j| = 2 sum_i (2i - n - 1) x_(i)``. One sample gives the
    absolute error. Non-finite samples are left out per element (NaN if none is left).

    Args:
        samples: (n, S, h, V) forecasts.
        truth: (S, h, V) true values.
        reduce: average over steps and variables (finite entries).

    Returns:
        (S,) per-system CRPS if ``reduce``, else (S, h, V) per element; lower is better, in
        the units of the data.
    """
    x = _array(samples, 4, "samples")
    y = _array(truth, 3, "truth")
    if x.shape[1:] != y.shape:
        raise QwenliteError(f"samples {x.shape} do not match truth {y.shape}")
    ok = np.isfinite(x)
    m = ok.sum(axis=0)                               # (S, h, V) usable samples
    xs = np.sort(np.where(ok, x, np.inf), axis=0)    # the usable ones first
    rank = np.arange(1, x.shape[0] + 1).reshape(-1, 1, 1, 1)
    weight = np.where(rank <= m, 2 * rank - m - 1, 0)
    pair = np.sum(weight * np.where(rank <= m, xs, 0.0), axis=0)   # sum_i (2i - m - 1) x_(i)
    first = np.sum(np.where(ok, np.abs(x - y), 0.0), axis=0)
    mm = np.maximum(m, 1)
    crps = np.where(m > 0, first / mm - pair / mm ** 2, np.nan)
    crps = np.where(np.isfinite(y), crps, np.nan)
    return _nanmean(crps, axis=(1, 2)) if reduce else crps


# ----- failed forecasts ---------------------------------------------------------------------------
def pad_forecast(values, horizon: int, context) -> tuple[np.ndarray, int]:
    """Fill a forecast that came back short (or with unusable entries) to ``horizon`` steps.

    Rule: the first ``horizon`` rows of ``values`` are kept; an entry that is not finite takes
    the previous step's value of its variable; steps after the last row repeat the last kept
    step. Where no step is usable, the last finite context value is used. In effect a model
    that stops early is continued by persistence: penalised against the truth (a fixed,
    honest default, not a guess of the truth), yet scored like every other forecast. A step
    counts as missing if any of its entries was filled.

    Args:
        values: (t', V) parsed forecast in original units (t' may be 0 or exceed ``horizon``;
            ``None`` is no forecast).
        horizon: h.
        context: (k, V) the context the forecast continues.

    Returns:
        ``(forecast, n_missing)``: (h, V) float64, finite wherever the context has a finite
        value of the variable; and the number of steps (0..h) that were filled.

    Raises:
        QwenliteError: ``values`` and ``context`` disagree on V, or a negative horizon.
    """
    c = np.asarray(context, dtype=np.float64)
    if c.ndim == 1:
        c = c[:, None]
    if c.ndim != 2:
        raise QwenliteError(f"context must be (k, V), got shape {c.shape}")
    n_vars = c.shape[1]
    if isinstance(horizon, bool) or int(horizon) != horizon or horizon < 0:
        raise QwenliteError(f"the horizon must be a non-negative integer, got {horizon!r}")
    h = int(horizon)
    v = np.zeros((0, n_vars)) if values is None else np.asarray(values, dtype=np.float64)
    if v.size == 0:
        v = v.reshape(0, n_vars)
    if v.ndim == 1 and n_vars == 1:
        v = v[:, None]
    if v.ndim != 2 or v.shape[1] != n_vars:
        raise QwenliteError(f"a forecast of shape {v.shape} does not match {n_vars} variables")
    v = v[:h]
    out = np.empty((h, n_vars))
    ok = np.isfinite(c)
    last = np.array([c[ok[:, j], j][-1] if ok[:, j].any() else np.nan for j in range(n_vars)])
    missing = 0
    for i in range(h):
        row = v[i] if i < len(v) else np.full(n_vars, np.nan)
        good = np.isfinite(row)
        missing += int(not good.all())
        last = np.where(good, row, last)
        out[i] = last
    return out, missing
