"""bf16 training's causal attention through the AVX512-BF16 kernel (qwenlite.accel.flash):
the values and gradients of SDPA within bf16's roundings, the cases it leaves to SDPA, and a
LoRA step through it. Skipped where the CPU lacks AVX512-BF16 or the library cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenlite.accel import flash, settings, skinny
from qwenlite.errors import QwenliteError

BF16 = torch.bfloat16


@pytest.fixture
def kernel(monkeypatch):
    """The kernel on wherever it runs ($QWENLITE_TRAIN_ATTENTION=1); skip where it cannot."""
    host = skinny.unsupported() or (None if skinny.find_compiler() else "no C++ compiler found")
    if host or "avx512_bf16" not in skinny.cpu_flags():
        pytest.skip(f"no AVX512-BF16 attention kernel here: {host or 'the CPU lacks it'}")
    monkeypatch.setattr(settings.current(), "train_attention", "1")
    flash.available.cache_clear()
    yield
    flash.available.cache_clear()


def _inputs(b, h, kv, t, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(b, h, t, 64, generator=gen)).to(BF16)  # sharp rows, not uniform ones
    k, v = (torch.randn(b, kv, t, 64, generator=gen).to(BF16) for _ in range(2))
    grad = torch.randn(b, h, t, 64, generator=gen).to(BF16)
    return q, k, v, grad


def _run(fn, q, k, v, grad):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach(), *(x.grad for x in leaves)]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                          enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("shape", [(2, 14, 2, 96), (1, 4, 4, 32), (1, 6, 3, 160),
                                   (1, 14, 2, 768)])
def test_kernel_gives_sdpa_values_and_gradients_within_bf16s_roundings(kernel, shape):
    q, k, v, grad = _inputs(*shape)
    exact = _run(lambda *x: _sdpa(*(t.double() for t in x)), q, k, v, grad)
    torch_bf16 = _run(_sdpa, q, k, v, grad)
    mine = _run(lambda a, b, c: flash.attention(a, b, c, is_causal=True,
                                                enable_gqa=shape[1] != shape[2]), q, k, v, grad)
    for name, m, t, e in zip(("out", "dq", "dk", "dv"), mine, torch_bf16, exact):
        assert m.dtype == BF16 and m.shape == e.shape, name
        err, torch_err = ((x.double() - e).abs() for x in (m, t))
        # within twice torch's own bf16 attention's error, plus a bf16 rounding of the largest
        assert err.max() <= 2 * torch_err.max() + 2 ** -8 * e.abs().max(), name
        assert err.mean() <= 2 * torch_err.mean() + 1e-6, name


def test_kernel_takes_fp32_inputs_under_bf16_autocast_as_sdpa_does(kernel):
    q, k, v, grad = _inputs(1, 4, 2, 64, seed=1)
    q = q.float() + 1e-3  # not bf16 values: the cast to bf16 is part of what is compared
    with torch.autocast("cpu", dtype=BF16):
        theirs = _run(_sdpa, q, k.float(), v.float(), grad)
        mine = _run(lambda a, b, c: flash.attention(a, b, c, is_causal=True, enable_gqa=True),
                    q, k.float(), v.float(), grad)
    assert theirs[0].dtype == mine[0].dtype == BF16
    assert all(m.dtype == torch.float32 for m in mine[1:])  # gradients of the fp32 leaves
    for m, t in zip(mine, theirs):
        torch.testing.assert_close(m.float(), t.float(), rtol=0.05, atol=0.05)


def test_kernel_leaves_to_sdpa_what_it_does_not_take(kernel):
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v, _ = _inputs(1, 4, 2, 64)
    q.requires_grad_()

    def call(q=q, k=k, v=v, **kw):
        return flash.attention(q, k, v, **{"is_causal": True, "enable_gqa": True, **kw})

    assert call() is not None
    assert call(is_causal=False) is None
    assert call(attn_mask=torch.ones(64, 64, dtype=torch.bool)) is None
    assert call(dropout_p=0.1) is None
    assert call(enable_gqa=False) is None  # 4 query heads over 2 KV heads needs it
    assert call(q[:, :, :40], k[:, :, :40], v[:, :, :40]) is None  # not a multiple of 32
    assert call(q[..., :32].contiguous(), k[..., :32].contiguous(), v[..., :32].contiguous()) is None
    wide = torch.randn(1, 2, 64, 128).to(BF16)
    assert call(k=wide, v=wide) is None  # keys of another head size: SDPA says why
    long_k = torch.randn(1, 2, 96, 64).to(BF16)
    assert call(k=long_k, v=long_k) is None  # a KV cache longer than the queries
    assert call(k=torch.cat([k, k]), v=torch.cat([v, v])) is None  # another batch
    assert call(q=q.detach().float().requires_grad_()) is None  # fp32 without autocast
    with torch.autocast("cpu", dtype=torch.float16):
        assert call() is None  # SDPA would run in fp16
    with torch.no_grad():
        assert call() is None  # no gradient wanted: SDPA's forward
    with FlopCounterMode(display=False):
        assert call() is None  # a dispatch mode watching must see SDPA
    settings.current().train_attention = "auto"
    torch.set_num_threads(3)
    try:  # auto: fewer (sequence, KV head) pairs than threads would leave threads idle
        assert call() is None
    finally:
        torch.set_num_threads(2)
    settings.current().train_attention = "0"
    flash.available.cache_clear()
    assert call() is None


def test_auto_serves_avx512_bf16_cpus_without_amx(monkeypatch):
    flags = {"avx2", "fma", "avx512f", "avx512_bf16"}
    monkeypatch.setattr(skinny, "cpu_flags", lambda: frozenset(flags))
    for mode, amx, serves in (("auto", False, True), ("auto", True, False), ("1", True, True),
                              ("0", False, False)):
        monkeypatch.setattr(settings.current(), "train_attention", mode)
        monkeypatch.setattr(skinny, "cpu_flags",
                            lambda amx=amx: frozenset(flags | ({"amx_bf16"} if amx else set())))
        assert flash.cpu_serves() is serves, (mode, amx)
    monkeypatch.setattr(settings.current(), "train_attention", "1")
    monkeypatch.setattr(skinny, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    assert not flash.cpu_serves()  # no AVX512-BF16: nothing forces it


def test_nan_scores_give_nan_outputs_and_second_derivatives_raise(kernel):
    q, k, v, grad = _inputs(1, 4, 2, 64)
    k[0, 1, 40, 3] = float("nan")  # key 40 of KV head 1: heads 2 and 3 from token 40 on
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = flash.attention(q, k, v, is_causal=True, enable_gqa=True)
    nan = out.isnan().any(-1)[0]  # (heads, tokens)
    assert not nan[:2].any() and not nan[2:, :40].any() and nan[2:, 40:].all()
    q, k, v, grad = _inputs(1, 4, 2, 64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = flash.attention(q, k, v, is_causal=True, enable_gqa=True)
    (dq,) = torch.autograd.grad(out, q, grad, create_graph=True)
    with pytest.raises(RuntimeError):
        dq.sum().backward()


def test_a_bf16_lora_step_through_the_kernel_matches_sdpas(kernel, monkeypatch):
    from qwenlite.accel import apply
    from qwenlite.model.config import QwenConfig
    from qwenlite.model.loading import init_random
    from qwenlite.training.lora import apply_lora
    from qwenlite.training.trainer import lm_loss

    config = QwenConfig(vocab_size=300, hidden_size=256, intermediate_size=136,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128, tie_word_embeddings=True)
    ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(6))
    calls = []
    real = flash._CausalAttention.apply
    monkeypatch.setattr(flash._CausalAttention, "apply", lambda *a: (calls.append(1), real(*a))[1])

    def step(mode: str):
        settings.current().train_attention = mode
        flash.available.cache_clear()
        torch.manual_seed(0)
        model = init_random(config, seed=0)
        apply(model)
        apply_lora(model, r=4, alpha=8)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
        with torch.autocast("cpu", dtype=BF16):
            loss = lm_loss(model, ids, None)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    loss, grads = step("1")
    assert len(calls) == 2  # one per layer
    sdpa_loss, sdpa_grads = step("0")
    assert len(calls) == 2
    torch.testing.assert_close(loss, sdpa_loss, rtol=1e-4, atol=1e-4)
    for g, s in zip(grads, sdpa_grads):
        assert F.cosine_similarity(g.flatten(), s.flatten(), dim=0) > 0.999


def test_the_setting_takes_auto_on_and_off_only():
    assert settings.Settings.from_env({"QWENLITE_TRAIN_ATTENTION": "off"}).train_attention == "0"
    assert settings.Settings.from_env({}).train_attention == "auto"
    with pytest.raises(QwenliteError, match="QWENLITE_TRAIN_ATTENTION must be auto, 1 or 0"):
        settings.Settings.from_env({"QWENLITE_TRAIN_ATTENTION": "fast"})
