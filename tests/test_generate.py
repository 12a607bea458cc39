"""Generation: restricted vocabularies, stopping, sampling, and its FLOPS count."""

from __future__ import annotations

import pytest
import torch

from qwenlite.evaluation.generation import generate, run_flops
from qwenlite.model import QwenConfig, init_random

CONFIG = QwenConfig.from_name("tiny")


@pytest.fixture(scope="module")
def model():
    return init_random(CONFIG, seed=0)


def _prompts(seed=0, lengths=(5, 9, 7)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CONFIG.vocab_size, (n,), generator=gen).tolist() for n in lengths]


def test_restricted_vocabulary_equals_masking_the_full_logits(model):
    allowed = [3, 17, 42, 99, 200]

    def mask_hook(logits, _generated):
        keep = torch.full_like(logits, float("-inf"))
        keep[:, allowed] = 0
        return logits + keep

    restricted = generate(model, _prompts(), 12, allowed_tokens=allowed, eos_token_id=[])
    masked = generate(model, _prompts(), 12, logits_hook=mask_hook, eos_token_id=[])
    assert restricted.tokens == masked.tokens
    assert all(t in allowed for row in restricted.tokens for t in row)
    # the restricted head is counted with its real (5-row) size
    assert restricted.flops.total() < masked.flops.total()


def test_stop_fn_and_eos_end_sequences_independently(model):
    prompts = _prompts(1)
    free = generate(model, prompts, 10, eos_token_id=[])
    first = free.tokens[0][0]
    # EOS = the first token of prompt 0: it stops at once, without emitting it
    out = generate(model, prompts, 10, eos_token_id=first)
    assert out.tokens[0] == [] and out.finish_reasons[0] == "eos"
    for row, ref in zip(out.tokens[1:], free.tokens[1:]):
        assert row == ref[: len(row)]

    def stop_after_three(generated):
        return torch.full((generated.shape[0],), generated.shape[1] >= 3)

    stopped = generate(model, prompts, 10, eos_token_id=[], stop_fn=stop_after_three)
    assert stopped.finish_reasons == ["stop"] * 3
    assert [len(t) for t in stopped.tokens] == [3, 3, 3]
    assert stopped.tokens == [t[:3] for t in free.tokens]


def test_sampling_is_seeded_and_top_p_narrows(model):
    prompts = _prompts(2)
    a = generate(model, prompts, 8, temperature=1.0, seed=7, eos_token_id=[])
    b = generate(model, prompts, 8, temperature=1.0, seed=7, eos_token_id=[])
    c = generate(model, prompts, 8, temperature=1.0, seed=8, eos_token_id=[])
    assert a.tokens == b.tokens and a.tokens != c.tokens
    greedy = generate(model, prompts, 8, eos_token_id=[])
    tiny_p = generate(model, prompts, 8, temperature=1.0, top_p=1e-6, seed=3, eos_token_id=[])
    assert tiny_p.tokens == greedy.tokens  # a nucleus of one token is greedy decoding


def test_run_flops_sum_prefill_and_steps(model):
    lengths = (5, 9, 7)
    # left-padded: every decode step adds a padding mask to its scores
    decode = sum(model.flops(1, 9 + i, logits=1, masked=True).total() for i in range(5))
    batched = generate(model, _prompts(3, lengths), 6, eos_token_id=[],
                       per_sequence_prefill=False)
    assert batched.steps == 5 and batched.prompt_len == 9
    assert batched.flops.total() == 3 * (model.flops(9, 0, logits=1).total() + decode)
    assert run_flops(model, 9, 5, 3, padded=True).total() == batched.flops.total()
    # prefilled one by one, each prompt costs its own length
    own = generate(model, _prompts(3, lengths), 6, eos_token_id=[], per_sequence_prefill=True)
    prefill = sum(model.flops(n, 0, logits=1).total() for n in lengths)
    assert own.flops.total() == prefill + 3 * decode
    assert own.flops.total() < batched.flops.total()
    same = generate(model, _prompts(3, lengths=(6, 6)), 4, eos_token_id=[])
    assert same.flops.total() == run_flops(model, 6, same.steps, 2).total()


def test_bad_arguments(model):
    with pytest.raises(ValueError):
        generate(model, [], 4)
    with pytest.raises(ValueError):
        generate(model, [[1], []], 4)
    with pytest.raises(ValueError):
        generate(model, [[1]], 0)


def test_per_sequence_prefill_equals_the_padded_batch(model):
    """Prefilling each prompt at its own length into its row of the cache gives the same next-token
    logits at every step as one padded, masked prefill."""
    prompts = _prompts(4, lengths=(3, 11, 7, 11))
    seen = {}

    def recorder(key):
        def hook(logits, generated):
            seen.setdefault(key, []).append(logits.clone())
            return logits
        return hook

    outs = {flag: generate(model, prompts, 6, eos_token_id=[], per_sequence_prefill=flag,
                           logits_hook=recorder(flag)) for flag in (False, True)}
    assert outs[True].tokens == outs[False].tokens
    assert len(seen[True]) == len(seen[False]) == 6
    for ours, theirs in zip(seen[True], seen[False]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
