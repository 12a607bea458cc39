"""Predator-prey datasets: loading with validation, the simulated default, summary statistics.

A dataset is an HDF5 file with ``/trajectories`` (N, T, 2) (``[..., 0]`` prey, ``[..., 1]``
predator, non-negative) and ``/time`` (T,) (strictly increasing), the layout of the coursework's
``lotka_volterra_data.h5``.

Commands (:mod:`qwenlite.data.cli`)::

    python -m qwenlite.data simulate --out PATH [--systems 1000 --points 100 --seed 0]
    python -m qwenlite.data stats [--data PATH ...]

With no ``--data``, commands use the simulated default dataset, generated on first use and cached
as ``$QWENLITE_CACHE/lotka_volterra_simulated.h5`` (default cache ``~/.cache/qwenlite``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwenlite.errors import DataError, QwenliteError
from qwenlite.io import atomic_path, cache_dir

DEFAULT_FILENAME = "lotka_volterra_simulated.h5"
VARIABLES = ("prey", "predator")

# The simulator. Its version is stored in the file; a cached default of another version is
# regenerated. Ranges were chosen so that the summary statistics (means, medians, 99th
# percentiles, oscillation periods of 30-60 time units) resemble the coursework's dataset:
#   dx/dt = a x (1 - x / K) - b x y,   dy/dt = d x y - c y
SIMULATOR_VERSION = 1
PARAMETER_RANGES = {  # uniform
    "prey_growth": (0.05, 0.25),      # a
    "predation": (0.15, 0.40),        # b
    "predator_death": (0.08, 0.30),   # c
    "conversion": (0.05, 0.20),       # d
}
CARRYING_CAPACITY_RANGE = (10.0, 100.0)  # K, log-uniform: damps the oscillations a little
INITIAL_RANGE = (0.8, 1.2)  # x(0), y(0), uniform


# ----- loading ------------------------------------------------------------------------------------
@dataclass
class LVDataset:
    """A loaded, validated dataset.

    Attributes:
        trajectories: (N, T, 2) float32, prey then predator.
        time: (T,) float64.
        path: the file it was read from.
    """

    trajectories: np.ndarray
    time: np.ndarray
    path: Path

    @property
    def n_systems(self) -> int:
        return self.trajectories.shape[0]

    @property
    def n_steps(self) -> int:
        return self.trajectories.shape[1]


def _read_array(f, key: str, path: Path) -> np.ndarray:
    import h5py

    if key not in f:
        raise DataError(f"{path} has no /{key} dataset (expected /trajectories (N, T, 2) and "
                        "/time (T,))")
    node = f[key]
    if not isinstance(node, h5py.Dataset):
        raise DataError(f"{path}: /{key} is a {type(node).__name__}, not a dataset")
    if node.dtype.kind not in "iuf":
        raise DataError(f"{path}: /{key} has dtype {node.dtype}, expected real numbers")
    return node[()]


def load_dataset(path: str | Path) -> LVDataset:
    """Read and validate ``/trajectories`` and ``/time`` from an HDF5 file.

    Args:
        path: the HDF5 file.

    Returns:
        The dataset, trajectories as float32 (N, T, 2) and time as float64 (T,).

    Raises:
        DataError: one line naming the problem: no such file, not readable as HDF5 (e.g.
            truncated), a missing dataset, a wrong dtype, rank or shape, a length mismatch,
            non-finite or negative values, or a time axis that is not strictly increasing. An
            empty file and an unreadable one are told apart.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no dataset file at {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty, not an HDF5 dataset")
    try:
        with h5py.File(path, "r") as f:
            traj = _read_array(f, "trajectories", path)
            time = _read_array(f, "time", path)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError, KeyError, RuntimeError...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read {path} as HDF5 (corrupt or truncated?): {reason}") from None

    if traj.ndim != 3 or traj.shape[2] != 2 or traj.shape[0] == 0 or traj.shape[1] == 0:
        raise DataError(f"{path}: /trajectories has shape {traj.shape}, expected (N, T, 2) with "
                        "N, T >= 1 (prey, predator)")
    if time.ndim != 1:
        raise DataError(f"{path}: /time has shape {time.shape}, expected (T,)")
    if len(time) != traj.shape[1]:
        raise DataError(f"{path}: /time has {len(time)} points but /trajectories has "
                        f"{traj.shape[1]} timesteps")
    for bad, what in ((~np.isfinite(traj), "non-finite (NaN or inf)"),
                      (np.isfinite(traj) & (traj < 0), "negative")):
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise DataError(f"{path}: /trajectories has {int(bad.sum())} {what} values, the "
                            f"first at system {first[0]}, step {first[1]}, variable {first[2]} "
                            f"({traj[first]}); populations must be finite and >= 0")
    if not np.isfinite(time).all():
        raise DataError(f"{path}: /time has non-finite values")
    if len(time) > 1 and not (np.diff(time) > 0).all():
        raise DataError(f"{path}: /time is not strictly increasing")
    return LVDataset(trajectories=traj.astype(np.float32), time=time.astype(np.float64),
                     path=path)


# ----- the simulated default ----------------------------------------------------------------------
def simulate(n_systems: int = 1000, n_points: int = 100, seed: int = 0, t_max: float = 200.0,
             progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integrate Lotka-Volterra systems with random parameters and initial conditions.

    Each system follows ``dx/dt = a x (1 - x/K) - b x y``, ``dy/dt = d x y - c y`` with parameters
    drawn from :data:`PARAMETER_RANGES` and :data:`CARRYING_CAPACITY_RANGE` and ``x(0), y(0)``
    from :data:`INITIAL_RANGE`. The equations are integrated in log space (positive by
    construction) with RK45, many systems per call as one vector ODE.

    Args:
        n_systems: N.
        n_points: T, equally spaced from 0 to ``t_max``.
        seed: everything drawn is a function of the seed alone.
        t_max: the last time point.
        progress: show a progress bar.

    Returns:
        ``(trajectories, time, parameters)``: (N, T, 2) float32, (T,) float64, and (N, 5) float64
        columns ``a, b, c, d, K``.
    """
    from scipy.integrate import solve_ivp
    from tqdm import tqdm

    if n_systems < 1 or n_points < 1 or not t_max > 0:
        raise QwenliteError("simulate needs at least one system, one point and t_max > 0")
    rng = np.random.default_rng(seed)
    params = np.stack([rng.uniform(lo, hi, n_systems) for lo, hi in PARAMETER_RANGES.values()]
                      + [np.exp(rng.uniform(*np.log(CARRYING_CAPACITY_RANGE), n_systems))], 1)
    start = rng.uniform(*INITIAL_RANGE, (n_systems, 2))
    time = np.linspace(0.0, t_max, n_points)
    out = np.empty((n_systems, n_points, 2), dtype=np.float32)
    chunk = 500  # one step size is shared by a chunk: keep chunks small enough to stay cheap
    for lo in tqdm(range(0, n_systems, chunk), disable=not progress, desc="simulating",
                   unit="chunk"):
        a, b, c, d, k = params[lo:lo + chunk].T
        n = len(a)

        def rhs(_t, z, a=a, b=b, c=c, d=d, k=k, n=n):  # z = (log x, log y)
            x, y = np.exp(z[:n]), np.exp(z[n:])
            return np.concatenate([a * (1 - x / k) - b * y, d * x - c])

        sol = solve_ivp(rhs, (0.0, t_max), np.log(start[lo:lo + chunk]).T.ravel(), t_eval=time,
                        rtol=1e-6, atol=1e-9)
        if not sol.success:  # pragma: no cover - the ranges above keep the system tame
            raise QwenliteError(f"simulation failed: {sol.message}")
        out[lo:lo + chunk] = np.exp(sol.y.reshape(2, n, n_points)).transpose(1, 2, 0)
    return out, time, params


def save_dataset(path: str | Path, trajectories: np.ndarray, time: np.ndarray,
                 attrs: dict | None = None, parameters: np.ndarray | None = None) -> Path:
    """Write a dataset in the coursework's layout, atomically (a temporary file, then a rename).

    Args:
        path: destination; parent directories are created.
        trajectories: (N, T, 2).
        time: (T,).
        attrs: file attributes to record (e.g. how it was made).
        parameters: optional (N, P) per-system parameters, stored as ``/parameters``.
    """
    import h5py

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("trajectories", data=np.asarray(trajectories, dtype=np.float32))
            f.create_dataset("time", data=np.asarray(time, dtype=np.float64))
            if parameters is not None:
                f.create_dataset("parameters", data=parameters)
            f.attrs.update(attrs or {})
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def simulate_to(path: str | Path, n_systems: int = 1000, n_points: int = 100, seed: int = 0,
                t_max: float = 200.0, progress: bool = False) -> Path:
    """:func:`simulate` and :func:`save_dataset`, recording the settings as file attributes."""
    traj, time, params = simulate(n_systems, n_points, seed, t_max, progress)
    attrs = {"generator": "qwenlite.data.simulate", "simulator_version": SIMULATOR_VERSION,
             "seed": seed, "equations": "dx/dt = a x (1 - x/K) - b x y; dy/dt = d x y - c y",
             "parameter_columns": "a,b,c,d,K"}
    return save_dataset(path, traj, time, attrs, params)


def default_data_path() -> Path:
    """Where the simulated default dataset is cached."""
    return cache_dir() / DEFAULT_FILENAME


def _is_current(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return int(f.attrs.get("simulator_version", -1)) == SIMULATOR_VERSION
    except Exception:  # noqa: BLE001 - unreadable: regenerate it
        return False


def resolve_data(arg: str | os.PathLike | None) -> Path:
    """The dataset a command uses: ``--data`` if given, else the simulated default.

    Args:
        arg: the ``--data`` value, or ``None``.

    Returns:
        An existing file. The default is generated (a few seconds, with a note on stderr) when
        it is missing or was made by another simulator version.

    Raises:
        DataError: ``arg`` names no file.
    """
    if arg:
        path = Path(arg).expanduser()
        if not path.is_file():
            raise DataError(f"--data {path}: no such file")
        return path
    path = default_data_path()
    if not (path.is_file() and _is_current(path)):
        print(f"generating the default simulated dataset at {path} (once)", file=sys.stderr)
        simulate_to(path, progress=sys.stderr.isatty())
    return path


# ----- statistics ------------------------------------------------------------------------
def summary_statistics(dataset: LVDataset) -> dict:
    """Shape, time axis and per-variable min, percentiles (1, 50, 99), mean, std and max."""
    traj = dataset.trajectories.astype(np.float64)
    stats = {"path": str(dataset.path), "shape": list(traj.shape),
             "time": [float(dataset.time[0]), float(dataset.time[-1])], "variables": {}}
    for v, name in enumerate(VARIABLES):
        x = traj[..., v]
        p1, p50, p99 = np.percentile(x, [1, 50, 99])
        stats["variables"][name] = {
            "min": float(x.min()), "p1": float(p1), "p50": float(p50), "mean": float(x.mean()),
            "std": float(x.std()), "p99": float(p99), "max": float(x.max()),
            "initial": [float(x[:, 0].min()), float(x[:, 0].max())]}
    return stats


def format_statistics(stats: dict) -> str:
    """A small text table of :func:`summary_statistics`."""
    cols = ("min", "p1", "p50", "mean", "std", "p99", "max")
    t0, t1 = stats["time"]
    lines = [f"{stats['path']}", f"  shape {tuple(stats['shape'])}, time {t0:g} to {t1:g}",
             "  " + f"{'':10}" + "".join(f"{c:>10}" for c in cols) + f"{'x(0) range':>16}"]
    for name, s in stats["variables"].items():
        lines.append("  " + f"{name:10}" + "".join(f"{s[c]:>10.4g}" for c in cols)
                     + f"{s['initial'][0]:>8.3g}-{s['initial'][1]:<7.3g}")
    return "\n".join(lines)
