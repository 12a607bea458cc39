"""RMSNorm (Zhang & Sennrich, 2019) as Qwen2 computes it."""

from __future__ import annotations

import torch
from torch import nn

from qwenlite.model.counting import SQRT, FlopCount


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x²) + eps)``, normalised in fp32 and cast back before the weight.

    Casting back before multiplying by the weight is what HF Qwen2 does; it keeps bf16 results
    bitwise-close to the reference.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim)."""
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def flops(self, n_tokens: int) -> FlopCount:
        """Per token of width d: d squares, d−1 adds + 1 divide (mean), 1 add (eps),
        1 sqrt + 1 inverse (rsqrt), d multiplies (normalise), d multiplies (weight)."""
        d = self.weight.shape[0]
        return FlopCount(
            square=n_tokens * d,
            mean=n_tokens * d,
            eps=n_tokens,
            rsqrt=n_tokens * (SQRT + 1),
            normalize=n_tokens * d,
            weight=n_tokens * d,
        )
