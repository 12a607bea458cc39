"""Decode steps on x86-64 CPUs with AVX2 and FMA: a small C++ kernel built on first use.

A decode step multiplies a few rows (one token per sequence) by every weight of the model, so its
speed is how fast the weights stream through the FMA units. For 8 rows BLAS does poorly there:
oneDNN's best (weights reordered once into its blocked layout, fp32) reaches ~70 GFLOPS on a
2-core Zen 3, where a large fp32 matmul reaches ~160. And a bf16 model on a CPU without bf16
arithmetic had to keep a second, fp32 copy of every weight for it (:mod:`~qwenlite.accel.packing`).

``skinny_linears.cpp`` computes each output as a dot product along the weight's rows, 8 lanes
at a time, reading the weights as they are stored — bf16 (widened as they are read, exactly) or
fp32 — with every product and sum in fp32 and the output rounded to bf16 for a bf16 model: the
arithmetic of a bf16 GEMM, as :mod:`~qwenlite.accel.emulation` emulates it. No reordered or
widened copy is kept. All of a 0.5B model's decode-step matmuls for 8 rows took 76.4 ms over bf16
weights and 116.9 ms over fp32 ones, where oneDNN took 122.9 ms over its prepacked fp32 copies
(``python benchmarks/bench_cpu_measures.py decode-matmuls``). ``skinny_attention.cpp`` computes
a decode step's attention (each KV head's query heads over its cached keys and values, fp32 or
bf16, softmax in fp32 with Cephes' exp): 16.9 ms a step for 8 sequences × 900 cached tokens,
12.0 ms over a bf16 cache, against 22.5 ms through torch's SDPA (``... decode-attention``).
``skinny.h`` holds what the two share.

It is built once per machine with the C++ compiler (``$CXX``, else ``g++``/``c++``/``clang++``)
into ``$QWENLITE_CACHE/kernels`` (default ``~/.cache/qwenlite``), loaded with ctypes, and checked
against torch before it serves. Its threads are OpenMP's: torch's own runtime where torch ships
``libgomp.so.1`` (its Linux wheels), which the kernel then shares.
Where it cannot be built (no compiler, another CPU or OS) decode steps run as before, through
oneDNN and SDPA, with one warning saying why. On a CPU with AVX-512 they run that way too, without
a warning: oneDNN is faster there (:func:`outpaced`). ``QWENLITE_DECODE_KERNEL=0`` turns the
kernel off, ``=1`` on wherever it runs (:mod:`qwenlite.accel.settings`).
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

from qwenlite.accel import settings
from qwenlite.accel.settings import KERNEL_ENV
from qwenlite.io import cache_dir

MAX_ROWS = 32
"""Most rows a call takes; more rows run through oneDNN (at 32 rows the kernel still led it, at
64 they were level)."""
MAX_OUTPUTS = 8  # the C++ side holds as many (``Out outs[8]``)
_warned: set[str] = set()  # reasons already warned of, once a process
SOURCES = tuple(Path(__file__).with_name(name) for name in
                ("skinny.h", "skinny_linears.cpp", "skinny_attention.cpp", "xent.cpp",
                 "elementwise.cpp", "attention_bf16.cpp"))
"""The library's source: a header all share, the few-row matmuls and the decode attention, and
the training kernels (the loss's softmax cross-entropy, RMSNorm and SwiGLU's backward, and
causal attention in bf16 for AVX512-BF16 CPUs, ``flash.py``)."""
FLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where unreadable)."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def unsupported() -> str | None:
    """Why this machine cannot run the kernel, or None."""
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it needs Linux on x86-64 (this is {sys.platform} on {platform.machine()})"
    flags = cpu_flags()
    if not flags:
        return "/proc/cpuinfo is unreadable"
    missing = {"avx2", "fma"} - flags
    if missing:
        return f"the CPU lacks {', '.join(sorted(missing))}"
    return None


def outpaced() -> str | None:
    """Why oneDNN serves decode steps better than the kernel here, or None: a CPU with AVX-512,
    whose 512-bit units oneDNN uses and the AVX2 kernel does not. On a 2-core Xeon with AVX-512
    (and AMX) a decode step of 8 sequences over ~900 cached tokens took 125 ms through oneDNN
    and SDPA against 157 ms through the kernel in fp32, 124 against 167 ms for an emulated bf16
    model, and the step's matmuls alone 92.5 against 126.3 ms; on the 2-core Zen 3 (AVX2) that
    the kernel was written on, it led (``python benchmarks/bench_cpu_measures.py decode-step``,
    ``decode-matmuls``). ``$QWENLITE_DECODE_KERNEL=1`` uses the kernel all the same."""
    if "avx512f" in cpu_flags():
        return "the CPU has AVX-512, where oneDNN's decode steps are faster"
    return None


def find_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(compiler: str) -> Path:
    """The kernel's shared library, compiled into the cache unless there already; raises
    RuntimeError with one line saying what failed."""
    digest = hashlib.sha256(" ".join((compiler, *FLAGS)).encode())
    for src in SOURCES:  # each file by name and length, so text moved between files counts
        body = src.read_bytes()
        digest.update(f"\0{src.name}\0{len(body)}\0".encode() + body)
    folder = cache_dir() / "kernels"
    target = folder / f"skinny-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".skinny-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        units = [str(src) for src in SOURCES if src.suffix == ".cpp"]
        done = subprocess.run([compiler, *FLAGS, *units, "-o", tmp], capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if "error" in ln.lower()] or lines
            raise RuntimeError(f"{Path(compiler).name} failed: "
                               f"{errors[0] if errors else f'exit {done.returncode}'}")
        os.replace(tmp, target)  # atomic: a concurrent build lands the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class _Kernels:
    """The library's two entry points, typed."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self.linears = lib.qwenlite_skinny_linears
        self.linears.argtypes = [p, i64, i32, i64, i64, i32, p, p, p, i32, p, i32, i32]
        self.linears.restype = i32
        self.attention = lib.qwenlite_decode_attention
        self.attention.argtypes = [p, i64, i64, p, p, i32, i64, i64, i64, p, i64, i64, p, i64,
                                   i64, i64, i64, i64, ctypes.c_float, i32]
        self.attention.restype = i32
        self.xent = lib.qwenlite_xent_bf16
        self.xent.argtypes = [p, i64, i64, i64, p, p, i32]
        self.xent.restype = i32
        f32 = ctypes.c_float
        self.swiglu_bwd = lib.qwenlite_swiglu_bwd
        self.swiglu_bwd.argtypes = [p, p, p, p, p, i64, i32]
        self.swiglu_bwd.restype = None
        self.rmsnorm_fwd = lib.qwenlite_rmsnorm_fwd
        self.rmsnorm_fwd.argtypes = [p, p, p, p, i64, i64, f32, i32]
        self.rmsnorm_fwd.restype = None
        self.rmsnorm_bwd = lib.qwenlite_rmsnorm_bwd
        self.rmsnorm_bwd.argtypes = [p, p, p, p, p, i64, i64, i32]
        self.rmsnorm_bwd.restype = None
        self.attention_fwd = lib.qwenlite_attention_fwd  # AVX512-BF16 only (flash.py)
        self.attention_fwd.argtypes = [p, p, p, p, p, i64, i64, i64, i64, f32, i32]
        self.attention_fwd.restype = i32
        self.attention_bwd = lib.qwenlite_attention_bwd
        self.attention_bwd.argtypes = [p, p, p, p, p, p, p, p, p, i64, i64, i64, i64, f32, i32]
        self.attention_bwd.restype = i32


