"""The seam: accelerated subclasses of the model's modules, swapped in after loading.

:mod:`qwenlite.model` defines the steps a backend may override — :meth:`Attention.project_qkv
<qwenlite.model.attention.Attention.project_qkv>`, :meth:`Attention.attend
<qwenlite.model.attention.Attention.attend>`, :meth:`SwiGLU.project_gate_up
<qwenlite.model.mlp.SwiGLU.project_gate_up>` and :meth:`~qwenlite.model.mlp.SwiGLU.gate_values`,
``RMSNorm.forward``, ``nn.Linear.forward`` and the model's
``cache_factory`` — and never imports this package. :func:`apply` swaps each module's class for
the subclass here (they add no state, so parameters, state dicts and hooks are untouched) and
sets the cache factory; :func:`remove` swaps them back.
"""

from __future__ import annotations

import torch
from torch import nn

from qwenlite.accel import autocast, fused, kernels, packing, skinny
from qwenlite.accel.emulation import bf16_matmul_mode
from qwenlite.accel.kernels import Linear
from qwenlite.model.attention import Attention, KVCache
from qwenlite.model.decoder import QwenForCausalLM
from qwenlite.model.mlp import SwiGLU
from qwenlite.model.norm import RMSNorm


class WideKVCache(KVCache):
    """A bf16 model's keys and values held in fp32 buffers (exactly: widening bf16 to fp32 loses
    nothing), for attention emulated on the fp32 units, which would otherwise widen the whole
    cache at every decode step (see :func:`new_cache`)."""

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__(n_layers, batch, n_kv_heads, max_len, head_dim, torch.float32, device)


def new_cache(n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
              dtype: torch.dtype, device: torch.device | str) -> KVCache:
    """The accelerated model's cache factory.

    A bf16 model whose matmuls are emulated on the fp32 units keeps its keys and values in bf16
    where the decode kernel (:mod:`~qwenlite.accel.skinny`) runs its attention, which reads them
    as they are: for 8 sequences × 900 cached tokens, 24 layers took 12.0 ms so against 16.9 ms
    over an fp32 cache (``python benchmarks/bench_cpu_measures.py decode-attention``). Without
    the kernel it keeps them in fp32 (:class:`WideKVCache`: the same bf16 values, twice the
    memory), so that SDPA reads them as they are instead of widening the whole cache at every
    decode step: that widening took 5.1–7.6 ms of a step at 8 × 900 tokens and 1.8–2.5 ms at 250
    (same benchmark)."""
    wide = (dtype == torch.bfloat16 and torch.device(device).type == "cpu"
            and bf16_matmul_mode() == "emulate" and not skinny.enabled())
    factory = WideKVCache if wide else KVCache
    return factory(n_layers, batch, n_kv_heads, max_len, head_dim, dtype, device)


class AcceleratedAttention(Attention):
    """q, k and v projected in one call and attention routed by :mod:`~qwenlite.accel.kernels`."""

    def project_qkv(self, x):
        return kernels.linears(x, (self.q_proj, self.k_proj, self.v_proj))

    def attend(self, q, k, v, mask, causal, cache=None):
        if self.impl == "eager":
            return super().attend(q, k, v, mask, causal, cache)
        return kernels.attention(q, k, v, attn_mask=mask, is_causal=causal,
                                 enable_gqa=self.n_kv_heads != self.n_heads,
                                 kv_bf16=isinstance(cache, WideKVCache))


class AcceleratedSwiGLU(SwiGLU):
    """Gate and up projected in one call (:func:`~qwenlite.accel.kernels.linears`), the bf16
    gating in one pass each way (:func:`~qwenlite.accel.fused.swiglu`)."""

    def project_gate_up(self, x):
        return kernels.linears(x, (self.gate_proj, self.up_proj))

    def gate_values(self, gate, up):
        out = fused.swiglu(gate, up)
        return super().gate_values(gate, up) if out is None else out


class AcceleratedRMSNorm(RMSNorm):
    """An fp32 norm with a frozen weight in one pass each way
    (:func:`~qwenlite.accel.fused.rms_norm`)."""

    def forward(self, x):
        out = fused.rms_norm(x, self.weight, self.eps)
        return super().forward(x) if out is None else out


#: plain class -> accelerated subclass
SWAPS: dict[type, type] = {nn.Linear: Linear, Attention: AcceleratedAttention,
                           SwiGLU: AcceleratedSwiGLU, RMSNorm: AcceleratedRMSNorm}
_PLAIN = {fast: plain for plain, fast in SWAPS.items()}


def apply(model: nn.Module) -> nn.Module:
    """Accelerate ``model`` in place (and return it): every plain ``nn.Linear``, attention and
    MLP module gets its accelerated class, a :class:`~qwenlite.model.QwenForCausalLM` the cache
    factory :func:`new_cache`. LoRA wrappers keep theirs and their inner layers are swapped too.
    Same parameters, same values computed (to float rounding); idempotent."""
    for module in model.modules():
        fast = SWAPS.get(type(module))
        if fast is not None:
            module.__class__ = fast
        if isinstance(module, QwenForCausalLM):
            module.cache_factory = new_cache
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the plain reference model again, in place (and returned)."""
    packing.clear_packed_weights()  # copies of weights a plain model no longer uses
    autocast.clear()
    for module in model.modules():
        plain = _PLAIN.get(type(module))
        if plain is not None:
            module.__class__ = plain
        if isinstance(module, QwenForCausalLM) and "cache_factory" in vars(module):
            del module.cache_factory
    return model


def is_accelerated(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs an accelerated class."""
    return any(type(m) in _PLAIN for m in model.modules())


def for_device(model: nn.Module) -> nn.Module:
    """:func:`apply` where it helps — a model on the CPU — and ``model`` as it is elsewhere (on a
    GPU every call would go to torch's own kernels anyway)."""
    first = next(model.parameters(), None)
    if first is not None and first.device.type == "cpu":
        apply(model)
    return model
