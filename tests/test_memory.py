"""qwenlite.accel.memory: freed tensor memory is reused instead of being faulted in anew."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qwenlite.accel import memory
from qwenlite.accel.settings import MALLOC_ENV
from qwenlite.errors import QwenliteError

# In a fresh process: tune (or not), then allocate, fill and free a 64 MB tensor eight times and
# report the fewest page faults of one cycle. The fewest, because a kernel that reclaims idle
# memory proactively (DAMON on some VMs) can take kept pages back between cycles now and then.
PROBE = """
import resource, torch
from qwenlite.accel.memory import keep_freed_memory
tuned = keep_freed_memory()
def cycle():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 2**20)
    t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(tuned, min(cycle() for _ in range(8)))
"""


def _probe(setting: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env={**os.environ, MALLOC_ENV: setting}, check=True)
    tuned, faults = out.stdout.split()
    return tuned == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_memory_is_reused_without_page_faults():
    tuned, faults = _probe("keep")
    if not tuned:
        pytest.skip("not glibc")
    untuned, faults_system = _probe("system")
    assert not untuned
    # A fresh mmap faults on first write: a page at a time (or a huge page at a time where
    # transparent huge pages are always on); reused memory does not fault at all.
    assert faults_system > 0
    assert faults <= faults_system // 10


def test_bad_setting_is_one_clear_error(monkeypatch, capsys):
    from qwenlite.accel import settings
    from qwenlite.cli import main_guard

    monkeypatch.setenv(MALLOC_ENV, "always")
    settings.reload()
    memory.keep_freed_memory.cache_clear()
    try:
        with pytest.raises(QwenliteError, match="QWENLITE_MALLOC"):
            memory.keep_freed_memory()
        assert main_guard(lambda: 0)() == 2  # a command refuses it in one line
        assert "QWENLITE_MALLOC" in capsys.readouterr().err
    finally:
        monkeypatch.delenv(MALLOC_ENV)
        settings.reload()
        memory.keep_freed_memory.cache_clear()


# Loading a model as a library changes nothing process-wide; a command's entry point tunes malloc.
ENTRY = """
import sys
import qwenlite
from qwenlite.accel import memory
model = qwenlite.load_model(sys.argv[1], device="cpu")
assert qwenlite.accel.is_accelerated(model)
print(memory.keep_freed_memory.cache_info().misses, end=" ")
from qwenlite.cli import main_guard
main_guard(lambda: 0)()
print(memory.keep_freed_memory.cache_info().misses)
"""


def test_only_command_entry_points_tune_malloc(tmp_path):
    from conftest import make_hf_checkpoint

    weights = make_hf_checkpoint(tmp_path / "tiny")
    out = subprocess.run([sys.executable, "-c", ENTRY, str(weights)], capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["0", "1"]