def _self_check(lib: _Kernels) -> bool:
    """The kernels against float64 references: the matmuls for every row count a tile has, a K
    that is not a multiple of 8 on both of their paths (K ≤ 1024 and above), column counts that
    leave tails, bf16 and fp32, with and without biases; attention over fp32 and bf16 keys, with
    and without a mask; the training kernels by their own checks (``xent.self_check``,
    ``fused.self_check``)."""
    from qwenlite.accel import fused, xent

    return (_linears_check(lib.linears) and _attention_check(lib) and xent.self_check(lib)
            and fused.self_check(lib))


def _attention_check(lib: _Kernels) -> bool:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 6, 1, 16, generator=gen, dtype=torch.float32)
    for kv_dtype in (torch.float32, torch.bfloat16):
        k = torch.randn(3, 2, 21, 16, generator=gen, dtype=torch.float32).to(kv_dtype)
        v = torch.randn(3, 2, 21, 16, generator=gen, dtype=torch.float32).to(kv_dtype)
        mask = torch.rand(3, 1, 1, 21, generator=gen) > 0.3
        for m in (None, mask):
            out = _attention_call(lib, q, k, v, m, 16 ** -0.5)
            ref = torch.nn.functional.scaled_dot_product_attention(
                q.double(), k.double().repeat_interleave(3, 1), v.double().repeat_interleave(3, 1),
                attn_mask=m)
            if out is None or not torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5):
                return False
    return True


