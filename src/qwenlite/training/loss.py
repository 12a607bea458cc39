"""Next-token cross-entropy fused with the (frozen) LM head, computed in chunks.

The naive loss materialises logits (batch, seq, vocab) — 1.2 GB in fp32 for 4×512 tokens and
Qwen2.5's 151,936-token vocabulary — and autograd keeps them, plus their gradient, for the
backward pass. With a frozen head (LoRA never adapts it), the only gradient needed is the one
w.r.t. the hidden states, ``(softmax − onehot)·W``; it costs the same matmul whether computed now
or later, so it is computed chunk by chunk during the forward and kept — (tokens, hidden), 600×
smaller than the logits. Same FLOPS, a fraction of the memory, no (tokens × vocab) round trips.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from qwenlite.accel import emulation
from qwenlite.model.counting import EXP, LOG

CHUNK = 256


def loss_flops(positions: int, vocab: int) -> int:
    """FLOPS of the mean cross-entropy over ``positions`` logit rows of width ``vocab``:
    log-softmax per position (max, subtract, exp, sum, log, subtract), the NLL pick and mean."""
    per_pos = (vocab - 1) + vocab + EXP * vocab + (vocab - 1) + LOG + 1
    return positions * per_pos + positions


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, token_weights, chunk):
        n = h.shape[0]
        denom = token_weights.sum().clamp(min=1.0)
        need_grad = ctx.needs_input_grad[0]
        need_bias_grad = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if need_grad else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) \
            if need_bias_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # bf16 on a CPU without bf16 units: the same bf16 matmuls, run on the fp32 units.
        emulate = emulation.emulating(h)
        bf16 = torch.bfloat16
        w = emulation.as_bf16_fp32(weight, rows=n) if emulate else weight
        with torch.autocast("cpu", enabled=False) if emulate else nullcontext():
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                hs = h[s:e].to(bf16).float() if emulate else h[s:e]
                logits = hs @ w.T
                logits = logits.to(bf16).float() if emulate else logits.float()
                if bias is not None:
                    logits += bias.float()
                tgt = targets[s:e]
                logp = torch.log_softmax(logits, dim=-1)  # one fused pass; logsumexp takes five
                del logits
                tw = token_weights[s:e]
                total -= (logp.gather(1, tgt[:, None]).squeeze(1) * tw).sum()
                if need_grad or need_bias_grad:
                    probs = logp.exp_()
                    probs[torch.arange(e - s, device=h.device), tgt] -= 1.0
                    probs.mul_((tw / denom)[:, None])
                    if need_bias_grad:
                        grad_b += probs.sum(0)
                    if not need_grad:
                        continue
                    if emulate:
                        grad = (probs.to(bf16).float() @ w).to(bf16)
                    else:
                        grad = probs.to(weight.dtype) @ weight
                    grad_h[s:e] = grad.to(h.dtype)
        ctx.save_for_backward(grad_h, grad_b)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_b = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        gb = None if grad_b is None else (grad_b * grad_out).to(ctx.bias_dtype)
        return gh, None, gb, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         token_weights: torch.Tensor | None = None,
                         chunk: int = CHUNK, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T (+ bias)`` against ``targets``, weighted per token.

    Args:
        h: (tokens, hidden) final hidden states.
        weight: (vocab, hidden) the LM head; must not require grad (use the plain path then).
        targets: (tokens,) next-token ids.
        token_weights: (tokens,) 1 for tokens in the loss, 0 for padding (default all 1).
        bias: (vocab,) a logit bias (the course's trainable LM-head bias), or None; its
            gradient, ``Σ_tokens w·(softmax − onehot) / Σ w``, is accumulated chunk by chunk.
    Returns:
        The scalar ``Σ w·CE / Σ w``; its gradient flows to ``h`` (and ``bias``) only.
    """
    if token_weights is None:
        token_weights = torch.ones(targets.shape, dtype=torch.float32, device=h.device)
    if weight.requires_grad:
        logits = (h @ weight.T).float()
        if bias is not None:
            logits = logits + bias.float()
        losses = F.cross_entropy(logits, targets, reduction="none")
        return (losses * token_weights).sum() / token_weights.sum().clamp(min=1.0)
    return _LinearCrossEntropy.apply(h, weight, bias, targets, token_weights.float(), chunk)
