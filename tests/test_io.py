"""qwenlite.io.atomic_path: the one way every file of a run is written."""

from __future__ import annotations

import pytest

from qwenlite.io import atomic_path, atomic_write_text


def test_a_failed_write_leaves_the_old_file_and_nothing_else(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_finished_write_replaces_the_file_and_can_keep_the_previous(tmp_path):
    path, previous = tmp_path / "state.pt", tmp_path / "state.prev.pt"
    with atomic_path(path, previous=previous) as tmp:
        tmp.write_bytes(b"first")
    assert path.read_bytes() == b"first" and not previous.exists()  # nothing to keep yet
    with atomic_path(path, previous=previous) as tmp:
        tmp.write_bytes(b"second")
    assert path.read_bytes() == b"second" and previous.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.prev.pt", "state.pt"]