def _linears_check(fn) -> bool:
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
    """(the kernels, None) or (None, why not)."""
    why = unsupported()
    if why:
        return None, why
    compiler = find_compiler()
    if compiler is None:
        return None, "no C++ compiler found (set $CXX)"
    try:
        lib = _Kernels(build(compiler))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__
    try:  # outside any dispatch mode (a FLOPS counter must not count the check), autocast,
        # inference mode and autograd, on CPU tensors whatever the default device
        from torch.utils._python_dispatch import _disable_current_modes

        with (_disable_current_modes(), torch.inference_mode(False), torch.no_grad(),
              torch.autocast("cpu", enabled=False), torch.device("cpu")):
            ok = _self_check(lib)
    except Exception as e:  # noqa: BLE001 - whatever fails, the kernel must not serve
        return None, f"its check against torch failed: {type(e).__name__}: {e}".splitlines()[0]
    if not ok:
        return None, "it failed its check against torch"
    return lib, None


def reset() -> None:
    """Forget the loaded kernel and the warnings given, so that the next call builds or loads it
    again (after ``$QWENLITE_CACHE`` or the compiler changed)."""
    _load.cache_clear()
    _warned.clear()


def unavailable() -> str | None:
    """Why the kernel cannot serve here (built on the first call), or None where it can."""
    return _load()[1]


def enabled() -> bool:
    """Whether decode steps use the kernel: :attr:`Settings.decode_kernel
    <qwenlite.accel.settings.Settings>` (``$QWENLITE_DECODE_KERNEL``: ``auto`` where it is not
    :func:`outpaced`, ``1`` wherever it runs, ``0`` never) and it runs here (built on the first
    call; a warning says why where it cannot be)."""
    mode = settings.current().decode_kernel
    if mode == "off" or (mode == "auto" and outpaced()):
        return False
    lib, why = _load()
    if lib is None and why not in _warned:
        _warned.add(why)
        warnings.warn(f"qwenlite: the decode kernel is off ({why}); decode steps run through "
                      f"oneDNN, slower. {KERNEL_ENV}=0 silences this.", RuntimeWarning, stacklevel=3)
    return lib is not None


def status() -> str:
    """One line for logs and benchmarks: whether decode steps use the kernel, and if not why."""
    mode = settings.current().decode_kernel
    if mode == "off":
        return f"decode kernel off (${KERNEL_ENV}=0)"
    if mode == "auto" and (why := outpaced()):
        return f"decode kernel off: {why} (${KERNEL_ENV}=1 uses it)"
    lib, why = _load()
    return "decode kernel on (AVX2 C++)" if lib is not None else f"decode kernel off: {why}"


def linears(x: torch.Tensor, weights: Sequence[torch.Tensor],
            biases: Sequence[torch.Tensor | None], out_dtype: torch.dtype,
            checked: bool = False) -> list[torch.Tensor]:
    """``[x·Wᵀ + b for W, b in zip(weights, biases)]`` in ``out_dtype`` for a 2-D CPU ``x`` of at
    most :data:`MAX_ROWS` rows (bf16 or fp32, unit stride along its last dimension) and
    contiguous weights that all have one dtype, bf16 or fp32 (biases too), through the kernel;
    :func:`enabled` must be true. ``checked``: the caller has had :func:`refusal` pass them (a
    decode step, which must not check twice); else they are checked here (ValueError)."""
    why = None if checked else refusal(x, weights, biases)
    if why is not None:
        raise ValueError(f"the decode kernel does not take these: {why}")
    lib, _ = _load()
    return _call(lib.linears, x, weights, biases, out_dtype)


