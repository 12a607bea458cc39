"""The bf16 training paths of qwenlite.accel: frozen weights' kept bf16 copies under CPU
autocast (qwenlite.accel.autocast) and the fused softmax cross-entropy kernel
(qwenlite.accel.xent.xent_bf16) behind the LM-head loss — the same values as torch's way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qwenlite.accel import autocast, kernels, skinny, xent
from qwenlite.training import loss as loss_module
from qwenlite.training.loss import linear_cross_entropy

BF16 = torch.bfloat16


@pytest.fixture
def library():
    """Skip where this machine cannot host the kernel library; where it can, it must serve."""
    host = skinny.unsupported() or (None if skinny.find_compiler() else "no C++ compiler found")
    if host:
        pytest.skip(f"no kernel library here: {host}")
    assert xent.available(), skinny.unavailable()


def _reference(logits, targets):
    loss = F.cross_entropy(logits.double(), targets, reduction="none")
    grad = torch.softmax(logits.double(), -1)
    grad[torch.arange(len(targets)), targets] -= 1
    return loss, grad


@pytest.mark.parametrize("vocab", [1, 7, 8, 33, 1000, 4099])
def test_xent_kernel_gives_the_loss_and_its_gradient(library, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = (5 * torch.randn(6, vocab, generator=gen)).to(BF16)
    targets = torch.randint(0, vocab, (6,), generator=gen)
    ref_loss, ref_grad = _reference(logits, targets)
    grad = logits.clone()
    loss = xent.xent_bf16(grad, targets)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-6, atol=2e-6)
    # the gradient is rounded to bf16 once, as torch's bf16 rounding of the fp32 value
    torch.testing.assert_close(grad.double(), ref_grad.to(BF16).double(), rtol=8e-3, atol=1e-7)
    assert (grad == ref_grad.to(BF16)).float().mean() > 0.98


def test_xent_kernel_reads_rows_of_a_wider_buffer_and_marks_nan_rows(library):
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(4, 50, generator=gen).to(BF16)
    view = wide[:, :40]  # row stride 50
    view[2, 5] = float("nan")
    targets = torch.tensor([0, 39, 3, 17])
    ref_loss, _ = _reference(view.clone(), targets)
    tail = wide[:, 40:].clone()
    loss = xent.xent_bf16(view, targets)
    assert torch.isnan(loss[2]) and torch.isnan(view[2]).all()
    keep = torch.tensor([0, 1, 3])
    torch.testing.assert_close(loss[keep].double(), ref_loss[keep], rtol=2e-6, atol=2e-6)
    assert torch.equal(wide[:, 40:], tail)  # nothing outside the rows' V columns is written


def test_xent_kernel_declines_what_it_does_not_take(library):
    logits = torch.randn(3, 10).to(BF16)
    before = logits.clone()
    assert xent.xent_bf16(logits, torch.tensor([0, 10, 1])) is None  # target out of range
    assert xent.xent_bf16(logits.float(), torch.tensor([0, 1, 2])) is None  # not bf16
    assert xent.xent_bf16(logits.T, torch.tensor([0, 1, 2] * 3 + [0])) is None  # strided
    assert torch.equal(logits, before)


def _head(vocab=300, hidden=32, rows=70, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(vocab, hidden, generator=gen) * 0.2, requires_grad=False)
    h = torch.randn(rows, hidden, generator=gen).requires_grad_(True)
    t = torch.randint(0, vocab, (rows,), generator=gen)
    mask = (torch.rand(rows, generator=gen) > 0.2).float()
    return w, h, t, mask


def _autocast_loss(h, w, t, mask, **kwargs):
    h.grad = None
    with torch.autocast("cpu", dtype=BF16):
        loss = linear_cross_entropy(h, w, t, mask, chunk=16, **kwargs)
    loss.backward()
    return loss.detach(), h.grad.clone()


def test_the_fused_loss_under_autocast_goes_through_the_kernel_and_equals_torchs(library,
                                                                              monkeypatch):
    w, h, t, mask = _head()
    seen = []
    real = xent.xent_bf16
    monkeypatch.setattr(xent, "xent_bf16", lambda *a: seen.append(1) or real(*a))
    loss, grad = _autocast_loss(h, w, t, mask)
    assert len(seen) == 5  # 70 rows in chunks of 16
    monkeypatch.setattr(loss_module, "_fused_bf16", lambda *a: False)
    torch_loss, torch_grad = _autocast_loss(h, w, t, mask)
    torch.testing.assert_close(loss, torch_loss, rtol=1e-6, atol=1e-6)
    # each chunk's gradient is rounded to bf16 on both ways, the row weights applied after
    # the rounding here and before it in torch's: within two bf16 roundings
    torch.testing.assert_close(grad, torch_grad, rtol=1.6e-2, atol=1e-5)
    assert torch.count_nonzero(grad[mask == 0]) == 0


def test_a_logit_bias_keeps_torchs_loss(library, monkeypatch):
    w, h, t, mask = _head(seed=1)
    bias = nn.Parameter(torch.randn(w.shape[0]) * 0.1)
    monkeypatch.setattr(xent, "xent_bf16", lambda *a: pytest.fail("the kernel took a bias"))
    _autocast_loss(h, w, t, mask, bias=bias)
    assert bias.grad is not None


def test_frozen_weights_under_autocast_read_a_kept_bf16_copy_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    layer = kernels.Linear(24, 40)
    layer.requires_grad_(False)
    x = torch.randn(50, 24, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16):
        ours = layer(x)
        theirs = F.linear(x, layer.weight, layer.bias)  # autocast's cast at the call
    assert ours.dtype == BF16 and torch.equal(ours, theirs)
    assert autocast.is_kept(layer.weight) and autocast.is_kept(layer.bias)
    (g_ours,) = torch.autograd.grad(ours.float().sum(), x)
    with torch.autocast("cpu", dtype=BF16):
        theirs = F.linear(x, layer.weight, layer.bias)
    (g_theirs,) = torch.autograd.grad(theirs.float().sum(), x)
    assert torch.equal(g_ours, g_theirs)
    with torch.no_grad():
        layer.weight.mul_(2)  # in place (a LoRA merge does this): the copy is made again
    with torch.autocast("cpu", dtype=BF16):
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert autocast.bf16_copy(layer.weight) is layer.weight  # outside autocast: as it is
    trainable = nn.Parameter(torch.randn(4, 4))
    with torch.autocast("cpu", dtype=BF16):
        assert autocast.bf16_copy(trainable) is trainable  # autocast casts it, keeping the graph
    autocast.clear()
    assert not autocast.is_kept(layer.weight)


def test_swiglu_kernel_is_torchs_gating_bit_for_bit(library):
    from qwenlite.accel import fused

    gen = torch.Generator().manual_seed(4)
    gate = (3 * torch.randn(5, 1003, generator=gen)).to(BF16).requires_grad_(True)
    up = torch.randn(5, 1003, generator=gen).to(BF16).requires_grad_(True)
    grad = torch.randn(5, 1003, generator=gen).to(BF16)
    ours = fused.swiglu(gate, up)
    theirs = F.silu(gate) * up
    assert torch.equal(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours, (gate, up), grad),
                    torch.autograd.grad(theirs, (gate, up), grad)):
        assert (a == b).float().mean() > 0.999  # e^x within 2 ulp: a rare rounding apart
        torch.testing.assert_close(a, b, rtol=8e-3, atol=1e-6)
    with torch.no_grad():
        assert fused.swiglu(gate, up) is None  # forward only: torch's passes are faster
    assert fused.swiglu(gate.float(), up.float()) is None
    assert fused.swiglu(gate[:, ::2], up[:, ::2]) is None  # strided


def test_rms_norm_kernel_equals_the_models_norm(library):
    from qwenlite.accel import fused
    from qwenlite.model.norm import RMSNorm

    gen = torch.Generator().manual_seed(5)
    norm = RMSNorm(37, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(37, generator=gen))
    norm.requires_grad_(False)
    x = torch.randn(2, 9, 37, generator=gen, requires_grad=True)
    grad = torch.randn(2, 9, 37, generator=gen)
    ours = fused.rms_norm(x, norm.weight, norm.eps)
    theirs = norm(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, x, grad)[0],
                               torch.autograd.grad(theirs, x, grad)[0], rtol=1e-5, atol=1e-6)
    assert fused.rms_norm(x.to(BF16), norm.weight, 1e-5) is None
    norm.requires_grad_(True)  # a trainable weight needs its gradient: torch's way
    assert fused.rms_norm(x, norm.weight, 1e-5) is None


def test_an_accelerated_bf16_training_step_uses_the_kernels_and_matches_the_plain_model(
        library, monkeypatch):
    from qwenlite.accel import apply, fused
    from qwenlite.model.config import QwenConfig
    from qwenlite.model.loading import init_random
    from qwenlite.training.lora import apply_lora
    from qwenlite.training.trainer import lm_loss

    config = QwenConfig(vocab_size=300, hidden_size=64, intermediate_size=136,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128, tie_word_embeddings=True)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(6))

    def step(accelerated: bool):
        torch.manual_seed(0)
        model = init_random(config, seed=0)
        if accelerated:
            apply(model)
        apply_lora(model, r=4, alpha=8)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)  # B too: a non-zero update to compare
        with torch.autocast("cpu", dtype=BF16):
            loss = lm_loss(model, ids, None)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    seen = {"swiglu": 0, "norm": 0, "xent": 0}
    for name, attr in (("swiglu", "swiglu"), ("norm", "rms_norm")):
        real = getattr(fused, attr)
        monkeypatch.setattr(fused, attr, lambda *a, _r=real, _n=name: (
            seen.__setitem__(_n, seen[_n] + 1), _r(*a))[1])
    real_xent = xent.xent_bf16
    monkeypatch.setattr(xent, "xent_bf16", lambda *a: (
        seen.__setitem__("xent", seen["xent"] + 1), real_xent(*a))[1])
    loss, grads = step(accelerated=True)
    assert seen == {"swiglu": 2, "norm": 5, "xent": 1}
    plain_loss, plain_grads = step(accelerated=False)
    torch.testing.assert_close(loss, plain_loss, rtol=2e-3, atol=2e-3)
    for g, p in zip(grads, plain_grads):
        assert torch.nn.functional.cosine_similarity(g.flatten(), p.flatten(), dim=0) > 0.99
