"""Decode-step matmuls on x86-64 CPUs with AVX2 and FMA: a small C++ kernel built on first use.

A decode step multiplies a few rows (one token per sequence) by every weight of the model, so its
speed is how fast the weights stream through the FMA units. For 8 rows BLAS does poorly there:
oneDNN's best (weights reordered once into its blocked layout, fp32) reaches ~70 GFLOPS on a
2-core Zen 3, where a large fp32 matmul reaches ~160. And a bf16 model on a CPU without bf16
arithmetic had to keep a second, fp32 copy of every weight for it (:mod:`kernels`).

``skinny.cpp`` computes each output as a dot product along the weight's rows, 8 lanes at a time,
reading the weights as they are stored — bf16 (widened as they are read, exactly) or fp32 — with
every product and sum in fp32 and the output rounded to bf16 for a bf16 model: the arithmetic of
a bf16 GEMM, as :mod:`kernels` emulates it. No reordered or widened copy is kept. For 8 rows it
streams 24 of the MLP's 4864×896 bf16 weights in ~18 ms, where oneDNN took ~25 ms over their
prepacked fp32 copies (``python benchmarks/bench_cpu_measures.py decode-matmuls``).

It is built once per machine with the C++ compiler (``$CXX``, else ``g++``/``c++``/``clang++``)
into ``$QWENLITE_CACHE/kernels`` (default ``~/.cache/qwenlite``), loaded with ctypes, and checked
against ``F.linear`` before it serves. Its threads are OpenMP's, the runtime torch itself loaded.
Where it cannot be built (no compiler, another CPU or OS) decode steps run as before, through
oneDNN, with one warning saying why. ``QWENLITE_DECODE_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from qwenlite.io import cache_dir

ENV = "QWENLITE_DECODE_KERNEL"
MAX_ROWS = 32
"""Most rows a call takes; more rows run through oneDNN (at 32 rows the kernel still led it, at
64 they were level)."""
MAX_OUTPUTS = 8
_warned: set[str] = set()  # reasons already warned of, once a process
SOURCE = Path(__file__).with_name("skinny.cpp")
FLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")


def _unsupported() -> str | None:
    """Why this machine cannot run the kernel, or None."""
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it needs Linux on x86-64 (this is {sys.platform} on {platform.machine()})"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "/proc/cpuinfo is unreadable"
    missing = {"avx2", "fma"} - flags
    if missing:
        return f"the CPU lacks {', '.join(sorted(missing))}"
    return None


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(compiler: str) -> Path:
    """The kernel's shared library, compiled into the cache unless there already; raises
    RuntimeError with one line saying what failed."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS)).encode())
    folder = cache_dir() / "kernels"
    target = folder / f"skinny-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".skinny-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            raise RuntimeError(f"{Path(compiler).name} failed: "
                               f"{lines[0] if lines else f'exit {done.returncode}'}")
        os.replace(tmp, target)  # atomic: a concurrent build lands the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(path: Path):
    fn = ctypes.CDLL(str(path)).qwenlite_skinny_linears
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, ctypes.c_int, i64, i64, ctypes.c_int, p, p, p, ctypes.c_int, p,
                   ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _self_check(fn) -> bool:
    """The kernel against float64 ``F.linear`` for every row count a tile has, a K that is not a
    multiple of 8 on both of its paths (K ≤ 1024 and above), column counts that leave tails, bf16
    and fp32, with and without biases."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for rows, k, ns in ((1, 20, (3,)), (5, 64, (17, 8)), (8, 36, (9, 1, 24)),
                            (13, 1030, (7, 16)), (3, 1100, (5,))):
            x = torch.randn(rows, k, generator=gen).to(dtype)
            ws = [torch.randn(n, k, generator=gen).to(dtype) for n in ns]
            bs = [None if i == 1 else torch.randn(n, generator=gen).to(dtype)
                  for i, n in enumerate(ns)]
            outs = _call(fn, x, ws, bs, dtype)
            for out, w, b in zip(outs, ws, bs):
                ref = torch.nn.functional.linear(
                    x.double(), w.double(), None if b is None else b.double())
                if not torch.allclose(out.double(), ref, rtol=1e-2 if dtype != torch.float32
                                      else 1e-5, atol=1e-3):
                    return False
    return True


@functools.cache
def _load():
    """(the kernel's function, None) or (None, why not)."""
    why = _unsupported()
    if why:
        return None, why
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler found (set $CXX)"
    try:
        fn = _bind(_build(compiler))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__
    if not _self_check(fn):
        return None, "it failed its check against F.linear"
    return fn, None


def enabled() -> bool:
    """Whether decode steps use the kernel: ``$QWENLITE_DECODE_KERNEL`` is not ``0`` and it runs
    here (built on the first call; a warning says why where it cannot be)."""
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    fn, why = _load()
    if fn is None and why not in _warned:
        _warned.add(why)
        warnings.warn(f"qwenlite: the decode kernel is off ({why}); decode steps run through "
                      f"oneDNN, slower. {ENV}=0 silences this.", RuntimeWarning, stacklevel=3)
    return fn is not None


def status() -> str:
    """One line for logs and benchmarks: whether decode steps use the kernel, and if not why."""
    if os.environ.get(ENV, "1").strip() == "0":
        return f"decode kernel off (${ENV}=0)"
    fn, why = _load()
    return "decode kernel on (AVX2 C++)" if fn is not None else f"decode kernel off: {why}"


def linears(x: torch.Tensor, weights: Sequence[torch.Tensor],
            biases: Sequence[torch.Tensor | None], out_dtype: torch.dtype) -> list[torch.Tensor]:
    """``[x·Wᵀ + b for W, b in zip(weights, biases)]`` in ``out_dtype`` for a 2-D CPU ``x`` of at
    most :data:`MAX_ROWS` rows (bf16 or fp32, unit stride along its last dimension) and
    contiguous weights that all have one dtype, bf16 or fp32 (biases too), through the kernel;
    :func:`enabled` must be true."""
    fn, _ = _load()
    return _call(fn, x, weights, biases, out_dtype)


def _call(fn, x, weights, biases, out_dtype):
    rows, k = x.shape
    count = len(weights)
    if not 1 <= count <= MAX_OUTPUTS or rows > MAX_ROWS or x.stride(-1) != 1:
        raise ValueError(f"the decode kernel takes 1-{MAX_OUTPUTS} weights, at most {MAX_ROWS} "
                         f"rows of unit stride; got {count} weights, x {tuple(x.shape)} with "
                         f"strides {x.stride()}")
    outs = [torch.empty(rows, w.shape[0], dtype=out_dtype) for w in weights]
    pointers = ctypes.c_void_p * count
    rc = fn(x.data_ptr(), x.stride(0), x.dtype == torch.bfloat16, rows, k, count,
            pointers(*(w.data_ptr() for w in weights)),
            pointers(*(None if b is None else b.data_ptr() for b in biases)),
            (ctypes.c_int64 * count)(*(w.shape[0] for w in weights)),
            weights[0].dtype == torch.bfloat16, pointers(*(o.data_ptr() for o in outs)),
            out_dtype == torch.bfloat16, torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"the decode kernel refused its arguments: x {tuple(x.shape)}, weights "
                         f"{[tuple(w.shape) for w in weights]}")
    return outs
