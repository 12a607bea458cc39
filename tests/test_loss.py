"""The fused LM-head cross-entropy equals the plain one, in value and gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwenlite.training.loss import linear_cross_entropy


def _plain(h, w, t, mask):
    losses = F.cross_entropy((h @ w.T).float(), t, reduction="none")
    return (losses * mask).sum() / mask.sum()


def test_value_and_gradient_match_the_plain_loss():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=gen, requires_grad=True)
    w = torch.randn(50, 16, generator=gen)
    t = torch.randint(0, 50, (37,), generator=gen)
    mask = (torch.rand(37, generator=gen) > 0.3).float()
    fused = linear_cross_entropy(h, w, t, mask, chunk=8)
    (g_fused,) = torch.autograd.grad(fused * 3.0, h)
    plain = _plain(h, w, t, mask)
    (g_plain,) = torch.autograd.grad(plain * 3.0, h)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(g_fused[mask == 0]) == 0  # padding contributes nothing
    assert torch.count_nonzero(g_fused[mask == 1]) > 0


def test_no_grad_and_trainable_head_paths():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(9, 8, generator=gen)
    w = torch.randn(20, 8, generator=gen)
    t = torch.randint(0, 20, (9,), generator=gen)
    ones = torch.ones(9)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), _plain(h, w, t, ones))
    w_trainable = w.clone().requires_grad_(True)
    loss = linear_cross_entropy(h, w_trainable, t)
    loss.backward()
    assert w_trainable.grad is not None
    torch.testing.assert_close(loss, _plain(h, w, t, ones))


def test_logit_bias_value_and_gradients_match_the_plain_loss():
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(23, 16, generator=gen, requires_grad=True)
    w = torch.randn(40, 16, generator=gen)
    b = (torch.randn(40, generator=gen) * 0.5).requires_grad_(True)
    t = torch.randint(0, 40, (23,), generator=gen)
    mask = (torch.rand(23, generator=gen) > 0.2).float()
    fused = linear_cross_entropy(h, w, t, mask, chunk=5, bias=b)
    g_h, g_b = torch.autograd.grad(fused * 2.0, (h, b))
    losses = F.cross_entropy((h @ w.T + b).float(), t, reduction="none")
    plain = (losses * mask).sum() / mask.sum()
    p_h, p_b = torch.autograd.grad(plain * 2.0, (h, b))
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_h, p_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_b, p_b, rtol=1e-5, atol=1e-7)
    # bias alone trainable (a frozen model: the hidden states need no gradient)
    (g_only,) = torch.autograd.grad(linear_cross_entropy(h.detach(), w, t, mask, bias=b), b)
    torch.testing.assert_close(g_only, p_b / 2.0, rtol=1e-5, atol=1e-7)
