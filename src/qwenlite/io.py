"""Small file helpers shared by the run directory, the checkpoints and the settings files."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
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


@contextlib.contextmanager
def atomic_path(path: str | Path, previous: str | Path | None = None) -> Iterator[Path]:
    """A temporary path beside ``path`` to write the new file to (by any writer: text, torch,
    safetensors, HDF5); when the block ends it is synced to disk and renamed over ``path``, so
    that a crash leaves either the old file or the new one, never half of one. ``previous``: keep
    the old file there. An exception in the block removes the temporary file and leaves ``path``
    as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ----- checks of paths a command will read or write (before it writes anything) ----------------
def _named(what: str, path: Path) -> str:
    """``path``, after what it is for when that is known (e.g. ``FLOPS ledger runs/x.json``)."""
    return f"{what} {path}" if what else str(path)


def _require_writable_dir(directory: Path, prefix: str) -> None:
    """Refuse ``directory`` unless it is a directory the user can write; ``prefix`` starts the
    message (what was being done)."""
    if not directory.is_dir():
        raise QwenliteError(f"{prefix}{directory} is not a directory; choose another path")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise QwenliteError(f"{prefix}{directory} is not writable; choose another path or fix "
                            "its permissions")


def _check_can_create(path: Path, what: str) -> None:
    """Refuse ``path`` unless its nearest existing ancestor is a directory the user can write."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    _require_writable_dir(ancestor, f"cannot create {_named(what, path)}: ")


def check_file(path: str | Path, what: str = "") -> Path:
    """An existing, readable regular file, else one line saying what is wrong with ``path``."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise QwenliteError(f"{_named(what, path)} is a directory; pass a file")
    if not path.is_file():
        raise QwenliteError(f"no {what or 'file'} at {path}; check the path")
    if not os.access(path, os.R_OK):
        raise QwenliteError(f"{_named(what, path)} is not readable; fix its permissions")
    return path


def check_dir(path: str | Path, what: str = "") -> Path:
    """An existing, readable directory, else one line saying what is wrong with ``path``."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise QwenliteError(f"{_named(what, path)} is not a directory")
    if not path.is_dir():
        raise QwenliteError(f"{_named(what, path)} does not exist; check the path")
    if not os.access(path, os.R_OK | os.X_OK):
        raise QwenliteError(f"{_named(what, path)} is not readable; fix its permissions")
    return path


def check_dir_creatable(path: str | Path, what: str = "") -> Path:
    """A directory that exists and is writable, or that can be created; checked, not created."""
    path = Path(path).expanduser()
    if path.exists():
        _require_writable_dir(path, f"{what} " if what else "")
    else:
        _check_can_create(path, what)
    return path


def check_file_writable(path: str | Path, what: str = "") -> Path:
    """A file path that can be (re)written atomically: not a directory, readable if it exists,
    in a folder that exists and is writable or can be created; checked, nothing is created."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise QwenliteError(f"{_named(what, path)} is a directory; pass a file path")
    if path.exists():
        if not path.is_file():
            raise QwenliteError(f"{_named(what, path)} is not a regular file; pass another path")
        if not os.access(path, os.R_OK):
            raise QwenliteError(f"{_named(what, path)} is not readable; fix its permissions")
    _check_can_create(path, what)
    return path


def file_id(path: str | Path) -> str:
    """A short content hash of a file (SHA-256, 16 hex digits): what it is, wherever it lies."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def read_records(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (a run's ``metrics.jsonl``), blank lines skipped."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
