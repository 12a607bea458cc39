"""bf16 matmuls on CPUs without bf16 arithmetic, computed exactly on the fp32 units.

A bf16 GEMM (what a GPU's tensor cores, AMX or AVX512-BF16 do) multiplies bf16 inputs, adds the
products in fp32 and rounds the result to bf16. A product of two bf16 numbers (8-bit
significands) is exact in fp32 (24-bit significand), so the same arithmetic can run as an fp32
GEMM over bf16 values: ``round_bf16(fp32(x) @ fp32(W)ᵀ)``. The only difference from a bf16 unit is
the order of the fp32 additions, as between any two GEMM libraries.

This matters on x86 CPUs without AVX512-BF16/AMX (most laptops, AMD Zen 2/3): there torch falls
back to a generic bf16 loop that runs ~6× slower than fp32 BLAS (measured: ~20 vs ~125 GFLOPS
on a 2-core Zen 3). In the default ``auto`` mode qwenlite computes every bf16 matmul on such a
CPU this way — ``Linear`` layers, attention, the LM head and the fused loss, both for a bf16
model and under bf16 autocast — so a bf16 model runs at fp32 speed with bf16 results. Wide
matmuls (prefill, training) convert per call and keep nothing.

Decode steps, in fp32 and in bf16 alike, are a different problem: a few rows through every
weight, so their speed is how fast the weights stream through the FMA units. On an x86-64 CPU
with AVX2 and FMA they run through :mod:`skinny`'s C++ kernel (:func:`_skinny`,
:func:`_attention_kernel`), which reads the weights where they are, bf16 or fp32, and keeps no
copy; projections that share an input (q/k/v, gate/up) go in one call. Where the kernel is not
built, or on a CPU that runs bf16 natively, a frozen parameter instead keeps a copy of its
(bf16-rounded) values in fp32, reordered once into oneDNN's blocked layout, which streams fastest
of torch's ways (:func:`_decode_linear`); that costs 4 more bytes per parameter while generating
(2 on a CPU that runs bf16 natively, where the copy stays bf16), and projections that share an
input keep one such copy of their weights stacked and run as one matmul (:func:`linears`).
``QWENLITE_PACK_WEIGHTS=0`` keeps plain fp32 copies instead (emulated bf16 models; others keep
none). :func:`clear_packed_weights` frees them all.

``QWENLITE_BF16_MATMUL=native`` (or :func:`set_bf16_matmul`) turns emulation off; ``emulate``
forces it on any CPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks
from torch.utils.weak import WeakTensorKeyDictionary

from qwenlite.model import skinny

ENV = "QWENLITE_BF16_MATMUL"
MODES = ("auto", "native", "emulate")

_mode: str | None = None
_cache = WeakTensorKeyDictionary()


@functools.cache
def cpu_lacks_bf16() -> bool:
    """True on an x86 Linux CPU with AVX2 but without AVX512-BF16/AMX-BF16."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx2" in flags and "avx512_bf16" not in flags and "amx_bf16" not in flags


def set_bf16_matmul(mode: str | None) -> None:
    """Choose how bf16 matmuls run on the CPU: ``auto`` (emulate where the CPU lacks bf16),
    ``native`` (torch's bf16 kernels) or ``emulate``; ``None`` re-reads ``$QWENLITE_BF16_MATMUL``."""
    global _mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"bf16 matmul mode must be one of {', '.join(MODES)}, got {mode!r}")
    _mode = mode


def bf16_matmul_mode() -> str:
    """``native`` or ``emulate``: how a bf16 matmul on the CPU is computed now."""
    mode = _mode if _mode is not None else os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"${ENV} must be one of {', '.join(MODES)}, got {mode!r}")
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


def _cpu_autocast_off():
    """A context that turns CPU autocast off for exact fp32 arithmetic; a no-op context when it is
    off already (entering ``torch.autocast`` costs Python time on every one of a decode step's
    ~100 matmuls and 24 attentions)."""
    return torch.autocast("cpu", enabled=False) if torch.is_autocast_enabled("cpu") else _NO_CONTEXT


def _autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether an op on these tensors is recorded for a backward pass."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _kept(store: WeakTensorKeyDictionary, t: nn.Parameter, make, keep: bool = True,
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
    if not isinstance(t, nn.Parameter) or _autograd(t):
        return t.to(torch.bfloat16).float()
    return _kept(_cache, t, lambda w: w.to(torch.bfloat16).float(), keep=rows <= SKINNY_ROWS)


