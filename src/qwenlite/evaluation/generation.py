"""Batched, KV-cached generation: left padding, greedy or temperature/top-p sampling, stopping
on EOS, a token budget or a caller's condition, and an optional restriction of the next token.

The forecaster restricts tokens to digits and separators, constrains them to a grammar (a
finite-state machine over token ids, :class:`TokenGrammar`) and stops each sequence after a number
of timesteps; all are plain hooks here, so the generator knows nothing about time series.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qwenlite.accel import kernels
from qwenlite.model.counting import FlopCount, matmul_flops
from qwenlite.model.decoder import QwenForCausalLM

PER_SEQUENCE_PREFILL_TOKENS = 512
"""On a CPU, prompts at least this long are prefilled one by one (see :func:`generate`)."""


@dataclass(frozen=True)
class TokenGrammar:
    """A finite-state machine over token ids that every generated sequence must follow.

    Attributes:
        token_ids: (k,) the ids the grammar is written in; no other token is ever chosen.
        table: (states, k) the next state after each of those tokens, -1 where it is not allowed
            (every state must allow at least one token).
        start: the state the first generated token is read in.
    """

    token_ids: Sequence[int]
    table: torch.Tensor
    start: int = 0


@dataclass
class GenerationOutput:
    """What :func:`generate` returns.

    Attributes:
        tokens: new tokens per prompt, up to and including the token that stopped it (an EOS
            token is not included).
        finish_reasons: per prompt, ``"eos"``, ``"stop"`` (the caller's condition) or ``"length"``.
        prompt_len: the padded prompt length (all prompts are left-padded to it).
        steps: decode steps run after the prefill.
        prefill_seconds, decode_seconds: wall time of each phase (synchronised on CUDA).
        overridden: per prompt, the indices into ``tokens`` where a grammar changed the choice:
            the most likely token (after the other restrictions) was outside it.
    """

    tokens: list[list[int]]
    finish_reasons: list[str]
    prompt_len: int
    steps: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    flops: FlopCount = field(default_factory=FlopCount)
    overridden: list[list[int]] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick next tokens from logits (batch, vocab): argmax when ``temperature == 0``, else sample
    from the temperature-scaled distribution restricted to the top-p nucleus."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always the top token)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: QwenForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    allowed_tokens: torch.Tensor | Sequence[int] | None = None,
    logits_hook: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    stop_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    per_sequence_prefill: bool | None = None,
    grammar: TokenGrammar | None = None,
) -> GenerationOutput:
    """Generate continuations of a batch of token-id prompts of any lengths.

    Args:
        model: the language model.
        prompts: token ids per prompt (non-empty).
        max_new_tokens: most tokens generated per prompt.
        temperature: 0 for greedy decoding; > 0 samples.
        top_p: nucleus mass kept when sampling.
        seed: seeds the sampler (reproducible samples).
        eos_token_id: token(s) that end a sequence (default: the config's ``eos_token_id``).
        pad_token_id: id used for left padding and after a sequence ends (never attended to).
        allowed_tokens: restrict every next token to these ids (a list, or a bool mask (vocab,)).
        logits_hook: ``hook(logits (batch, vocab), generated (batch, t)) -> logits`` applied
            before choosing each token.
        stop_fn: ``stop_fn(generated (batch, t)) -> bool (batch,)``: which sequences are done
            after the token just generated (e.g. "generated 20 semicolons").
        per_sequence_prefill: prefill prompts of different lengths one by one, each at its own
            length, instead of as one padded, masked batch (default: on a CPU when every prompt
            has at least ``PER_SEQUENCE_PREFILL_TOKENS`` tokens).
        grammar: every sequence follows this finite-state machine from its ``start`` state (it
            also restricts the tokens to its ids); the output says where it changed the choice.
    Returns:
        A :class:`GenerationOutput`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no prompt may be empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model.device
    b = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    p_len = int(lengths.max())
    total = p_len + max_new_tokens
    if not 0 <= pad_token_id < model.config.vocab_size:
        pad_token_id = 0  # any in-range id will do: padding is never attended to
    input_ids = torch.full((b, p_len), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.ones((b, total), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        input_ids[i, p_len - len(p):] = torch.as_tensor(list(p), device=device)
        attention_mask[i, : p_len - len(p)] = 0
    padded = bool((lengths != p_len).any())

    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    eos = torch.tensor([] if eos_token_id is None else
                       ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
                       dtype=torch.long, device=device)
    vocab = model.config.vocab_size
    # With a restricted vocabulary only the allowed rows of the LM head are ever needed: the head
    # is the largest matmul of a decode step, and choosing among the allowed logits is exactly
    # choosing from the full logits with the rest masked to -inf.
    sub_ids = None
    if grammar is not None:
        allowed_tokens = grammar.token_ids if allowed_tokens is None else allowed_tokens
    if allowed_tokens is not None:
        allowed = torch.as_tensor(allowed_tokens, device=device)
        if allowed.dtype == torch.bool:
            allowed = allowed.nonzero().flatten()
        sub_ids = torch.unique(torch.cat([allowed.long(), eos]))
    table = None
    if grammar is not None:  # the grammar's columns in sub_ids' order; other ids never allowed
        ids = torch.as_tensor(list(grammar.token_ids), dtype=torch.long, device=device)
        if not bool(torch.isin(ids, sub_ids).all()):
            raise ValueError("the grammar's tokens must be among allowed_tokens")
        table = torch.full((grammar.table.shape[0], len(sub_ids)), -1, dtype=torch.long,
                           device=device)
        table[:, torch.searchsorted(sub_ids, ids)] = torch.as_tensor(grammar.table,
                                                                     device=device).long()
        if bool((table.max(1).values < 0).any()):
            raise ValueError("every state of the grammar must allow a token")
        state = torch.full((b,), grammar.start, dtype=torch.long, device=device)
        overridden = torch.zeros((b, max_new_tokens), dtype=torch.bool, device=device)
    head = model.lm_head.weight if sub_ids is None else model.lm_head.weight[sub_ids]
    bias = model.lm_head.bias
    head_bias = bias if bias is None or sub_ids is None else bias[sub_ids]
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())

    def last_hidden(ids, **kwargs):
        return model(ids, logits_to_keep=1, return_hidden=True, **kwargs)[:, -1]

    # the head's rows as the head itself runs them (accelerated or plain)
    sub_linear = kernels.linear if isinstance(model.lm_head, kernels.Linear) else F.linear

    def logits_of(h):
        return model.lm_head(h) if sub_ids is None else sub_linear(h, head, head_bias)

    cache = model.new_cache(b, total)
    # On a CPU, long prompts of different lengths are prefilled one by one, each at its own
    # length straight into its row of the cache: no padding is computed and attention runs causal
    # without a mask. Short ones are not: each prompt then streams every weight for few rows.
    # Measured (`python benchmarks/bench_cpu_measures.py prefill`, 2-core Zen 3, fp32): 8 prompts
    # of 800-867 tokens 34.7-38.0 s one by one against 40.4-42.3 s as a padded batch; 32 prompts
    # of 200-213 tokens 47.3 against 41.8 s. A GPU prefills the padded batch at once.
    if per_sequence_prefill is None:
        per_sequence_prefill = (device.type == "cpu"
                                and int(lengths.min()) >= PER_SEQUENCE_PREFILL_TOKENS)
    per_sequence = padded and per_sequence_prefill
    _sync(device)
    t0 = time.perf_counter()
    if per_sequence:
        h = torch.cat([last_hidden(input_ids[i:i + 1, p_len - len(p):],
                                   cache=cache.window(i, p_len - len(p)))
                       for i, p in enumerate(prompts)])
    else:
        h = last_hidden(input_ids, attention_mask=attention_mask[:, :p_len] if padded else None,
                        cache=cache, cache_start=0)
    logits = logits_of(h)
    _sync(device)
    t1 = time.perf_counter()

    generated = torch.empty((b, max_new_tokens), dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    reasons = ["length"] * b
    lengths_out = [max_new_tokens] * b
    steps = 0
    for t in range(max_new_tokens):
        logits = logits.float()
        if logits_hook is not None:
            if sub_ids is not None:
                full = torch.full((b, vocab), float("-inf"), device=device)
                logits = full.index_copy_(1, sub_ids, logits)
            logits = logits_hook(logits, generated[:, :t])
            if sub_ids is not None:
                logits = logits[:, sub_ids]
        if table is not None:
            legal = table[state] >= 0
            free = logits.argmax(-1, keepdim=True)
            overridden[:, t] = ~legal.gather(1, free).squeeze(1) & ~done
            logits = logits.masked_fill(~legal, float("-inf"))
        nxt = sample_next(logits, temperature, top_p, generator)
        if table is not None:
            state = table[state, nxt]
        if sub_ids is not None:
            nxt = sub_ids[nxt]
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        generated[:, t] = nxt
        hit_eos = torch.isin(nxt, eos) & ~done if eos.numel() else torch.zeros_like(done)
        hit_stop = stop_fn(generated[:, : t + 1]) & ~done & ~hit_eos if stop_fn else None
        newly = hit_eos if hit_stop is None else hit_eos | hit_stop
        if bool(newly.any()):
            for i in newly.nonzero().flatten().tolist():
                reasons[i] = "eos" if bool(hit_eos[i]) else "stop"
                lengths_out[i] = t if reasons[i] == "eos" else t + 1
            done |= newly
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        pos = (lengths + t)[:, None]
        logits = logits_of(last_hidden(
            nxt[:, None], attention_mask=attention_mask[:, : p_len + t + 1] if padded else None,
            position_ids=pos, cache=cache, cache_start=p_len + t))
        steps += 1
    _sync(device)
    t2 = time.perf_counter()

    rows = generated.tolist()
    tokens = [row[:n] for row, n in zip(rows, lengths_out)]
    changed = [] if table is None else [
        [t for t in row.nonzero().flatten().tolist() if t < n]
        for row, n in zip(overridden, lengths_out)]
    flops = run_flops(model, p_len, steps, b,
                             head_rows=None if sub_ids is None else len(sub_ids), padded=padded,
                             prefill_lens=[len(p) for p in prompts] if per_sequence else None)
    return GenerationOutput(tokens, reasons, p_len, steps, t1 - t0, t2 - t1, flops, changed)


def run_flops(model: QwenForCausalLM, prompt_len: int, decode_steps: int,
                     batch: int = 1, head_rows: int | None = None,
                     padded: bool = False, prefill_lens: Sequence[int] | None = None) -> FlopCount:
    """FLOPS of a batched generation as :func:`generate` runs it: a prefill of ``prompt_len``
    tokens (LM head on the last position only), then ``decode_steps`` single-token steps, step
    ``i`` attending to ``prompt_len + i`` cached tokens. Decode steps are counted on the padded
    length, since the padded positions are computed too.

    Args:
        head_rows: vocabulary rows of the LM head computed per position when the next token is
            restricted to a few ids (default: the whole vocabulary).
        padded: prompts of different lengths were left-padded, so decode steps add a mask too.
        prefill_lens: each prompt's length when the prompts were prefilled one by one at their
            own lengths (what :func:`generate` does on a CPU); default: one padded prefill of
            ``batch × prompt_len`` tokens.
    """
    logits = 1 if head_rows is None else 0
    lens = [prompt_len] * batch if prefill_lens is None else list(prefill_lens)
    head = FlopCount()
    if head_rows is not None:
        head["lm_head.matmul"] = matmul_flops(1, model.config.hidden_size, head_rows)
        if model.lm_head.bias is not None:
            head["lm_head.bias"] = head_rows
    count = FlopCount()
    for n in lens:
        count += (model.flops(n, 0, logits=logits) + head).prefixed("prefill")
    decode = FlopCount()
    for i in range(1, decode_steps + 1):
        decode += model.flops(1, prompt_len + i - 1, logits=logits, masked=padded) + head
    return count + decode.scaled(batch).prefixed("decode")
