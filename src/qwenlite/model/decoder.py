"""The Qwen2.5 decoder: layers, the stack, and the causal-LM head (tied or untied)."""

from __future__ import annotations

import torch
from torch import nn

from qwenlite.model.attention import Attention, KVCache
from qwenlite.model.config import QwenConfig
from qwenlite.model.counting import FlopCount, linear_flops
from qwenlite.model.mlp import SwiGLU
from qwenlite.model.norm import RMSNorm
from qwenlite.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: QwenConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask=None, cache=None, cache_start=0):
        """x: (batch, n, hidden) -> (batch, n, hidden)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))

    def flops(self, n_new: int, n_cached: int = 0, masked: bool | None = None,
              gqa_as_mha: bool = False) -> FlopCount:
        d = self.input_layernorm.weight.shape[0]
        count = self.input_layernorm.flops(n_new).prefixed("input_layernorm")
        count += self.self_attn.flops(n_new, n_cached, masked, gqa_as_mha).prefixed("self_attn")
        count["residual"] = 2 * n_new * d
        count += self.post_attention_layernorm.flops(n_new).prefixed("post_attention_layernorm")
        count += self.mlp.flops(n_new).prefixed("mlp")
        return count


class QwenModel(nn.Module):
    """Embedding, decoder layers, final norm (HF ``Qwen2Model``)."""

    def __init__(self, config: QwenConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, input_ids, position_ids, mask=None, cache=None, cache_start=0):
        """input_ids, position_ids: (batch, n) -> hidden states (batch, n, hidden)."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, cache_start)
        return self.norm(x)

    def flops(self, n_new: int, n_cached: int = 0, masked: bool | None = None,
              gqa_as_mha: bool = False) -> FlopCount:
        """Embedding lookup is indexing (0 FLOPS); then every layer and the final norm."""
        count = FlopCount()
        for i, layer in enumerate(self.layers):
            count += layer.flops(n_new, n_cached, masked, gqa_as_mha).prefixed(f"layers.{i}")
        count += self.norm.flops(n_new).prefixed("norm")
        return count


def build_mask(attention_mask: torch.Tensor | None, n_new: int, cache_start: int,
               batch: int, device) -> torch.Tensor | None:
    """The bool "may attend" mask (batch, 1, n_new, cache_start + n_new), or None when plain
    causal attention (or a lone decode token over an unpadded cache) is exact.

    ``attention_mask`` is (batch, cache_start + n_new) with 1 for real tokens, 0 for padding. A
    query always may attend to itself, so rows of padding stay finite (their outputs are unused).
    """
    n_keys = cache_start + n_new
    padded = attention_mask is not None and not bool(attention_mask[:, :n_keys].all())
    if not padded and (cache_start == 0 or n_new == 1):
        return None
    q_pos = torch.arange(cache_start, n_keys, device=device)
    k_pos = torch.arange(n_keys, device=device)
    mask = k_pos[None, :] <= q_pos[:, None]
    mask = mask[None, None].expand(batch, 1, n_new, n_keys)
    if padded:
        valid = attention_mask[:, None, None, :n_keys].bool()
        mask = (mask & valid) | (k_pos[None, :] == q_pos[:, None])[None, None]
    return mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (batch, T) that count only real tokens: 0 at each sequence's first token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class QwenForCausalLM(nn.Module):
    """Qwen2.5 causal language model with HF parameter names (``model.*``, ``lm_head``).

    Call ``model(input_ids, attention_mask=None)`` for logits (batch, seq, vocab). Left padding is
    supported: positions are counted from each sequence's first real token.

    ``cache_factory`` makes the caches :meth:`new_cache` returns (called with
    :class:`KVCache`'s arguments); a backend may set its own on an instance.
    """

    cache_factory = KVCache

    def __init__(self, config: QwenConfig):
        super().__init__()
        self.config = config
        self.model = QwenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def set_attention_impl(self, impl: str) -> None:
        """``"sdpa"`` (default, fused) or ``"eager"`` (explicit operations, as counted)."""
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"unknown attention implementation {impl!r}")
        for layer in self.model.layers:
            layer.self_attn.impl = impl

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cache_start: int = 0,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Compute next-token logits.

        Args:
            input_ids: (batch, n) token ids of the new tokens.
            attention_mask: (batch, cache_start + n), 1 for tokens, 0 for padding; None = all real.
            position_ids: (batch, n); by default derived from ``attention_mask`` (or
                ``cache_start..cache_start+n``).
            cache: a :class:`KVCache` (see :meth:`new_cache`) holding ``cache_start`` tokens.
            logits_to_keep: if > 0, only the last ``logits_to_keep`` positions get logits (the LM
                head is the largest matmul of a decode step).
            return_hidden: return the final hidden states (batch, n, hidden) instead of logits.
        Returns:
            logits (batch, n or logits_to_keep, vocab).
        """
        b, n = input_ids.shape
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, cache_start:cache_start + n]
            else:
                position_ids = torch.arange(cache_start, cache_start + n,
                                            device=input_ids.device).expand(b, n)
        mask = build_mask(attention_mask, n, cache_start, b, input_ids.device)
        h = self.model(input_ids, position_ids, mask, cache, cache_start)
        if logits_to_keep:
            # Copied into the standard layout: handed the strided view, torch's CPU linear copies
            # the whole LM head weight first (one bf16 row: 568 ms against 15; torch 2.13).
            h = h[:, -logits_to_keep:].clone(memory_format=torch.contiguous_format)
        if return_hidden:
            return h
        return self.lm_head(h)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A zeroed KV cache for ``batch`` sequences of up to ``max_len`` tokens."""
        c = self.config
        return self.cache_factory(c.num_hidden_layers, batch, c.num_key_value_heads, max_len,
                                  c.head_dim, self.dtype, self.device)

    def flops(self, n_new: int, n_cached: int = 0, logits: int | None = None,
              masked: bool | None = None, gqa_as_mha: bool = False) -> FlopCount:
        """FLOPS of one sequence's forward (the training loss is counted beside it,
        :func:`qwenlite.training.loss.loss_flops`).

        Args:
            n_new: tokens computed in this call.
            n_cached: tokens already in the KV cache that they attend to.
            logits: positions that go through the LM head (default all ``n_new``).
            masked: whether attention scores get a mask added (default: ``n_new > 1``).
            gqa_as_mha: count K/V projections full-width (see :meth:`Attention.flops`).
        """
        count = self.model.flops(n_new, n_cached, masked, gqa_as_mha).prefixed("model")
        positions = n_new if logits is None else logits
        count += linear_flops(self.lm_head, positions).prefixed("lm_head")
        return count
