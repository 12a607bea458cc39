"""qwenlite.model.memory: freed tensor memory is reused instead of being faulted in anew."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qwenlite.errors import QwenliteError
from qwenlite.model import memory

# In a fresh process: tune (or not), then count the page faults of filling a 64 MB tensor a
# second time, after the first one was freed.
PROBE = """
import resource, torch
from qwenlite.model.memory import keep_freed_memory
tuned = keep_freed_memory()
def fill():
    t = torch.empty(16 * 2**20)
    t.fill_(1.0)
    return t
t = fill(); del t
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = fill()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(setting: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env={**os.environ, memory.ENV: setting}, check=True)
    tuned, faults = out.stdout.split()
    return tuned == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_memory_is_reused_without_page_faults():
    tuned, faults = _probe("keep")
    if not tuned:
        pytest.skip("not glibc")
    untuned, faults_system = _probe("system")
    assert not untuned
    pages = 64 * 2**20 // 4096
    assert faults_system > pages // 2  # a fresh mmap: every page faults on first write
    assert faults < pages // 20


def test_bad_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(memory.ENV, "always")
    memory.keep_freed_memory.cache_clear()
    try:
        with pytest.raises(QwenliteError, match="QWENLITE_MALLOC"):
            memory.keep_freed_memory()
    finally:
        memory.keep_freed_memory.cache_clear()
