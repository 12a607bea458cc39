"""SwiGLU's gating and RMSNorm in one pass each, forward and backward (``elementwise.cpp``).

A LoRA step at 4×512 tokens runs SwiGLU's ``silu(g)·u`` over 24 × (2048 × 4864) bf16 values and
49 RMSNorms over (2048 × 896) fp32 ones. torch takes two passes for the first forward and four
backward, and a dozen for RMSNorm's backward: on a 2-core Xeon with AMX, 39 ms a layer for the
gating and 13 ms a norm, forward and backward (``python benchmarks/profile_train.py``), about a
fifth of a bf16 step. The kernels here take one pass each, with torch's roundings
(``elementwise.cpp``); SwiGLU's forward stays torch's (:func:`swiglu`).

:func:`swiglu` (bf16) and :func:`rms_norm` (fp32, a frozen weight) return None for what they do
not take — other dtypes, strided tensors, a trainable norm weight, a dispatch mode watching (a
FLOPS counter), a machine where the library is not built — and the caller runs torch's ops.
"""

from __future__ import annotations

import torch

from qwenlite.accel import skinny
from qwenlite.accel.kernels import _plain

BF16 = torch.bfloat16


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)  # not silu(gate): the backward recomputes it
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad = grad.to(BF16).contiguous()
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        skinny.library().swiglu_bwd(gate.data_ptr(), up.data_ptr(), grad.data_ptr(),
                                    d_gate.data_ptr(), d_up.data_ptr(), gate.numel(),
                                    torch.get_num_threads())
        return d_gate, d_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``F.silu(gate) * up`` for contiguous bf16 CPU tensors of one shape that autograd
    tracks, with the backward through the kernel; None where it does not serve. The forward is
    torch's: on the AMX Xeon its two AVX-512 passes took 6.6 ms for 2048 × 4864 values, the AVX2
    kernel's one 9.5 ms (so no forward kernel is kept); the backward kernel took 11.8 ms where
    torch's forward and backward took 29.1."""
    if (gate.dtype != BF16 or up.dtype != BF16 or gate.shape != up.shape
            or not gate.is_contiguous() or not up.is_contiguous() or gate.device.type != "cpu"
            or not _plain(gate, up) or skinny.library() is None):
        return None
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return None  # forward only: torch's two AVX-512 passes beat the AVX2 kernel's one
    return _SwiGLU.apply(gate, up)


def _norm_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float):
    y = torch.empty_like(x2)
    r = torch.empty(x2.shape[0], dtype=torch.float32)
    skinny.library().rmsnorm_fwd(x2.data_ptr(), weight.data_ptr(), y.data_ptr(), r.data_ptr(),
                                 x2.shape[0], x2.shape[1], eps, torch.get_num_threads())
    return y, r


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, eps):
        y, r = _norm_forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, r)
        return y

    @staticmethod
    def backward(ctx, grad):
        x2, weight, r = ctx.saved_tensors
        grad = grad.to(torch.float32).contiguous()
        dx = torch.empty_like(x2)
        skinny.library().rmsnorm_bwd(x2.data_ptr(), weight.data_ptr(), r.data_ptr(),
                                     grad.data_ptr(), dx.data_ptr(), x2.shape[0], x2.shape[1],
                                     torch.get_num_threads())
        return dx, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """:class:`~qwenlite.model.norm.RMSNorm`'s forward for fp32 CPU ``x`` (..., d) and a frozen
    contiguous fp32 ``weight`` (d,), through the kernel (differentiable in ``x``); None where it
    does not serve."""
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu"
            or weight.dim() != 1 or x.shape[-1] != weight.shape[0] or x.numel() == 0
            or not weight.is_contiguous() or not _plain(x, weight)
            or (weight.requires_grad and torch.is_grad_enabled())
            or skinny.library() is None):
        return None
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if torch.is_grad_enabled() and x.requires_grad:
        y = _RMSNorm.apply(x2, weight, float(eps))
    else:
        y = _norm_forward(x2, weight, float(eps))[0]
    return y.view(x.shape)


def self_check(lib) -> bool:
    """The kernels against torch's ops in float64 (called by :mod:`skinny` before the library
    serves): SwiGLU's backward in bf16 over a length with a tail, RMSNorm forward and
    backward over rows with a tail."""
    gen = torch.Generator().manual_seed(3)
    n = 8 * 5 + 3
    g = (3 * torch.randn(n, generator=gen)).to(BF16)
    u = torch.randn(n, generator=gen).to(BF16)
    dy = torch.randn(n, generator=gen).to(BF16)
    dg, du = torch.empty(n, dtype=BF16), torch.empty(n, dtype=BF16)
    lib.swiglu_bwd(g.data_ptr(), u.data_ptr(), dy.data_ptr(), dg.data_ptr(), du.data_ptr(), n, 1)
    with torch.enable_grad():  # the caller checks under no_grad
        gd = g.double().requires_grad_(True)
        ud = u.double().requires_grad_(True)
        ref = torch.nn.functional.silu(gd) * ud
        ref_dg, ref_du = torch.autograd.grad(ref, (gd, ud), dy.double())
    close = dict(rtol=2e-2, atol=1e-2)
    if not (torch.allclose(dg.double(), ref_dg, **close)
            and torch.allclose(du.double(), ref_du, **close)):
        return False
    rows, d = 3, 8 * 4 + 5
    x = torch.randn(rows, d, generator=gen)
    w = torch.randn(d, generator=gen)
    dy = torch.randn(rows, d, generator=gen)
    y, r, dx = torch.empty(rows, d), torch.empty(rows), torch.empty(rows, d)
    lib.rmsnorm_fwd(x.data_ptr(), w.data_ptr(), y.data_ptr(), r.data_ptr(), rows, d, 1e-6, 1)
    lib.rmsnorm_bwd(x.data_ptr(), w.data_ptr(), r.data_ptr(), dy.data_ptr(), dx.data_ptr(),
                    rows, d, 1)
    with torch.enable_grad():
        xd = x.double().requires_grad_(True)
        ref = w.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
        (ref_dx,) = torch.autograd.grad(ref, xd, dy.double())
    return (torch.allclose(y.double(), ref.detach(), rtol=1e-5, atol=1e-6)
            and torch.allclose(dx.double(), ref_dx, rtol=1e-4, atol=1e-5))