def refusal(x: torch.Tensor, weights: Sequence[torch.Tensor],
            biases: Sequence[torch.Tensor | None]) -> str | None:
    """Why :func:`linears` does not take these (the kernel's own limits and a shape ``F.linear``
    would refuse too), or None."""
    rows, k = x.shape
    if not 1 <= len(weights) <= MAX_OUTPUTS or not 1 <= rows <= MAX_ROWS or x.stride(-1) != 1:
        return (f"it takes 1-{MAX_OUTPUTS} weights, 1-{MAX_ROWS} rows of unit stride; got "
                f"{len(weights)} weights, x {tuple(x.shape)} with strides {x.stride()}")
    dtype = weights[0].dtype
    for w, b in zip(weights, biases):
        if (w.dim() != 2 or w.shape[1] != k or w.shape[0] < 1 or w.dtype != dtype
                or not w.is_contiguous() or (b is not None and (
                    b.shape != (w.shape[0],) or b.dtype != dtype or not b.is_contiguous()))):
            return (f"it needs contiguous (n, {k}) weights of one dtype and (n,) biases of it; "
                    f"got {[tuple(w.shape) for w in weights]}")
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor | None:
    """One decode step's grouped-query attention through the kernel, in fp32: q (b, h, 1, d)
    fp32, k and v (b, kv, T, d) fp32 or bf16 with the same strides (views of a KV cache), ``mask``
    None or a bool "may attend" mask broadcastable to (b, 1, 1, T); rows with nothing to attend
    to come out as zeros, as from torch's SDPA. None for what the kernel does not take (h / kv
    above 8, d not a multiple of 8 or above 256); :func:`enabled` must be true."""
    lib, _ = _load()
    return _attention_call(lib, q, k, v, mask, scale)


def _attention_call(lib, q, k, v, mask, scale):
    if q.dim() != 4 or k.dim() != 4:
        return None
    b, h, n, d = q.shape
    kv, t = k.shape[1], k.shape[2]
    if (n != 1 or k.shape != (b, kv, t, d) or v.shape != k.shape or k.stride() != v.stride()
            or k.dtype != v.dtype or k.dtype not in (torch.float32, torch.bfloat16)
            or q.dtype != torch.float32 or q.stride(-1) != 1 or k.stride(-1) != 1
            or b < 1 or t < 1 or h % kv or not 1 <= h // kv <= 8):
        return None
    m_b = m_t = 0
    if mask is not None:
        try:
            mask = mask.expand(b, 1, 1, t)
        except RuntimeError:  # a per-head mask, say: SDPA takes it
            return None
        if mask.dtype != torch.bool:
            return None
        m_b, m_t = mask.stride(0), mask.stride(3)
    out = torch.empty(b, h, d, dtype=torch.float32, device="cpu")
    rc = lib.attention(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(),
                       k.dtype == torch.bfloat16, k.stride(0), k.stride(1), k.stride(2),
                       None if mask is None else mask.data_ptr(), m_b, m_t, out.data_ptr(),
                       b, h, kv, t, d, scale, torch.get_num_threads())
    return out.view(b, h, 1, d) if rc == 0 else None


def _call(fn, x, weights, biases, out_dtype):
    """The kernel over arguments :func:`refusal` passed."""
    rows, k = x.shape
    count = len(weights)
    outs = [torch.empty(rows, w.shape[0], dtype=out_dtype, device="cpu") for w in weights]
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


def library():
    """The loaded library (built and checked on the first call), or None where it cannot
    serve; for the training kernels (:mod:`~qwenlite.accel.fused`, :mod:`~qwenlite.accel.xent`),
    which serve wherever it runs."""
    return _load()[0]
