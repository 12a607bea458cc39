"""bf16 matmuls on CPUs without bf16 arithmetic, computed exactly on the fp32 units.

A bf16 GEMM (what a GPU's tensor cores, AMX or AVX512-BF16 do) multiplies bf16 inputs, adds the
products in fp32 and rounds the result to bf16. A product of two bf16 numbers (8-bit
significands) is exact in fp32 (24-bit significand), so the same arithmetic can run as an fp32
GEMM over bf16 values: ``round_bf16(fp32(x) @ fp32(W)ᵀ)``. The only difference from a bf16 unit is
the order of the fp32 additions, as between any two GEMM libraries.

This matters on x86 CPUs without AVX512-BF16/AMX (most laptops, AMD Zen 2/3): there torch falls
back to a generic bf16 loop that runs ~6× slower than fp32 BLAS (measured: ~20 vs ~125 GFLOPS
on a 2-core Zen 3). In the default ``auto`` mode every bf16 matmul on such a CPU runs this way
(:mod:`qwenlite.accel.kernels` routes ``Linear`` layers, attention and the LM head here, and the
fused loss calls it) — both for a bf16 model and under bf16 autocast — so a bf16 model runs at
fp32 speed with bf16 results. Wide matmuls (prefill, training) convert per call and keep
nothing. ``QWENLITE_BF16_MATMUL=native`` turns emulation off; ``emulate`` forces it on any CPU
(:mod:`qwenlite.accel.settings`).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from qwenlite.accel import settings

_cache = WeakTensorKeyDictionary()


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            return set(value.split())
    return set()


@functools.cache
def cpu_lacks_bf16() -> bool:
    """True on an x86 Linux CPU with AVX2 but without AVX512-BF16/AMX-BF16."""
    flags = cpu_flags()
    return "avx2" in flags and "avx512_bf16" not in flags and "amx_bf16" not in flags


def has_bf16_units(device_type: str = "cpu") -> bool:
    """Whether bf16 matmuls run on bf16 hardware: CUDA and MPS devices, and CPUs whose
    ``/proc/cpuinfo`` lists AVX512-BF16 or AMX-BF16 (or ARM's bf16 extension)."""
    if device_type in ("cuda", "mps"):
        return True
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def bf16_matmul_mode() -> str:
    """``native`` or ``emulate``: how a bf16 matmul on the CPU is computed now
    (:attr:`Settings.bf16_matmul <qwenlite.accel.settings.Settings>`; ``auto`` emulates where
    :func:`cpu_lacks_bf16`)."""
    mode = settings.current().bf16_matmul
    if mode == "auto":
        return "emulate" if cpu_lacks_bf16() else "native"
    return mode


def emulating(x: torch.Tensor) -> bool:
    """Whether a matmul taking ``x`` is a CPU bf16 matmul (bf16 input or bf16 autocast) to be
    emulated."""
    if x.device.type != "cpu":
        return False
    if x.dtype != torch.bfloat16 and not (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return False
    return bf16_matmul_mode() == "emulate"


SKINNY_ROWS = 64
_NO_CONTEXT = contextlib.nullcontext()


def cpu_autocast_off():
    """A context that turns CPU autocast off for exact fp32 arithmetic; a no-op context when it is
    off already (entering ``torch.autocast`` costs Python time on every one of a decode step's
    ~100 matmuls and 24 attentions)."""
    return torch.autocast("cpu", enabled=False) if torch.is_autocast_enabled("cpu") else _NO_CONTEXT


def autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether an op on these tensors is recorded for a backward pass."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def kept(store: WeakTensorKeyDictionary, t: nn.Parameter, make, keep: bool = True,
          tag=None) -> torch.Tensor:
    """``make(t.detach())``, remembered in ``store`` for ``t`` until ``t`` changes in place (a
    LoRA merge bumps its version) or gets new data (``model.to(...)``: a new address or dtype;
    a round trip that lands on the same address, dtype and version would go unseen). Made
    outside inference mode, so that a copy made while generating can serve training, and only
    kept when ``keep`` or an older copy was kept."""
    key = (t.data_ptr(), t._version, t.dtype, t.shape, tag)
    hit = store.get(t)
    if hit is not None and hit[0] == key:
        return hit[1]
    store.pop(t, None)  # free a stale copy before making the new one
    with torch.inference_mode(False), torch.no_grad():
        value = make(t.detach())
    if keep or hit is not None:
        store[t] = (key, value)
    return value


def as_bf16_fp32(t: torch.Tensor, rows: int = 1) -> torch.Tensor:
    """``t`` rounded to bf16, held in fp32, for a matmul over ``rows`` input rows.

    A frozen parameter used by a skinny matmul (``rows <= SKINNY_ROWS``: a decode step without
    prepacked weights, or a bias) keeps the result, refreshed when the parameter changes in place
    (e.g. by a LoRA merge); converting it anew would cost more than the matmul. A wide matmul
    reuses a kept copy if there is one and otherwise converts per call — a fraction of a percent
    of its time, and no memory kept. A trainable tensor is converted per call and stays
    differentiable.
    """
    if not isinstance(t, nn.Parameter) or autograd(t):
        return t.to(torch.bfloat16).float()
    return kept(_cache, t, lambda w: w.to(torch.bfloat16).float(), keep=rows <= SKINNY_ROWS)


def on_fp32_units(op, x: torch.Tensor, *operands) -> torch.Tensor:
    """``op(x, *operands)`` as a bf16 op computes it: ``x`` rounded to bf16, the operands already
    bf16 values held in fp32 (or None), fp32 arithmetic, the result rounded to bf16."""
    with cpu_autocast_off():
        return op(x.to(torch.bfloat16).float(), *operands).to(torch.bfloat16)


class FrozenLinear(torch.autograd.Function):
    """bf16 ``x·Wᵀ + b`` on the fp32 units for a frozen W and b. Keeps W itself (not an fp32
    copy) for the backward, which computes ``grad_x = round_bf16(grad·W)`` the same way."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = x.numel() // max(x.shape[-1], 1)
        b = None if bias is None else as_bf16_fp32(bias, rows)
        out = on_fp32_units(F.linear, x, as_bf16_fp32(weight, rows), b)
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        rows = grad.numel() // max(grad.shape[-1], 1)
        grad_x = on_fp32_units(torch.matmul, grad, as_bf16_fp32(weight, rows))
        return grad_x.to(ctx.x_dtype), None, None



def keeps_copy(t: torch.Tensor) -> bool:
    """Whether ``t`` keeps a bf16-rounded fp32 copy (:func:`as_bf16_fp32`)."""
    return t in _cache
