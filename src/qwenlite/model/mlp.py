"""The SwiGLU feed-forward block (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenlite.model.counting import EXP, FlopCount, linear_flops


class SwiGLU(nn.Module):
    """Gate and up projections without bias, SiLU gating, down projection without bias.

    :meth:`project_gate_up` and :meth:`gate_values` are the steps a backend may override
    (:mod:`qwenlite.accel`)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, seq, hidden) -> (batch, seq, hidden)."""
        gate, up = self.project_gate_up(x)
        return self.down_proj(self.gate_values(gate, up))

    def project_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, seq, hidden) -> gate, up: (batch, seq, intermediate)."""
        return self.gate_proj(x), self.up_proj(x)

    def gate_values(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The SiLU-gated values ``silu(gate) * up`` that the down projection takes."""
        return F.silu(gate) * up

    def flops(self, n_tokens: int) -> FlopCount:
        """Projections as matmuls; SiLU(g) = g / (1 + exp(−g)) is a negation, an exp, an add and
        a divide per element (13); the gating product one multiply per element."""
        inter = self.gate_proj.out_features
        count = linear_flops(self.gate_proj, n_tokens).prefixed("gate_proj")
        count += linear_flops(self.up_proj, n_tokens).prefixed("up_proj")
        count["silu"] = n_tokens * inter * (1 + EXP + 1 + 1)
        count["gating"] = n_tokens * inter
        count += linear_flops(self.down_proj, n_tokens).prefixed("down_proj")
        return count
