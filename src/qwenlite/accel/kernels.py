"""Where each matmul and attention of the accelerated model runs (:mod:`qwenlite.accel`).

:func:`linear`, :func:`linears` (projections that share an input) and :func:`attention` compute
``F.linear`` and ``F.scaled_dot_product_attention``, routed by what the call is:

* a bf16 matmul on a CPU without bf16 units: on the fp32 units (:mod:`~qwenlite.accel.emulation`);
* a decode step (at most ``SKINNY_ROWS`` rows, no autograd) on an x86-64 CPU with AVX2 and FMA:
  through the C++ kernel (:mod:`~qwenlite.accel.skinny`), which reads the weights where they are,
  bf16 or fp32, and keeps no copy; projections that share an input go in one call;
* a decode step where the kernel does not serve: through weights prepacked for oneDNN
  (:mod:`~qwenlite.accel.packing`), projections that share an input stacked into one matmul;
* anything else: torch as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks

from qwenlite.accel import autocast, flash, packing, skinny
from qwenlite.accel.emulation import (
    SKINNY_ROWS,
    FrozenLinear,
    as_bf16_fp32,
    autograd,
    cpu_autocast_off,
    emulating,
    on_fp32_units,
)


def _is_decode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A decode step's few rows (at most ``SKINNY_ROWS``) on the CPU, without autograd."""
    return (x.device.type == "cpu" and x.numel() <= SKINNY_ROWS * x.shape[-1]
            and not autograd(x, weight, bias))


def _rows_through(matmul, x: torch.Tensor, emulate: bool, width: int) -> torch.Tensor:
    """``matmul`` over ``x``'s rows as a 2-D block, as a bf16 matmul on the fp32 units if
    ``emulate``, reshaped back to ``x``'s leading dimensions with ``width`` outputs."""
    x2 = x.reshape(-1, x.shape[-1])
    out = on_fp32_units(matmul, x2) if emulate else matmul(x2)
    return out.reshape(*x.shape[:-1], width)


def _skinny(x: torch.Tensor, weights: Sequence[torch.Tensor],
            biases: Sequence[torch.Tensor | None], emulate: bool) -> list[torch.Tensor] | None:
    """``[x·Wᵀ + b ...]`` for a decode step's few rows through :mod:`skinny`'s kernel, which
    reads the weights in place: an emulated bf16 matmul over bf16 weights (``x`` rounded to bf16,
    fp32 arithmetic, bf16 results), or an fp32 one. None where the kernel does not serve: it is
    off or not built here, more than ``skinny.MAX_ROWS`` rows, other dtypes (an fp32 model under
    bf16 autocast, a CPU that runs bf16 natively), or something watching ops — a dispatch mode
    such as a FLOPS counter, a tensor subclass, compilation — that an opaque call would dodge."""
    dtype = torch.bfloat16 if emulate else torch.float32
    rows = x.numel() // max(x.shape[-1], 1)
    if (not 1 <= rows <= skinny.MAX_ROWS or weights[0].dtype != dtype
            or (not emulate and x.dtype != dtype)):
        return None
    x2 = x.reshape(rows, x.shape[-1]).to(dtype)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if (skinny.refusal(x2, weights, biases) is not None  # F.linear gives a misfit its error
            or not _plain(x, *weights, *(b for b in biases if b is not None))
            or not skinny.enabled()):
        return None
    outs = skinny.linears(x2, weights, biases, dtype, checked=True)
    return [o.reshape(*x.shape[:-1], o.shape[-1]) for o in outs]


