"""Rotary position embeddings (Su et al., 2021) in the split-halves layout of HF Qwen2.

cos/sin tables are computed in fp32 and kept as non-persistent buffers; they grow on demand, so a
model never holds tables longer than the positions it has seen. With the split-halves layout the
checkpoint's q/k weights are used as they are: no permutation.
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
    """Looks up cos/sin for position ids and applies the rotation to queries and keys."""

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.max_positions = max_positions
        self.register_buffer("cos_table", torch.empty(0, head_dim), persistent=False)
        self.register_buffer("sin_table", torch.empty(0, head_dim), persistent=False)

    def _grow(self, length: int, device: torch.device) -> None:
        length = min(max(length, 2 * self.cos_table.shape[0], 256), max(self.max_positions, length))
        # Same arithmetic as HF: inv_freq in fp32, position × inv_freq in fp32, then cos/sin.
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))
        positions = torch.arange(length, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_table = emb.cos()
        self.sin_table = emb.sin()

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """position_ids: (batch, seq) -> cos, sin: (batch, 1, seq, head_dim) in ``dtype``."""
        needed = int(position_ids.max()) + 1 if position_ids.numel() else 0
        if (self.cos_table.shape[0] < needed or self.cos_table.device != position_ids.device
                or self.cos_table.is_meta):
            self._grow(needed, position_ids.device)
        cos = self.cos_table[position_ids].unsqueeze(1).to(dtype)
        sin = self.sin_table[position_ids].unsqueeze(1).to(dtype)
        return cos, sin

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
