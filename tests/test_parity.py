"""qwenlite against transformers' Qwen2ForCausalLM: logits, padding, cached generation."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    REAL_DATA,
    TOKENIZER_JSON,
    load_hf,
    make_hf_checkpoint,
    real_weights,
    requires_real_data,
    requires_tokenizer,
    requires_weights,
)

from qwenlite import accel
from qwenlite.evaluation.generation import generate
from qwenlite.model import load_model

CASES = [
    pytest.param(dict(tied=True, kv_heads=2, sharded=False), id="tied-gqa2-single"),
    pytest.param(dict(tied=False, kv_heads=2, sharded=True), id="untied-gqa2-sharded"),
    pytest.param(dict(tied=True, kv_heads=4, sharded=True), id="tied-mha-sharded"),
    pytest.param(dict(tied=False, kv_heads=1, sharded=False), id="untied-mqa-single"),
]


@pytest.fixture(scope="module", params=CASES)
def checkpoint(request, tmp_path_factory):
    directory = make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), **request.param)
    if request.param["sharded"]:
        assert (directory / "model.safetensors.index.json").is_file()
    return directory, load_hf(directory), request.param


@pytest.fixture(scope="module", params=["plain", "accelerated"])
def pair(request, checkpoint):
    """Our model (the plain reference, or with :mod:`qwenlite.accel` applied) and transformers'."""
    directory, hf, case = checkpoint
    ours = load_model(directory)
    assert not accel.is_accelerated(ours)
    if request.param == "accelerated":
        accel.apply(ours)
    return ours, hf, case


def test_logits_match_transformers(pair):
    ours, hf, _ = pair
    ids = torch.randint(0, 128, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == (3, 37, 128)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_eager_and_sdpa_paths_agree(pair):
    ours, _, _ = pair
    ids = torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sdpa = ours(ids)
        ours.set_attention_impl("eager")
        try:
            eager = ours(ids)
        finally:
            ours.set_attention_impl("sdpa")
    torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-5)


def test_kept_logits_are_the_last_positions_in_the_standard_layout(pair):
    """``logits_to_keep=k``: the last k positions' logits, with the LM head handed its rows in
    the standard layout, not a strided view of the hidden states (torch's CPU linear copies the
    whole weight for such a view: 568 ms against 15 for one bf16 row of the 0.5B head)."""
    ours, _, _ = pair
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(5))
    seen = []
    handle = ours.lm_head.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            full = ours(ids)
            kept = ours(ids, logits_to_keep=2)
    finally:
        handle.remove()
    torch.testing.assert_close(kept, full[:, -2:], rtol=1e-6, atol=1e-6)
    h = seen[-1]
    assert h.shape == (3, 2, ours.config.hidden_size)
    assert h.stride() == (2 * ours.config.hidden_size, ours.config.hidden_size, 1)


def test_tied_head_shares_the_embedding(pair):
    ours, _, params = pair
    shared = ours.lm_head.weight is ours.model.embed_tokens.weight
    assert shared == params["tied"]


def test_left_padded_batch_matches_single_sequences(pair):
    ours, hf, _ = pair
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 128, (n,), generator=gen) for n in (7, 15, 11)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hf_batched = hf(ids, attention_mask=mask, position_ids=positions).logits
        for i, s in enumerate(seqs):
            single = ours(s[None])[0]
            torch.testing.assert_close(batched[i, width - len(s):], single, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batched[i, width - len(s):],
                                       hf_batched[i, width - len(s):], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(batched).all()


def _uncached_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_greedy_equals_uncached_and_transformers(pair):
    ours, hf, _ = pair
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (6, 13, 9)]
    out = generate(ours, prompts, 16, eos_token_id=[])
    assert out.finish_reasons == ["length"] * 3
    for prompt, tokens in zip(prompts, out.tokens):
        assert tokens == _uncached_greedy(ours, prompt, 16)
        x = torch.tensor([prompt])
        # an explicit mask: transformers would otherwise treat prompt tokens equal to the pad id
        # as padding
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        assert tokens == ref.tolist()


@requires_tokenizer
def test_tokenizer_splits_digits():
    from qwenlite.data.tokenizer import Tokenizer

    tok = Tokenizer(TOKENIZER_JSON)
    assert tok.encode("1.23") == [16, 13, 17, 18]
    assert tok.encode("1 . 2 3") == [16, 659, 220, 17, 220, 18]
    assert tok.decode([16, 13, 17, 18]) == "1.23"


def _llmtime_prompt(n_steps: int) -> str:
    """An LLMTIME string of the first ``n_steps`` of system 0 of the real dataset."""
    import h5py
    import numpy as np

    from qwenlite.data.llmtime import LLMTimeSettings, encode, fit_alpha

    with h5py.File(REAL_DATA, "r") as f:
        traj = np.asarray(f["trajectories"][:50])
    settings = fit_alpha(traj, LLMTimeSettings())
    return encode(traj[0, :n_steps], settings)


@pytest.mark.slow
@requires_weights
@requires_real_data
def test_real_weights_match_transformers():
    """fp32 logits on an LLMTIME prompt and a 32-token greedy continuation, real checkpoint."""
    from qwenlite.data.tokenizer import Tokenizer

    weights = real_weights()
    tok = Tokenizer(weights)
    ids = tok.encode(_llmtime_prompt(30))
    ours = load_model(weights, dtype=torch.float32)
    hf = load_hf(weights)
    x = torch.tensor([ids])
    with torch.no_grad():
        expected = hf(x).logits
    ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                      eos_token_id=None,
                      pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    for name in ("plain", "accelerated"):  # the reference, then with qwenlite.accel
        if name == "accelerated":
            accel.apply(ours)
        with torch.no_grad():
            got = ours(x)
        diff = (got - expected).abs().max().item()
        print(f"real-weight fp32 max |logit diff| over {len(ids)} tokens ({name}): {diff:.3g}")
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        out = generate(ours, [ids], 32, eos_token_id=[])
        assert out.tokens[0] == ref, name
