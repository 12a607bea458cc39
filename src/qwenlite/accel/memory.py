"""Keep freed tensor memory in the process (glibc), so large temporaries stop page-faulting.

torch's CPU allocator takes every tensor from ``malloc``. glibc serves a block of more than
32 MB at most (its adaptive ``mmap`` threshold) with a fresh ``mmap`` and gives it back to the
kernel on ``free``. A 4×512-token training step makes hundreds of such temporaries (a
(4, 512, 4864) MLP activation is 40 MB, a 256-row chunk of logits 155 MB), and each is handed
out as untouched pages: the kernel faults and zeroes them page by page on first write. Measured
on a 2-core Zen 3 (``python benchmarks/bench_cpu_measures.py malloc``): ``a * b`` on two
(4, 512, 4864) fp32 tensors takes 18 ms and 9,729 page faults as glibc is, 4 ms and none with
this setting; ``log_softmax`` of (256, 151936) 84 against 31 ms. With it (and the loss's fused
``log_softmax``) an fp32 LoRA step at 4×512 in ``benchmarks/bench_train.py`` went from 47 to
33 s.

:func:`keep_freed_memory` raises glibc's ``mmap`` threshold to 1 GiB and stops it trimming the
heap, so freed blocks are reused instead of being returned and faulted in again. The process
keeps its high-water mark of memory rather than shrinking between steps; peak memory is the
same. (A kernel that reclaims idle memory proactively, as DAMON does on this project's VM, may
still take kept pages back now and then; in a training loop they stay in use.) The command-line
entry points call it (:func:`qwenlite.cli.main_guard`); a library call never changes the
process's allocator behind its caller's back. ``QWENLITE_MALLOC=system`` leaves malloc as it is
(:mod:`qwenlite.accel.settings`); on other C libraries (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys

from qwenlite.accel import settings

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Tune glibc malloc once per process (see the module doc); True if it was tuned."""
    if settings.current().malloc == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library the process already uses
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # only glibc has both  # noqa: B018
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Each setting on its own: an older glibc may refuse the threshold (it capped it at 32 MB).
    mmap_ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    trim_ok = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return mmap_ok and trim_ok
