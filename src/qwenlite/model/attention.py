"""Grouped-query attention (Ainslie et al., 2023) with rotary positions and a static KV cache."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from qwenlite.model.counting import EXP, FlopCount, linear_flops, matmul_flops
from qwenlite.model.rope import RotaryEmbedding


class KVCache:
    """Preallocated keys and values for every layer, written in place at a position.

    All sequences of a batch share the cache positions (prompts are left-padded); padding is
    handled by the attention mask and the per-sequence position ids.

    Args:
        n_layers, batch, n_kv_heads, max_len, head_dim: buffer shape
            ``(n_layers, batch, n_kv_heads, max_len, head_dim)`` for keys and for values.
        dtype: the keys' and values' dtype.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v: (batch, kv_heads, n, head_dim) at ``start``; return keys/values 0..start+n."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: position {end} > capacity {self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def window(self, row: int, offset: int) -> KVCache:
        """Sequence ``row`` of the cache from position ``offset`` on, as a one-sequence cache
        that shares this one's memory: a prompt prefilled through it with ``cache_start=0`` (plain
        causal attention, no mask) lands where the left-padded batch expects it."""
        view = copy.copy(self)
        view.k = self.k[:, row:row + 1, :, offset:]
        view.v = self.v[:, row:row + 1, :, offset:]
        view.max_len = self.max_len - offset
        return view


class Attention(nn.Module):
    """Multi-head self-attention with ``num_key_value_heads`` shared K/V heads.

    q/k/v projections carry a bias, the output projection does not (Qwen2). ``impl="sdpa"`` uses
    :func:`torch.nn.functional.scaled_dot_product_attention`; ``impl="eager"`` spells out the
    operations that :meth:`flops` counts (scores, scale, mask, softmax, weighted values), which
    lets tests check the count against an operation counter.

    :meth:`project_qkv` and :meth:`attend` are the two steps a backend may override (a subclass
    swapped in after loading, as :mod:`qwenlite.accel` does); they compute the same values.
    """

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.impl = "sdpa"

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        """Attend.

        Args:
            x: (batch, n, hidden) hidden states of the new tokens.
            cos, sin: (batch, 1, n, head_dim) rotary tables for their positions.
            mask: None for plain causal attention over the new tokens (or a single new token
                attending to its whole cache), else a bool (batch, 1, n, n_keys) "may attend".
            cache: KV cache to write into and read from, with the new tokens at ``cache_start``.
        Returns:
            (batch, n, hidden).
        """
        b, n, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = RotaryEmbedding.apply(q, cos, sin)
        k = RotaryEmbedding.apply(k, cos, sin)
        source = None
        if cache is not None:
            k_all, v_all = cache.update(self.layer_idx, cache_start, k, v)
            if cache_start:  # a prefill attends to its own fresh (contiguous) keys and values
                k, v, source = k_all, v_all, cache
        out = self.attend(q, k, v, mask, causal=mask is None and n > 1, cache=source)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (batch, n, hidden) -> q (batch, n, heads·head_dim), k and v (batch, n,
        kv_heads·head_dim)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, causal: bool,
               cache: KVCache | None = None) -> torch.Tensor:
        """softmax(q·kᵀ/√d + mask)·v for q (batch, heads, n, head_dim) and k, v (batch, kv_heads,
        m, head_dim): (batch, heads, n, head_dim). ``cache`` is the cache ``k`` and ``v`` were
        read from (None: they are this call's own), for a backend that stores them its way."""
        if self.impl == "eager":
            return self._eager(q, k, v, mask, causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=self.n_kv_heads != self.n_heads)

    def _eager(self, q, k, v, mask, causal):
        k, v = k.to(q.dtype), v.to(q.dtype)  # a backend's cache may hold them wider
        groups = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        if causal:
            n, m = scores.shape[-2:]
            mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=scores.dtype, device=q.device)
            bias.masked_fill_(~mask, torch.finfo(scores.dtype).min)
            scores = scores + bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)

    def flops(self, n_new: int, n_cached: int = 0, masked: bool | None = None,
              gqa_as_mha: bool = False) -> FlopCount:
        """FLOPS for ``n_new`` tokens of one sequence attending to themselves and ``n_cached``
        earlier tokens.

        GQA reading: projections use the module's real shapes (k/v project to
        ``n_kv_heads·head_dim``); the attention itself is counted as standard multi-head
        attention (every query head scores against a key), as the coursework asks. With
        ``gqa_as_mha=True`` k/v projections and the key rotation are also counted full-width.

        Args:
            n_new: tokens computed in this call (prompt length, 1 when decoding).
            n_cached: earlier tokens in the KV cache that they attend to.
            masked: whether a mask is added to the scores (default: when ``n_new > 1``).
        """
        n, m = n_new, n_new + n_cached
        hd, h = self.head_dim, self.n_heads
        kv_width = h * hd if gqa_as_mha else None
        kv_heads = h if gqa_as_mha else self.n_kv_heads
        masked = n > 1 if masked is None else masked
        count = FlopCount()
        count += linear_flops(self.q_proj, n).prefixed("q_proj")
        count += linear_flops(self.k_proj, n, kv_width).prefixed("k_proj")
        count += linear_flops(self.v_proj, n, kv_width).prefixed("v_proj")
        count += RotaryEmbedding.flops(n, h + kv_heads, hd)  # queries and keys
        count["scores"] = h * matmul_flops(n, hd, m)
        count["scale"] = h * n * m
        if masked:
            count["mask"] = h * n * m
        # Stable softmax over each row of m scores: max (m−1 comparisons), m subtractions,
        # m exps, m−1 additions, m divisions.
        count["softmax"] = h * n * ((m - 1) + m + EXP * m + (m - 1) + m)
        count["values"] = h * matmul_flops(n, m, hd)
        count += linear_flops(self.o_proj, n).prefixed("o_proj")
        return count
