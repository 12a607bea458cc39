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

from qwenlite.accel import autocast, emulation, xent
from qwenlite.model.counting import EXP, LOG

CHUNK = 256
FUSED_CHUNK = 1024  # rows a chunk where the kernel serves: bf16 logits, 311 MB at 151,936
VOCAB_BLOCK = 16384


def _logits_by_vocab_block(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``h @ w.T`` in bf16, computed into one buffer a block of vocabulary columns at a time:
    a 1024 × 896 · 896 × 151,936 matmul ran at 0.86 TFLOPS whole and at 1.6–1.9 TFLOPS in
    blocks of 4,096–16,384 columns, each block's output fitting in cache (2-core Xeon, AMX)."""
    out = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
    for v in range(0, w.shape[0], VOCAB_BLOCK):
        torch.mm(h, w[v:v + VOCAB_BLOCK].T, out=out[:, v:v + VOCAB_BLOCK])
    return out


def loss_flops(positions: int, vocab: int) -> int:
    """FLOPS of the mean cross-entropy over ``positions`` logit rows of width ``vocab``:
    log-softmax per position (max, subtract, exp, sum, log, subtract), the NLL pick and mean."""
    per_pos = (vocab - 1) + vocab + EXP * vocab + (vocab - 1) + LOG + 1
    return positions * per_pos + positions


def _fused_bf16(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the chunks' softmax cross-entropy runs in the CPU kernel
    (:func:`qwenlite.accel.xent.xent_bf16`): bf16 matmuls on bf16 units (the head in bf16, or
    its kept copy under autocast), no logit bias, a CPU where the kernel is built. It reads each
    chunk's bf16 logits and writes their gradient in place, where torch makes five passes over
    fp32 copies; with chunks of ``FUSED_CHUNK`` rows and the logits computed by vocabulary
    blocks, the head and loss of 2,044 rows (forward and gradient, the frozen head's bf16 copy
    kept) took 1.03 s against 2.58 s through torch's passes in chunks of ``CHUNK`` (2-core Xeon
    with AMX, torch 2.13, the 151,936 × 896 head, medians of 5)."""
    return (w.dtype == torch.bfloat16 and bias is None and h.device.type == "cpu"
            and not torch._C._len_torch_dispatch_stack() and xent.available())


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
        # under CPU bf16 autocast, the head's kept bf16 copy: not a cast per chunk and pass
        w = emulation.as_bf16_fp32(weight, rows=n) if emulate else autocast.bf16_copy(weight)
        fused = _fused_bf16(h, w, bias)
        chunk = chunk or (FUSED_CHUNK if fused else CHUNK)
        with torch.autocast("cpu", enabled=False) if emulate else nullcontext():
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                tgt, tw = targets[s:e], token_weights[s:e]
                if fused:  # bf16 logits -> the CPU kernel: the losses, and softmax - onehot
                    logits = _logits_by_vocab_block(h[s:e].to(bf16), w)
                    losses = xent.xent_bf16(logits, tgt)
                    if losses is not None:
                        total += (losses * tw).sum()
                        if need_grad:
                            grad = (logits @ w).float().mul_((tw / denom)[:, None])
                            grad_h[s:e] = grad.to(h.dtype)
                        continue
                hs = h[s:e].to(bf16).float() if emulate else h[s:e]
                logits = hs @ w.T
                logits = logits.to(bf16).float() if emulate else logits.float()
                if bias is not None:
                    logits += bias.float()
                logp = torch.log_softmax(logits, dim=-1)  # one fused pass; logsumexp takes five
                del logits
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
                        grad = probs.to(w.dtype) @ w
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
                         chunk: int | None = None,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T (+ bias)`` against ``targets``, weighted per token.

    Args:
        h: (tokens, hidden) final hidden states.
        weight: (vocab, hidden) the LM head; must not require grad (use the plain path then).
        targets: (tokens,) next-token ids.
        token_weights: (tokens,) 1 for tokens in the loss, 0 for padding (default all 1).
        chunk: rows of logits at a time (default ``FUSED_CHUNK`` where the kernel serves,
            else ``CHUNK``).
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
