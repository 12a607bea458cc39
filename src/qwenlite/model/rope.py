"""Rotary position embeddings (Su et al., 2021) in the split-halves layout of HF Qwen2.

cos/sin are computed in fp32 for the positions of each call (no table to keep). With the
split-halves layout the checkpoint's q/k weights are used as they are: no permutation.
"""

from __future__ import annotations

import torch
from torch import nn

from qwenlite.model.counting import FlopCount


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (−x2, x1) over the last dimension's halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin for position ids (computed per call) and the rotation of queries and keys."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """position_ids: (batch, seq) -> cos, sin: (batch, 1, seq, head_dim) in ``dtype``.

        Same arithmetic as HF Qwen2: inverse frequencies in fp32, position × frequency in fp32,
        then cos/sin — a few thousand values per call, and no lookup table whose size depends
        on the positions' values (so nothing here reads a tensor's contents: the model runs on
        the meta device, which :mod:`qwenlite.flops.executed` traces).
        """
        device = position_ids.device
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))
        freqs = position_ids[..., None].float() * inv_freq  # (batch, seq, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (batch, heads, seq, head_dim) rotated by position: x·cos + rotate_half(x)·sin."""
        return x * cos + rotate_half(x) * sin

    @staticmethod
    def flops(n_tokens: int, n_heads: int, head_dim: int) -> FlopCount:
        """Applying the rotation to ``n_heads`` heads of ``n_tokens`` tokens (computing cos/sin
        is free by the coursework's rule): per head element one multiply by cos, one by sin, one
        add, and a negation for half of them (:func:`rotate_half`)."""
        return FlopCount(rope=n_tokens * n_heads * (3 * head_dim + head_dim // 2))