def _on_fp32_units(op, x: torch.Tensor, *operands) -> torch.Tensor:
    """``op(x, *operands)`` as a bf16 op computes it: ``x`` rounded to bf16, the operands already
    bf16 values held in fp32 (or None), fp32 arithmetic, the result rounded to bf16."""
    with _cpu_autocast_off():
        return op(x.to(torch.bfloat16).float(), *operands).to(torch.bfloat16)


class _FrozenLinear(torch.autograd.Function):
    """bf16 ``x·Wᵀ + b`` on the fp32 units for a frozen W and b. Keeps W itself (not an fp32
    copy) for the backward, which computes ``grad_x = round_bf16(grad·W)`` the same way."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = x.numel() // max(x.shape[-1], 1)
        b = None if bias is None else as_bf16_fp32(bias, rows)
        out = _on_fp32_units(F.linear, x, as_bf16_fp32(weight, rows), b)
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        rows = grad.numel() // max(grad.shape[-1], 1)
        grad_x = _on_fp32_units(torch.matmul, grad, as_bf16_fp32(weight, rows))
        return grad_x.to(ctx.x_dtype), None, None


PACK_ENV = "QWENLITE_PACK_WEIGHTS"
_packed = WeakTensorKeyDictionary()
_stacked = WeakTensorKeyDictionary()


def _pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` (out, in) reordered into oneDNN's blocked layout for ``rows`` input rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """``x·Wᵀ + b`` through a weight made by :func:`_pack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def _onednn_linear(dtype: torch.dtype = torch.float32) -> bool:
    """Whether torch has oneDNN's prepacked linear here for ``dtype`` and it computes
    ``F.linear``, with and without a bias, for the hinted number of rows and others (bf16 needs
    a CPU that oneDNN runs bf16 on — AVX512BW/VL/DQ, AVX512-BF16, AMX or AVX-NE-CONVERT; it
    raises on others). Checked outside any dispatch mode (a FLOPS counter must not see the
    check) and without the RNG."""
    try:
        from torch.utils._python_dispatch import _disable_current_modes
    except ImportError:  # pragma: no cover - older torch
        _disable_current_modes = contextlib.nullcontext
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    try:
        with _disable_current_modes(), torch.inference_mode(False), torch.no_grad():
            w = torch.arange(24 * 16, dtype=torch.float32).reshape(24, 16).sin().to(dtype)
            b = torch.arange(24, dtype=torch.float32).cos().to(dtype)
            packed = _pack(w, 8)
            for rows, bias in ((8, None), (3, b), (1, b)):  # the hinted rows and others
                x = torch.arange(rows * 16, dtype=torch.float32).reshape(rows, 16).cos().to(dtype)
                out = _packed_linear(x, packed, bias)
                expected = F.linear(x.float(), w.float(), None if bias is None else bias.float())
                if out.dtype != dtype or not torch.allclose(out.float(), expected, **tol):
                    return False
            return True
    except (AttributeError, RuntimeError):
        return False


def packing_enabled(dtype: torch.dtype = torch.float32) -> bool:
    """Whether decode steps use weights prepacked in ``dtype``: ``$QWENLITE_PACK_WEIGHTS`` is not
    ``0`` and torch has oneDNN's linear for it here."""
    return os.environ.get(PACK_ENV, "1").strip() != "0" and _onednn_linear(dtype)


def clear_packed_weights() -> None:
    """Free every prepacked decode weight (they are made again on the next decode step)."""
    _packed.clear()
    _stacked.clear()


def _packed_weight(weight: nn.Parameter, rows: int, bf16: bool) -> torch.Tensor:
    """``weight`` (rounded to bf16 and held in fp32 if ``bf16``, i.e. emulating; else in its own
    dtype) reordered once into oneDNN's blocked layout; refreshed when the parameter changes in
    place (e.g. by a LoRA merge)."""
    def make(w):
        w = w.to(torch.bfloat16).float() if bf16 else w
        return _pack(w.contiguous(), rows)
    return _kept(_packed, weight, make, tag=bf16)


def _prepackable(weight: torch.Tensor, emulate: bool) -> bool:
    """Whether a decode step keeps ``weight`` prepacked: a frozen parameter, and packing on for
    the dtype the copy holds (fp32 when emulating)."""
    dtype = torch.float32 if emulate else weight.dtype
    return (isinstance(weight, nn.Parameter) and not weight.requires_grad
            and packing_enabled(dtype))


def _is_decode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A decode step's few rows (at most ``SKINNY_ROWS``) on the CPU, without autograd."""
    return (x.device.type == "cpu" and x.numel() <= SKINNY_ROWS * x.shape[-1]
            and not _autograd(x, weight, bias))


def _rows_through(matmul, x: torch.Tensor, emulate: bool, width: int) -> torch.Tensor:
    """``matmul`` over ``x``'s rows as a 2-D block, as a bf16 matmul on the fp32 units if
    ``emulate``, reshaped back to ``x``'s leading dimensions with ``width`` outputs."""
    x2 = x.reshape(-1, x.shape[-1])
    out = _on_fp32_units(matmul, x2) if emulate else matmul(x2)
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
    if _prepackable(weight, bf16):
        packed = _packed_weight(weight, rows, bf16)

        def matmul(x2):
            return _packed_linear(x2, packed, bias)
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
    return x.dtype == weight.dtype == torch.bfloat16 and _prepackable(weight, False)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with bf16 semantics on the fp32 units where :func:`emulating`; a decode
    step's few rows on the CPU through :func:`_decode_linear`."""
    emulate = emulating(x)
    if _decode_route(x, weight, bias, emulate):
        return _decode_linear(x, weight, bias)
    if not emulate:
        return F.linear(x, weight, bias)
    if not _autograd(weight, bias):
        return _FrozenLinear.apply(x, weight, bias)
    b = None if bias is None else as_bf16_fp32(bias)
    return _on_fp32_units(F.linear, x, as_bf16_fp32(weight), b)


def _stacked_weight(weights: Sequence[nn.Parameter], biases: Sequence[torch.Tensor | None],
                    rows: int, bf16: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weights`` stacked along their outputs (rounded to bf16 and held in fp32 if ``bf16``,
    i.e. emulating) and prepacked like :func:`_packed_weight`, with their biases stacked the
    same way (a missing bias stands as zeros; None if all are missing). Kept under the first
    weight and made anew when any of the tensors changes in place; making it frees the layers'
    own prepacked copies (a decode step that once ran them one by one — under a FLOPS counter,
    say — would otherwise keep both)."""
    rest = [*weights[1:], *(b for b in biases if b is not None)]
    versions = tuple((t.data_ptr(), t._version) for t in rest)

    def make(w0):
        w = torch.cat([w0, *(w.detach() for w in weights[1:])])
        b = None
        if any(b is not None for b in biases):
            b = torch.cat([torch.zeros(w_.shape[0], dtype=w.dtype, device=w.device) if b_ is None
                           else b_.detach().to(w.dtype) for w_, b_ in zip(weights, biases)])
        if bf16:
            w = w.to(torch.bfloat16).float()
            b = None if b is None else b.to(torch.bfloat16).float()
        for weight in weights:
            _packed.pop(weight, None)
        return _pack(w.contiguous(), rows), b
    return _kept(_stacked, weights[0], make, tag=(bf16, versions))


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
    weights stacked and prepacked once (:func:`_stacked_weight`): 97 matmuls a step instead of
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
    if not (decode and all(_prepackable(w, emulate) for w in weights)):
        return [layer(x) for layer in layers]
    packed, bias = _stacked_weight(weights, biases, x.numel() // x.shape[-1], emulate)
    sizes = [w.shape[0] for w in weights]
    out = _rows_through(lambda x2: _packed_linear(x2, packed, bias), x, emulate, sum(sizes))
    return list(out.split(sizes, dim=-1))


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
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


def _attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, emulate: bool,
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
    emulation, :class:`~qwenlite.model.attention.KVCache`), used as they are.

    A decode step on the CPU (one query per sequence, no autograd) runs through the decode
    kernel (:func:`_attention_kernel`), else as :func:`_decode_attention`: for 8 sequences over
    900 cached tokens, 24 layers took 16.9 ms through the kernel (12.0 over a bf16 cache), 22.5 ms
    as :func:`_decode_attention`, 24.1 ms as two batched matmuls and 35.5 ms through SDPA with
    ``enable_gqa`` (``python benchmarks/bench_cpu_measures.py decode-attention``)."""
    emulate = emulating(q)
    if kv_bf16 and not emulate:  # emulation turned off since the cache was made
        k, v = k.to(q.dtype), v.to(q.dtype)
    decode = (q.device.type == "cpu" and q.shape[-2] == 1 and q.shape[1] % k.shape[1] == 0
              and not _autograd(q, k, v))
    if decode:
        out = _attention_kernel(q, k, v, emulate, kv_bf16, **kwargs)
        if out is not None:
            return out
    if not emulate and not decode:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    op = _decode_attention if decode else F.scaled_dot_product_attention
    if not emulate:
        return op(q, k, v, **kwargs)
    bf = torch.bfloat16
    if not kv_bf16:
        k, v = k.to(bf).float(), v.to(bf).float()
    with _cpu_autocast_off():
        out = op(q.to(bf).float(), k, v, **kwargs)
    return out.to(bf)


class Linear(nn.Linear):
    """``nn.Linear`` whose bf16 matmuls go through :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
