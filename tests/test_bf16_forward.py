"""A bf16 model's forward through qwenlite.accel's one-pass kernels (qwenlite.accel.fused: the
RMSNorm and the rotary embedding of a bf16 model) — torch's values bit for bit, so evaluation
and generation do not change with them."""

from __future__ import annotations

import pytest
import torch

from qwenlite.accel import apply, fused, settings, skinny
from qwenlite.model.config import QwenConfig
from qwenlite.model.loading import init_random
from qwenlite.model.norm import RMSNorm
from qwenlite.model.rope import RotaryEmbedding

BF16 = torch.bfloat16


@pytest.fixture
def library():
    """Skip where this machine cannot host the kernel library; where it can, it must serve."""
    host = skinny.unsupported() or (None if skinny.find_compiler() else "no C++ compiler found")
    if host:
        pytest.skip(f"no kernel library here: {host}")
    assert skinny.library() is not None, skinny.unavailable()


def _heavy_tailed(shape, gen):
    """Values over many binades, where the order of a sum shows in its last bits."""
    return (torch.randn(shape, generator=gen) * torch.exp(2 * torch.randn(shape, generator=gen))
            ).to(BF16)


# widths below one vector (torch's scalar path), with tails, and long enough for the cascade
@pytest.mark.parametrize("d", [3, 7, 8, 37, 64, 896, 4864, 70000])
def test_bf16_norm_sums_in_torchs_order_and_equals_the_models_norm(library, d):
    gen = torch.Generator().manual_seed(d)
    rows = 64 if d < 10000 else 4
    x = _heavy_tailed((rows, d), gen)
    weight = (1 + 0.3 * torch.randn(d, generator=gen)).to(BF16)
    y, r = torch.empty_like(x), torch.empty(rows)
    skinny.library().rmsnorm_bf16_fwd(x.data_ptr(), weight.data_ptr(), y.data_ptr(),
                                      r.data_ptr(), rows, d, 1e-6, 2)
    assert torch.equal(r, torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6))  # the same float
    norm = RMSNorm(d).to(BF16).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(weight)
        theirs = norm(x.view(2, rows // 2, d))
    ours = fused.rms_norm(x.view(2, rows // 2, d), norm.weight, norm.eps)
    assert ours.dtype == BF16 and ours.shape == theirs.shape and torch.equal(ours, theirs)


def test_bf16_norm_leaves_what_needs_a_gradient_to_torch(library):
    norm = RMSNorm(16).to(BF16)
    x = torch.randn(3, 16).to(BF16).requires_grad_(True)
    assert fused.rms_norm(x, norm.weight.detach(), 1e-6) is None  # x needs its gradient
    assert fused.rms_norm(x.detach(), norm.weight, 1e-6) is None  # so does a trainable weight
    with torch.no_grad():
        assert fused.rms_norm(x, norm.weight, 1e-6) is not None
        assert fused.rms_norm(x, norm.weight.float(), 1e-6) is None  # dtypes differ


@pytest.mark.parametrize("tables", ["per sequence", "shared"])
@pytest.mark.parametrize("d", [16, 64, 22])  # 22: a half of 11 leaves a tail
def test_rotation_is_torchs_bit_for_bit(library, tables, d):
    gen = torch.Generator().manual_seed(d)
    b, n, heads = 3, 13, 5
    # as the model makes q: (b, n, heads·d) viewed and transposed, so strided
    x = (4 * torch.randn(b, n, heads * d, generator=gen)).to(BF16)
    x = x.view(b, n, heads, d).transpose(1, 2)
    positions = torch.arange(n).expand(b if tables == "per sequence" else 1, n)
    positions = positions + 40 * torch.arange(positions.shape[0])[:, None]
    cos, sin = RotaryEmbedding(d, 1e4)(positions, BF16)
    with torch.no_grad():
        ours = fused.rope(x, cos, sin)
        theirs = RotaryEmbedding.apply(x, cos, sin)
    assert ours.is_contiguous() and torch.equal(ours, theirs)
    assert fused.rope(x.float(), cos.float(), sin.float()) is None  # fp32: torch's ops
    assert fused.rope(x.clone().requires_grad_(True), cos, sin) is None  # autograd: torch's


def test_accelerated_bf16_model_equals_the_plain_one_bit_for_bit(library, monkeypatch):
    """Forward and greedy generation of a bf16 model: through the kernels (counted) the same
    logits and tokens as the plain model's torch ops (bf16 matmuls computed natively in both,
    so that only the elementwise passes differ in how they run)."""
    from qwenlite.evaluation.generation import generate

    monkeypatch.setattr(settings.current(), "bf16_matmul", "native")
    cfg = QwenConfig.from_name("tiny")
    model = init_random(cfg, seed=4).to(BF16)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))
    prompts = [ids[0].tolist(), ids[1, :17].tolist()]  # of two lengths: padded and masked
    with torch.no_grad():
        plain = model(ids)
        plain_tokens = generate(model, prompts, max_new_tokens=6).tokens
    apply(model)
    calls = {"norm": 0, "rope": 0}
    for name, attr in (("norm", "rms_norm"), ("rope", "rope")):
        real = getattr(fused, attr)

        def counted(*args, _real=real, _name=name):
            out = _real(*args)
            calls[_name] += out is not None
            return out

        monkeypatch.setattr(fused, attr, counted)
    with torch.no_grad():
        fast = model(ids)
    layers = cfg.num_hidden_layers
    assert calls == {"norm": 2 * layers + 1, "rope": 2 * layers}
    assert torch.equal(fast, plain)
    with torch.no_grad():
        assert generate(model, prompts, max_new_tokens=6).tokens == plain_tokens
