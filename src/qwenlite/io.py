"""Small file helpers shared by the run directory, the checkpoints and the settings files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from qwenlite.errors import QwenliteError

CACHE_ENV = "QWENLITE_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/qwenlite")


def cache_dir() -> Path:
    """qwenlite's cache directory: ``$QWENLITE_CACHE``, else ``~/.cache/qwenlite`` (the simulated
    default dataset, built decode kernels)."""
    cache = os.environ.get(CACHE_ENV)
    return (Path(cache) if cache else DEFAULT_CACHE_DIR).expanduser()


def read_json_object(path: str | Path, what: str,
                     error: type[QwenliteError] = QwenliteError) -> dict:
    """Read a JSON object, or raise ``error`` with one line naming ``what`` and the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"no {what} at {path}") from None
    except (OSError, ValueError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} is not a JSON object")
    return data


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` so that a crash leaves either the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
