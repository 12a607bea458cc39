"""A run's ``metrics.jsonl`` (one JSON line per training step and validation) against its
checkpoint: the log is appended as the run goes and the checkpoint is written every
``save_interval`` steps, so on resume :func:`truncate` cuts the log back to the checkpoint's step,
and :func:`gap` finds steps the checkpoint holds that the log has lost (a log restored or cut apart
from its checkpoint), which the trainer reports.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwenlite.io import atomic_write_text


def truncate(path: Path, step: int) -> None:
    """Keep the records of steps up to ``step`` (all of them up to the first unreadable line, a
    line cut by a crash); nothing where there is no log yet."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            break  # a line cut by a crash ends the readable log
    atomic_write_text(path, "".join(x + "\n" for x in kept))


def gap(path: Path, step: int) -> tuple[int, int] | None:
    """The first run of training steps in ``1..step`` that ``metrics.jsonl`` has no line for.

    A run's log and its checkpoint are written separately, so a log restored or cut apart
    from its checkpoint can lose steps that the checkpoint holds; the caller says so.
    """
    if step <= 0 or not path.exists():
        return None
    seen = set()
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if "loss" in record:
            seen.add(record["step"])
    first = next((s for s in range(1, step + 1) if s not in seen), None)
    if first is None:
        return None
    end = first
    while end + 1 <= step and end + 1 not in seen:
        end += 1
    return first, end
