"""Baseline forecasters for predator–prey series: persistence, linear extrapolation, a fitted ODE.

Every forecaster has the signature ``forecast(context, horizon, time=None) -> forecast``:

* ``context``: (k, V) observed values, oldest first (a 1-D (k,) array is one variable);
* ``horizon``: h, the number of steps to forecast;
* ``time``: (k + h,) time stamps of the context and of the forecast steps; ``None`` means
  equally spaced steps (0, 1, 2, ...);
* returns (h, V) float64, always finite.

:data:`BASELINES` maps names to forecasters. Malformed *arguments* (wrong rank, a negative
horizon, a time axis of the wrong length or not increasing) raise :class:`QwenliteError`; bad
*values* never do: non-finite entries are ignored and a fit that fails falls back to persistence.

The ODE baseline (:func:`lotka_volterra`) fits a generalised Lotka–Volterra system

    dx/dt = a x - b x y - e x²,        dy/dt = d x y - g y - f y²,

with all six rates non-negative (``e = f = 0`` is the classic model; ``e > 0`` is a prey
carrying capacity ``K = a / e``), plus the initial state
(:func:`~qwenlite.evaluation.lv_fit.fit_lotka_volterra`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qwenlite.errors import QwenliteError
from qwenlite.evaluation.lv_fit import RATE_NAMES, LVFit, fit_lotka_volterra

__all__ = ["BASELINES", "RATE_NAMES", "LVFit", "fit_lotka_volterra", "linear", "lotka_volterra",
           "persistence"]

Forecaster = Callable[..., np.ndarray]

# ----- argument handling --------------------------------------------------------------------------
def _prepare(context, horizon: int, time) -> tuple[np.ndarray, np.ndarray]:
    """Validate the arguments; return the context as (k, V) float64 and the time axis (k + h,)."""
    x = np.asarray(context, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise QwenliteError(f"a context must be a non-empty (k, V) array, got shape {x.shape}")
    if isinstance(horizon, bool) or int(horizon) != horizon or horizon < 0:
        raise QwenliteError(f"the horizon must be a non-negative integer, got {horizon!r}")
    n = x.shape[0] + int(horizon)
    if time is None:
        t = np.arange(n, dtype=np.float64)
    else:
        t = np.asarray(time, dtype=np.float64).ravel()
        if t.shape != (n,):
            raise QwenliteError(f"time must have k + horizon = {n} entries, got {t.size}")
        if not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
            raise QwenliteError("time must be finite and strictly increasing")
    return x, t


def _last_finite(x: np.ndarray) -> np.ndarray:
    """(V,) the last finite value of each column of (k, V) ``x`` (0 where there is none)."""
    ok = np.isfinite(x)
    last = np.where(ok.any(0), x.shape[0] - 1 - np.argmax(ok[::-1], axis=0), 0)
    return np.where(ok.any(0), x[last, np.arange(x.shape[1])], 0.0)


# ----- persistence and linear extrapolation -------------------------------------------------------
def persistence(context, horizon: int, time=None) -> np.ndarray:
    """Repeat the last observed value.

    Args:
        context: (k, V) observed values.
        horizon: h.
        time: ignored (accepted for the common signature).

    Returns:
        (h, V): the last finite value of each variable (0 if it has none) repeated h times.
    """
    x, _ = _prepare(context, horizon, time)
    return np.repeat(_last_finite(x)[None], int(horizon), axis=0)


def linear(context, horizon: int, time=None, *, window: int = 5, clip: bool = True) -> np.ndarray:
    """Extrapolate a least-squares straight line through the last ``window`` points.

    Five points (the default) average out some noise while still following the local trend of
    an oscillation whose period is 15-30 steps; longer windows lag behind turning points.

    Args:
        context: (k, V) observed values.
        horizon: h.
        time: (k + h,) time stamps (``None``: equally spaced).
        window: points fitted (the last ``min(window, k)``; non-finite ones are skipped).
        clip: clip the forecast at 0 for variables whose context is non-negative (populations).

    Returns:
        (h, V) forecast; persistence for a variable with fewer than two finite points.
    """
    if window < 2:
        raise QwenliteError(f"the linear baseline needs a window of at least 2, got {window}")
    x, t = _prepare(context, horizon, time)
    k = x.shape[0]
    out = np.repeat(_last_finite(x)[None], int(horizon), axis=0)
    tw, future = t[max(0, k - window):k], t[k:]
    for v in range(x.shape[1]):
        xw = x[max(0, k - window):, v]
        ok = np.isfinite(xw)
        if ok.sum() < 2:
            continue
        slope, intercept = np.polyfit(tw[ok] - tw[ok][-1], xw[ok], 1)
        out[:, v] = intercept + slope * (future - tw[ok][-1])
        finite = x[np.isfinite(x[:, v]), v]
        if clip and np.all(finite >= 0):
            out[:, v] = np.maximum(out[:, v], 0.0)
    return out


# ----- the Lotka–Volterra ODE (fitted by qwenlite.evaluation.lv_fit) -----------------------------
def lotka_volterra(context, horizon: int, time=None, *, crowding: bool = True) -> np.ndarray:
    """Forecast by integrating a Lotka–Volterra ODE fitted to the context.

    See :func:`fit_lotka_volterra`. Falls back to :func:`persistence` when the context is
    unusable (fewer than 5 finite rows, a variable with no positive values), when the fit
    fails, or when the fitted system blows up (a non-finite forecast, or one above 100 times
    the largest context value).

    Args:
        context: (k, 2) prey and predator.
        horizon: h.
        time: (k + h,) time stamps (``None``: equally spaced).
        crowding: fit the self-limitation terms (``False``: the classic model).

    Returns:
        (h, 2) forecast, finite and non-negative.
    """
    x, t = _prepare(context, horizon, time)
    if x.shape[1] != 2:
        raise QwenliteError(f"the Lotka–Volterra baseline needs 2 variables, got {x.shape[1]}")
    k, h = x.shape[0], int(horizon)
    if h == 0:
        return np.zeros((0, 2))
    try:
        fit = fit_lotka_volterra(x, t[:k], crowding=crowding)
    except (ValueError, ArithmeticError, np.linalg.LinAlgError):  # numerical trouble: fall back
        fit = None
    if fit is not None:
        pred = fit.predict(t[t >= fit.t0])[-h:]
        limit = 100.0 * np.nanmax(np.abs(x))
        if np.all(np.isfinite(pred)) and np.all(pred <= limit):
            return pred
    return persistence(x, h, t)


#: The baselines the evaluation scores, by name.
BASELINES: dict[str, Forecaster] = {
    "persistence": persistence,
    "linear": linear,
    "lv_ode": lotka_volterra,
}