def _decode_linear(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """``x·Wᵀ + b`` for a decode step's few rows, in fp32 (an emulated bf16 matmul rounds its
    input and output to bf16), or in bf16 through a prepacked weight on a CPU with bf16 units:
    through the decode kernel (:func:`_skinny`) where it serves, else as follows.

    A decode step streams every weight from memory for a few rows, and how fast BLAS streams it
    depends on the layout. A parameter is reordered once into oneDNN's blocked layout and kept
    (4 bytes per parameter more; 2 for bf16 kept as bf16): on a 2-core Zen 3 all of a 0.5B
    model's fp32 matmuls for 8 rows take 127 ms so, against 216 ms as BLAS runs them at best
    (``python benchmarks/bench_cpu_measures.py decode-matmuls``). Without oneDNN (or with
    ``QWENLITE_PACK_WEIGHTS=0``) widening projections (the MLP's gate and up, the LM head) run as
    ``W·xᵀ``, faster than ``x·Wᵀ`` there (1.85 vs 2.9 ms for 8 rows through 896→4864), the
    others as ``x·Wᵀ``.
    """
    bf16 = emulating(x)
    out = _skinny(x, (weight,), (bias,), bf16)
    if out is not None:
        return out[0]
    rows = x.numel() // x.shape[-1]
    if bias is not None and bf16:
        bias = as_bf16_fp32(bias, rows)
    if packing.prepackable(weight, bf16):
        packed = packing.packed_weight(weight, rows, bf16)

        def matmul(x2):
            return packing.packed_linear(x2, packed, bias)
    else:
        w = as_bf16_fp32(weight, rows) if bf16 else weight

        def matmul(x2):
            if w.shape[0] < 2 * w.shape[1]:
                return F.linear(x2, w, bias)
            out = (w @ x2.T).T.contiguous()
            return out if bias is None else out + bias
    return _rows_through(matmul, x, bf16, weight.shape[0])


def _decode_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  emulate: bool) -> bool:
    """Whether :func:`linear` computes this call with :func:`_decode_linear`: a decode step's few
    rows, in fp32, as an emulated bf16 matmul, or in bf16 where oneDNN has bf16 here (the
    prepacked layout then serves a CPU with bf16 units as it serves fp32)."""
    if not _is_decode(x, weight, bias):
        return False
    if emulate:
        return True
    if torch.is_autocast_enabled("cpu"):
        return False
    if x.dtype == weight.dtype == torch.float32:
        return True
    return x.dtype == weight.dtype == torch.bfloat16 and packing.prepackable(weight, False)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with bf16 semantics on the fp32 units where :func:`emulating`; a decode
    step's few rows on the CPU through :func:`_decode_linear`; a frozen fp32 weight under CPU
    bf16 autocast through its kept bf16 copy (:mod:`~qwenlite.accel.autocast`)."""
    emulate = emulating(x)
    if _decode_route(x, weight, bias, emulate):
        return _decode_linear(x, weight, bias)
    if not emulate:  # under CPU bf16 autocast, frozen weights from their kept bf16 copies
        return F.linear(x, autocast.bf16_copy(weight), autocast.bf16_copy(bias))
    if not autograd(weight, bias):
        return FrozenLinear.apply(x, weight, bias)
    b = None if bias is None else as_bf16_fp32(bias)
    return on_fp32_units(F.linear, x, as_bf16_fp32(weight), b)



def _observed(layer: nn.Module) -> bool:
    """Whether forward hooks watch ``layer``: its own, or global module hooks (a FLOPS counter's
    or a profiler's module tracking), which must see each layer's own call."""
    return bool(layer._forward_hooks or layer._forward_pre_hooks
                or getattr(_module_hooks, "_global_forward_hooks", None)
                or getattr(_module_hooks, "_global_forward_pre_hooks", None))


def linears(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]`` for layers that share their input (attention's q, k
    and v projections; the MLP's gate and up).

    A decode step through plain frozen :class:`Linear` layers runs as one call: of the decode
    kernel over all the weights (:func:`_skinny`), or without it one oneDNN matmul over their
    weights stacked and prepacked once (:func:`~qwenlite.accel.packing.stacked_weight`): 97 matmuls a step instead of
    169. On a 2-core Zen 3 the oneDNN way measured the model's bf16 decode step of 8 sequences at
    167.1 ms against 177.8 ms layer by layer (medians), its fp32 step 183.6 against 180.3 —
    within that VM's noise alone (``QWENLITE_WEIGHTS=DIR python benchmarks/bench_cpu_measures.py
    decode-step``). Anything else — more rows, autograd, a LoRA-wrapped layer, hooks watching
    the layers, packing off — runs layer by layer. The stacked oneDNN outputs are column slices
    of one result (views, not contiguous); the kernel's are contiguous."""
    if not all(type(layer) is Linear and not _observed(layer) for layer in layers):
        return [layer(x) for layer in layers]
    weights = [layer.weight for layer in layers]
    biases = [layer.bias for layer in layers]
    emulate = emulating(x)
    decode = all(_decode_route(x, w, b, emulate) for w, b in zip(weights, biases))
    if decode:
        out = _skinny(x, weights, biases, emulate)
        if out is not None:
            return out
    if not (decode and all(packing.prepackable(w, emulate) for w in weights)):
        return [layer(x) for layer in layers]
    packed, bias = packing.stacked_weight(weights, biases, x.numel() // x.shape[-1], emulate)
    sizes = [w.shape[0] for w in weights]
    out = _rows_through(lambda x2: packing.packed_linear(x2, packed, bias), x, emulate, sum(sizes))
    return list(out.split(sizes, dim=-1))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                      enable_gqa: bool = False) -> torch.Tensor:
    """One new query per sequence over its cached keys, with each KV head's query heads stacked
    as the query rows of one SDPA over that head's keys (no repeated keys, and a block of rows
    for SDPA's kernel instead of one). q (b, h, 1, d), k and v (b, kv, T, d), ``attn_mask`` bool
    "may attend" or additive, broadcastable to (b, 1, 1, T)."""
    b, h, _, d = q.shape
    kv = k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(b, kv, h // kv, d), k, v, attn_mask=attn_mask)
    return out.reshape(b, h, 1, d)


def _plain(*tensors: torch.Tensor) -> bool:
    """Whether an opaque kernel may compute on these tensors: plain CPU tensors, no dispatch mode
    (a FLOPS counter, a fake-tensor tracer) and no compilation or tracing that would not see it."""
    return (not torch._C._len_torch_dispatch_stack() and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and all(type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu"
                    for t in tensors))


def attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, emulate: bool,
                      kv_bf16: bool, attn_mask: torch.Tensor | None = None,
                      dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                      enable_gqa: bool = False) -> torch.Tensor | None:
    """A decode step's attention through :mod:`skinny`'s kernel, or None where it does not serve
    (it is off or not built here, an additive mask, dropout, a CPU that runs bf16 natively, a
    dispatch mode watching). An emulated bf16 model's query is rounded to bf16 and its output
    too; its keys and values are read as they are: bf16, or fp32 holding bf16 values
    (``kv_bf16``: a widened cache). fp32 keys that are not bf16 values (an fp32 model under bf16
    autocast) go to SDPA, which rounds them."""
    if is_causal or dropout_p or (attn_mask is not None and attn_mask.dtype != torch.bool):
        return None
    if emulate:
        if not (k.dtype == torch.bfloat16 or (kv_bf16 and k.dtype == torch.float32)):
            return None
        q = q.to(torch.bfloat16).float()
    elif not q.dtype == k.dtype == torch.float32:
        return None
    if not _plain(q, k, v) or not skinny.enabled():
        return None
    out = skinny.attention(q, k, v, attn_mask, q.shape[-1] ** -0.5 if scale is None else scale)
    if out is None or not emulate:
        return out
    return out.to(torch.bfloat16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_bf16: bool = False,
              **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; bf16 inputs are computed in fp32 where
    :func:`emulating` (torch's CPU bf16 attention is ~7× slower than fp32 for a decode step).

    ``kv_bf16``: ``k`` and ``v`` are fp32 tensors that hold bf16 values (a KV cache kept wide for
    emulation, :class:`~qwenlite.accel.modules.WideKVCache`), used as they are.

    A decode step on the CPU (one query per sequence, no autograd) runs through the decode
    kernel (:func:`attention_kernel`), else as :func:`decode_attention`: for 8 sequences over
    900 cached tokens, 24 layers took 16.9 ms through the kernel (12.0 over a bf16 cache), 22.5 ms
    as :func:`decode_attention`, 24.1 ms as two batched matmuls and 35.5 ms through SDPA with
    ``enable_gqa`` (``python benchmarks/bench_cpu_measures.py decode-attention``).

    A bf16 training step's causal self-attention on a CPU with AVX512-BF16 runs through
    :func:`~qwenlite.accel.flash.attention` (2.6× SDPA's forward and backward at 4×768 on a
    2-core EPYC, ``... train-attention``)."""
    emulate = emulating(q)
    if kv_bf16 and not emulate:  # emulation turned off since the cache was made
        k, v = k.to(q.dtype), v.to(q.dtype)
    decode = (q.device.type == "cpu" and q.shape[-2] == 1 and q.shape[1] % k.shape[1] == 0
              and not autograd(q, k, v))
    if decode:
        out = attention_kernel(q, k, v, emulate, kv_bf16, **kwargs)
        if out is not None:
            return out
    if not emulate and not decode:
        out = flash.attention(q, k, v, **kwargs)  # bf16 training on AVX512-BF16 CPUs
        return F.scaled_dot_product_attention(q, k, v, **kwargs) if out is None else out
    op = decode_attention if decode else F.scaled_dot_product_attention
    if not emulate:
        return op(q, k, v, **kwargs)
    bf = torch.bfloat16
    if not kv_bf16:
        k, v = k.to(bf).float(), v.to(bf).float()
    with cpu_autocast_off():
        out = op(q.to(bf).float(), k, v, **kwargs)
    return out.to(bf)


class Linear(nn.Linear):
    """``nn.Linear`` whose bf16 matmuls go through :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
