"""Causal attention for bf16 training through ``attention_bf16.cpp``, forward and backward.

A bf16 LoRA step at 4×768 on a 2-core AVX512-BF16 EPYC spent 3.6 s of 21.7 in torch's CPU flash
attention (1.2 s forward, 2.4 s backward; ``python benchmarks/profile_train.py --dtype bf16
--seq 768``). For one layer, torch's forward and backward took 149 ms where the seven matmuls
they consist of, each at torch's own rate for its shape and over the causal half only, take 49
(``python benchmarks/bench_cpu_measures.py train-attention``). The kernel computes the same
thing as torch's (scores as fp32 sums of bf16 products, softmax in fp32, bf16 probabilities
times V, the backward from the saved log-sum-exp) in larger blocks: 32 query tokens of all the
query heads of a KV head against every key they may see, with AVX512-BF16's dot products.

:func:`attention` serves a causal self-attention whose gradient autograd will want, on bf16
(or, under bf16 autocast, fp32) CPU tensors, head size 64 and a multiple of 32 tokens, on a CPU
with AVX512-BF16 where the library is built and passed :func:`self_check`; elsewhere it returns
None and the caller runs SDPA. It is measured on 2 threads: under ``auto`` it also leaves to SDPA
a call with fewer (sequence, KV head) pairs than threads, which its backward would leave idle.
NaN scores give NaN outputs (and losses), as SDPA's do. ``$QWENLITE_TRAIN_ATTENTION`` (:mod:`~qwenlite.accel.settings`):
``0`` off, ``1`` on wherever it runs, ``auto`` (the default) on where the CPU has AVX512-BF16
and no AMX — on AMX torch's kernel runs on the tile units, and this one was not measured there.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.autograd.function import once_differentiable

from qwenlite.accel import settings, skinny
from qwenlite.accel.emulation import autograd

BF16 = torch.bfloat16
BLOCK = 32  # query tokens per block (attention_bf16.cpp's TB); T must be a multiple
HEAD = 64  # the head size the kernel is written for


def _forward(lib, q, k, v, scale):
    b, h, t, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, h, t, dtype=torch.float32)
    rc = lib.attention_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                           lse.data_ptr(), b, h, k.shape[1], t, scale, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"qwenlite_attention_fwd failed ({rc})")
    return out, lse


def _backward(lib, q, k, v, out, lse, grad, scale):
    b, h, t, _ = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    rc = lib.attention_bwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                           lse.data_ptr(), grad.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                           dv.data_ptr(), b, h, k.shape[1], t, scale, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"qwenlite_attention_bwd failed ({rc})")
    return dq, dk, dv


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = _forward(skinny.library(), q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable  # a second derivative raises, as SDPA's does, instead of being 0
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(skinny.library(), q, k, v, out, lse,
                               grad.to(BF16).contiguous(), ctx.scale)
        return dq, dk, dv, None


def cpu_serves() -> bool:
    """Whether this CPU runs the kernel by the setting: AVX512-BF16 (and, for ``auto``, no
    AMX)."""
    mode = settings.current().train_attention
    flags = skinny.cpu_flags()
    if mode == "0" or "avx512_bf16" not in flags:
        return False
    return mode == "1" or "amx_bf16" not in flags


def _enough_work(pairs: int) -> bool:
    """Whether a call's (sequence, KV head) pairs keep the threads busy, as ``auto`` wants: the
    backward splits its work by them (a training batch of 4 over 2 KV heads: 8), and it was
    measured on 2 threads only. ``1`` serves every call."""
    return settings.current().train_attention == "1" or pairs >= torch.get_num_threads()


@functools.cache
def available() -> bool:
    """Whether :func:`attention` runs here: the CPU serves, the library is built, and the
    kernel passed :func:`self_check` (once a process)."""
    if not cpu_serves():
        return False
    lib = skinny.library()
    if lib is None:
        return False
    from torch.utils._python_dispatch import _disable_current_modes
    with (_disable_current_modes(), torch.inference_mode(False), torch.enable_grad(),
          torch.autocast("cpu", enabled=False), torch.device("cpu")):
        try:
            ok = self_check(lib)
        except RuntimeError as e:  # the kernel declined (3: a compiler without AVX512-BF16)
            ok, why = False, str(e)
        else:
            why = "it failed its check against SDPA"
    if not ok:
        warnings.warn(f"bf16 training's attention runs through SDPA: the AVX512-BF16 kernel "
                      f"does not serve here ({why})", stacklevel=2)
    return ok


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> torch.Tensor | None:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=...)`` through the
    kernel, or None where it does not serve (see the module's docstring). q (b, h, T, 64), k and
    v (b, kv, T, 64) with kv dividing h; bf16, or fp32 under CPU bf16 autocast (cast to bf16 as
    autocast casts SDPA's inputs). The output is bf16."""
    from qwenlite.accel.kernels import _plain

    if (not is_causal or attn_mask is not None or dropout_p or q.dim() != 4 or k.dim() != 4
            or q.shape[-1] != HEAD or k.shape[-1] != HEAD or q.shape[-2] % BLOCK
            or k.shape[-2] != q.shape[-2] or k.shape != v.shape or k.shape[0] != q.shape[0]
            or not k.shape[1] or q.shape[1] % k.shape[1]
            or (q.shape[1] != k.shape[1] and not enable_gqa)
            or not autograd(q, k, v)
            or not _plain(q, k, v) or not _enough_work(q.shape[0] * k.shape[1])):
        return None
    if torch.is_autocast_enabled("cpu"):  # SDPA would run in the autocast dtype
        if torch.get_autocast_dtype("cpu") != BF16:
            return None
        if not all(t.dtype in (BF16, torch.float32) for t in (q, k, v)):
            return None
    elif not all(t.dtype == BF16 for t in (q, k, v)):
        return None
    if not available():
        return None
    q, k, v = (t.to(BF16).contiguous() for t in (q, k, v))
    with torch.autocast("cpu", enabled=False):
        return _CausalAttention.apply(q, k, v, HEAD ** -0.5 if scale is None else scale)


def self_check(lib) -> bool:
    """The kernel against SDPA in float64 on bf16 inputs: outputs and the three gradients,
    grouped and plain heads, one and several blocks."""
    gen = torch.Generator().manual_seed(3)
    for b, h, kv, t in ((2, 6, 2, 64), (1, 2, 2, 32), (1, 7, 1, 96)):
        q = torch.randn(b, h, t, HEAD, generator=gen).to(BF16)
        k = torch.randn(b, kv, t, HEAD, generator=gen).to(BF16)
        v = torch.randn(b, kv, t, HEAD, generator=gen).to(BF16)
        grad = torch.randn(b, h, t, HEAD, generator=gen).to(BF16)
        scale = HEAD ** -0.5
        out, lse = _forward(lib, q, k, v, scale)
        dq, dk, dv = _backward(lib, q, k, v, out, lse, grad, scale)
        ref = [x.double().requires_grad_() for x in (q, k, v)]
        ref_out = torch.nn.functional.scaled_dot_product_attention(
            *ref, is_causal=True, enable_gqa=h != kv)
        ref_out.backward(grad.double())
        for mine, theirs in zip((out, dq, dk, dv), (ref_out, *(x.grad for x in ref))):
            err = (mine.double() - theirs.detach()).abs().max().item()
            if not err <= 0.02 * theirs.abs().max().item() + 1e-3:  # bf16 roundings
                return False
    return True
