"""The FLOPS ledger: every experiment's FLOPS in one JSON file, kept within the 1e17 budget.

Each experiment (a training run, an evaluation, a generation job) is one entry keyed by its run
directory, so a resumed run updates its own entry instead of adding a second one. Entries record
absolute totals (FLOPS spent so far), never increments, which makes every update idempotent.
Writes are atomic (temporary file + rename) and serialised by an exclusive lock on a sidecar file,
so concurrent runs and crashes cannot corrupt the ledger.

``python -m qwenlite.budget [--ledger PATH] [--json]`` prints the ledger as a table.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from pathlib import Path

from qwenlite.errors import BudgetError, QwenliteError
from qwenlite.io import atomic_write_text, check_file_writable

DEFAULT_BUDGET = 1e17
LEDGER_ENV = "QWENLITE_LEDGER"
DEFAULT_LEDGER = Path("runs") / "flops_ledger.json"


def ledger_path(arg: str | os.PathLike | None = None) -> Path:
    """``--ledger PATH``, else ``$QWENLITE_LEDGER``, else ``runs/flops_ledger.json``."""
    return Path(arg or os.environ.get(LEDGER_ENV) or DEFAULT_LEDGER)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fmt_flops(x: float) -> str:
    return f"{x:.3e}"


class Ledger:
    """A FLOPS ledger file.

    Args:
        path: the JSON file (created on first write, with its folder).
        budget: total FLOPS allowed; stored in the file on creation. None keeps the file's value
            (or :data:`DEFAULT_BUDGET` for a new ledger).
    """

    def __init__(self, path: str | os.PathLike | None = None, budget: float | None = None):
        self.path = ledger_path(path)
        self._budget = budget

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(self.path.suffix + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            yield data
            self._write(data)

    def _read(self) -> dict:
        if not self.path.exists():
            return {"budget": self._budget or DEFAULT_BUDGET, "entries": {}}
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise QwenliteError(f"cannot read the FLOPS ledger {self.path}: "
                                f"{exc.strerror or exc}; pass another --ledger") from None
        try:
            data = json.loads(text)
            assert isinstance(data.get("entries"), dict)
        except (json.JSONDecodeError, AssertionError, AttributeError) as exc:
            raise QwenliteError(f"FLOPS ledger {self.path} is corrupt ({exc}); restore it from a "
                                "backup or move it aside to start a new one") from None
        if self._budget is not None:
            data["budget"] = self._budget
        return data

    def _write(self, data: dict) -> None:
        atomic_write_text(self.path, json.dumps(data, indent=2))

    def load(self) -> dict:
        """A snapshot of the ledger (budget and entries)."""
        return self._read()

    def check(self) -> dict:
        """Make sure the ledger can be read and rewritten (or created), before an experiment
        writes anything else; nothing is created. Returns a snapshot.

        Raises:
            QwenliteError: the path is a directory, unreadable, in a folder that cannot be
                written or created, or the file is corrupt.
        """
        check_file_writable(self.path, "FLOPS ledger")
        return self._read()

    @property
    def budget(self) -> float:
        return float(self._read()["budget"])

    def used(self, exclude: str | None = None) -> int:
        """FLOPS spent by all entries (but ``exclude``)."""
        return sum(int(e["flops"]) for k, e in self._read()["entries"].items() if k != exclude)

    def key(self, key: str) -> str:
        """An experiment's key as stored: a run directory inside the ledger's own directory is
        kept relative to it (``./name/train``), so a committed sweep directory's ledger means the
        same on every machine; other keys are kept as given."""
        path = Path(key)
        if not path.is_absolute():
            return key
        try:
            return "./" + path.relative_to(self.path.parent.resolve()).as_posix()
        except ValueError:
            return key

    def plan(self, key: str, experiment: str, kind: str, planned_flops: int,
             flops_per_step: int | None = None, **info) -> dict:
        """Check that ``planned_flops`` more fit in the budget and register the experiment.

        ``key`` identifies the experiment (its run directory); FLOPS it already recorded (a
        resumed run) are not counted twice: ``planned_flops`` is what remains to be done.

        A refused plan writes nothing (not even the lock file).

        Raises:
            BudgetError: one line with what is left and what would fit.
        """
        _refuse_over_budget(self._read(), experiment, planned_flops, flops_per_step)
        with self._locked() as data:  # checked again: another run may have spent meanwhile
            _refuse_over_budget(data, experiment, planned_flops, flops_per_step)
            entries = data["entries"]
            key = self.key(key)
            entry = entries.get(key)
            if entry is None:
                entry = entries[key] = {"experiment": experiment, "kind": kind, "flops": 0,
                                        "steps": 0, "tokens": 0, "created": _now()}
            entry.update(info)
            entry["planned"] = int(entry["flops"]) + int(planned_flops)
            if planned_flops or entry.get("status") != "done":  # nothing more: stays done
                entry["status"] = "running"
            entry["updated"] = _now()
            return dict(entry)

    def record(self, key: str, flops: int, steps: int = 0, tokens: int = 0,
               status: str = "running", **info) -> None:
        """Set the totals of an experiment so far (absolute values: idempotent on resume)."""
        with self._locked() as data:
            key = self.key(key)
            entry = data["entries"].get(key)
            if entry is None:
                raise QwenliteError(f"no experiment {key} in the ledger {self.path}")
            entry.update(info)
            entry.update(flops=int(flops), steps=int(steps), tokens=int(tokens), status=status,
                         updated=_now())

    def add(self, key: str, experiment: str, kind: str, flops: int, steps: int = 0,
            tokens: int = 0, **info) -> None:
        """Plan and record a finished experiment in one go (e.g. an evaluation)."""
        self.plan(key, experiment, kind, flops, **info)
        self.record(key, flops, steps, tokens, status="done")

    def table(self) -> str:
        data = self._read()
        budget = float(data["budget"])
        rows = [["experiment", "kind", "status", "steps", "tokens", "FLOPS", "share"]]
        total = 0
        for entry in sorted(data["entries"].values(), key=lambda e: e.get("created", "")):
            flops = int(entry["flops"])
            total += flops
            rows.append([entry["experiment"], entry["kind"], entry.get("status", ""),
                         str(entry.get("steps", 0)), str(entry.get("tokens", 0)),
                         fmt_flops(flops), f"{100 * flops / budget:.3f}%"])
        rows.append(["total", "", "", "", "", fmt_flops(total), f"{100 * total / budget:.3f}%"])
        rows.append(["left", "", "", "", "", fmt_flops(budget - total),
                     f"{100 * (budget - total) / budget:.3f}%"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 2, "  ".join("-" * w for w in widths))
        return f"FLOPS ledger {self.path} (budget {fmt_flops(budget)})\n" + "\n".join(lines)


def _refuse_over_budget(data: dict, experiment: str, planned_flops: int,
                        flops_per_step: int | None) -> None:
    """Raise :class:`BudgetError` if ``planned_flops`` more do not fit in the ledger ``data``."""
    left = float(data["budget"]) - sum(int(e["flops"]) for e in data["entries"].values())
    if planned_flops > left:
        fit = ""
        if flops_per_step:
            fit = f"; at {fmt_flops(flops_per_step)} FLOPS a step, " \
                  f"{max(int(left // flops_per_step), 0)} steps would fit"
        raise BudgetError(
            f"{experiment} plans {fmt_flops(planned_flops)} FLOPS but only "
            f"{fmt_flops(max(left, 0))} of the {fmt_flops(data['budget'])} budget are "
            f"left{fit}"
        )
