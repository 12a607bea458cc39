"""bf16 matmuls emulated on the fp32 units (qwenlite.accel) against torch's bf16 kernels."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qwenlite.accel import apply, emulation, kernels, packing, settings
from qwenlite.accel.modules import WideKVCache
from qwenlite.accel.settings import BF16_ENV, KERNEL_ENV, Settings
from qwenlite.errors import QwenliteError
from qwenlite.model.config import QwenConfig
from qwenlite.model.loading import init_random
from qwenlite.training.loss import linear_cross_entropy

BF16 = torch.bfloat16
ULP = 2.0 ** -7  # bf16 spacing relative to a value in [1, 2)


@pytest.fixture
def mode(monkeypatch):
    """Set the bf16 matmul mode for one test (the settings' own is restored afterwards)."""
    def set_mode(value: str) -> None:
        monkeypatch.setattr(settings.current(), "bf16_matmul", value)

    return set_mode


@pytest.fixture
def onednn_decode(monkeypatch):
    """Decode steps without the decode kernel (qwenlite.accel.skinny), through weights
    prepacked for oneDNN, as where the kernel is not built."""
    monkeypatch.setattr(settings.current(), "decode_kernel", "off")


def assert_bf16_close(actual, expected, ulps=2.0):
    """Equal up to a couple of bf16 roundings (the order of the fp32 sums differs)."""
    assert actual.dtype == expected.dtype
    a, e = actual.float(), expected.float()
    scale = e.abs().max().clamp(min=1e-6)
    assert (a - e).abs().max() <= ulps * ULP * scale


def test_emulated_linear_is_a_bf16_gemm(mode):
    torch.manual_seed(0)
    x = torch.randn(3, 37, 96).to(BF16)
    w = nn.Parameter(torch.randn(80, 96).to(BF16), requires_grad=False)
    b = nn.Parameter(torch.randn(80).to(BF16), requires_grad=False)
    mode("native")
    native = kernels.linear(x, w, b)
    mode("emulate")
    emulated = kernels.linear(x, w, b)
    assert emulated.dtype == BF16 and emulated.shape == native.shape
    assert_bf16_close(emulated, native)
    # Most elements round to the very same bf16 number; the rest differ by one rounding.
    assert (emulated == native).float().mean() > 0.95


def test_modes_and_environment(mode, monkeypatch):
    x = torch.zeros(2, 4, dtype=BF16)
    mode("native")
    assert not emulation.emulating(x)
    mode("emulate")
    assert emulation.emulating(x)
    assert not emulation.emulating(x.float())  # an fp32 matmul outside autocast is left alone
    with torch.autocast("cpu", dtype=BF16):
        assert emulation.emulating(x.float())
    # the environment, read once into the settings (a bad value: one line naming the variable)
    assert Settings.from_env({BF16_ENV: " Native "}).bf16_matmul == "native"
    assert Settings.from_env({}) == Settings()
    with pytest.raises(QwenliteError, match=BF16_ENV):
        Settings.from_env({BF16_ENV: "fast"})
    for word, kernel in [("1", "on"), (" ON", "on"), ("0", "off"), ("false", "off"),
                         ("", "auto"), ("Auto", "auto")]:
        assert Settings.from_env({KERNEL_ENV: word}).decode_kernel == kernel
    with pytest.raises(QwenliteError, match=KERNEL_ENV):
        Settings.from_env({KERNEL_ENV: "2"})
    monkeypatch.setenv(BF16_ENV, "emulate")
    try:
        settings.reload()
        assert settings.current().bf16_matmul == "emulate"
    finally:
        monkeypatch.delenv(BF16_ENV)
        settings.reload()


def test_autocast_forward_and_backward_match_native(mode):
    """Training path: fp32 weights under bf16 autocast, a frozen base and a trainable weight."""
    torch.manual_seed(1)
    frozen = kernels.Linear(64, 48)
    frozen.requires_grad_(False)
    trained = kernels.Linear(48, 32, bias=False)
    x0 = torch.randn(5, 64)

    def run():
        trained.zero_grad()
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=BF16):
            y = trained(torch.relu(frozen(x)))
        y.float().square().sum().backward()
        return y, x.grad, trained.weight.grad.clone()

    mode("native")
    y_n, gx_n, gw_n = run()
    mode("emulate")
    y_e, gx_e, gw_e = run()
    assert y_e.dtype == BF16
    assert_bf16_close(y_e, y_n)
    torch.testing.assert_close(gx_e, gx_n, rtol=4 * ULP, atol=4 * ULP * gx_n.abs().max().item())
    torch.testing.assert_close(gw_e, gw_n, rtol=4 * ULP, atol=4 * ULP * gw_n.abs().max().item())


def test_frozen_copy_is_kept_and_refreshed(mode):
    mode("emulate")
    layer = kernels.Linear(8, 4, bias=False).to(BF16).requires_grad_(False)
    first = emulation.as_bf16_fp32(layer.weight)
    assert emulation.as_bf16_fp32(layer.weight) is first
    assert torch.equal(first, layer.weight.float())
    with torch.no_grad():
        layer.weight.add_(1.0)  # an in-place change, as a LoRA merge makes
    refreshed = emulation.as_bf16_fp32(layer.weight)
    assert refreshed is not first and torch.equal(refreshed, layer.weight.float())
    # A trainable weight is converted per call, so that its gradient flows.
    layer.weight.requires_grad_(True)
    assert emulation.as_bf16_fp32(layer.weight).requires_grad


def test_wide_matmuls_keep_no_copy(mode, monkeypatch):
    """Prefill and training convert per call; only skinny (decode) matmuls keep an fp32 copy
    (prepacked where oneDNN is available), which wide ones then reuse."""
    mode("emulate")
    monkeypatch.setattr(settings.current(), "pack_weights", False)
    layer = kernels.Linear(8, 4, bias=False).to(BF16).requires_grad_(False)
    wide = emulation.SKINNY_ROWS + 1
    a = emulation.as_bf16_fp32(layer.weight, rows=wide)
    assert emulation.as_bf16_fp32(layer.weight, rows=wide) is not a  # nothing was kept
    with torch.no_grad():
        layer(torch.randn(wide, 8).to(BF16))
    assert emulation.as_bf16_fp32(layer.weight, rows=wide) is not a
    assert not packing.is_packed(layer.weight)
    with torch.no_grad():
        layer(torch.randn(2, 8).to(BF16))  # a decode-sized call keeps one
    kept = emulation.as_bf16_fp32(layer.weight, rows=1)
    assert emulation.as_bf16_fp32(layer.weight, rows=wide) is kept


def test_copy_made_while_generating_serves_training(mode):
    """The fp32 copy built under inference_mode must be usable in a later backward."""
    mode("emulate")
    frozen = kernels.Linear(16, 16).requires_grad_(False)
    with torch.inference_mode():
        frozen(torch.randn(2, 16).to(BF16))
    x = torch.randn(2, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16):
        frozen(x).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_attention_matches_native(mode):
    torch.manual_seed(2)
    q = torch.randn(2, 4, 9, 16).to(BF16)
    k = torch.randn(2, 2, 9, 16).to(BF16)
    v = torch.randn(2, 2, 9, 16).to(BF16)
    mode("native")
    native = kernels.attention(q, k, v, is_causal=True, enable_gqa=True)
    mode("emulate")
    emulated = kernels.attention(q, k, v, is_causal=True, enable_gqa=True)
    assert emulated.dtype == BF16
    assert_bf16_close(emulated, native, ulps=4)


def test_fused_loss_matches_native_under_autocast(mode):
    torch.manual_seed(3)
    head = nn.Parameter(torch.randn(300, 32) * 0.1, requires_grad=False)
    h0 = torch.randn(40, 32)
    targets = torch.randint(0, 300, (40,))

    def run():
        h = h0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=BF16):
            loss = linear_cross_entropy(h, head, targets, chunk=16)
        loss.backward()
        return loss.detach(), h.grad

    mode("native")
    loss_n, g_n = run()
    mode("emulate")
    loss_e, g_e = run()
    torch.testing.assert_close(loss_e, loss_n, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(g_e, g_n, rtol=4 * ULP, atol=4 * ULP * g_n.abs().max().item())


@pytest.mark.parametrize("tied", [True, False])
def test_bf16_model_emulated_is_as_close_to_fp32_as_native(mode, tied):
    """A whole bf16 model: emulation gives bf16 results, as far from fp32 as torch's bf16 is."""
    cfg = dataclasses.replace(QwenConfig.from_name("tiny"), tie_word_embeddings=tied)
    model = apply(init_random(cfg, seed=4))
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(ids)
        model.to(BF16)
        mode("native")
        native = model(ids)
        decode_native = model(ids[:, :1])  # a skinny call goes through the W·hᵀ head
        mode("emulate")
        emulated = model(ids)
        decode_emulated = model(ids[:, :1])
    assert emulated.dtype == BF16
    err_native = (native.float() - ref).abs().max()
    err_emulated = (emulated.float() - ref).abs().max()
    assert err_emulated <= 2 * err_native + 1e-3
    assert (emulated.float() - native.float()).abs().max() <= 2 * err_native + 1e-3
    assert_bf16_close(decode_emulated, decode_native, ulps=4)


def test_fp32_models_are_untouched(mode):
    """Outside bf16 the layers are plain F.linear, bit for bit."""
    mode("emulate")
    layer = kernels.Linear(12, 7)
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("pack", ["1", "0"])
@pytest.mark.parametrize("rows", [1, 8, emulation.SKINNY_ROWS])
def test_decode_layout_equals_linear(rows, pack, monkeypatch, onednn_decode):
    """A decode step's few rows, through a prepacked weight or in the W·xᵀ layout: the values of
    F.linear, contiguous."""
    monkeypatch.setattr(settings.current(), "pack_weights", pack == "1")
    torch.manual_seed(5)
    x = torch.randn(rows, 1, 32)
    for out_features in (96, 20):  # widening, and not
        w = nn.Parameter(torch.randn(out_features, 32), requires_grad=False)
        b = torch.randn(out_features)
        for weight in (w, w.detach()):  # a parameter (may be packed), a plain tensor (never)
            with torch.no_grad():
                out = kernels.linear(x, weight, b)
            assert out.is_contiguous() and out.shape == (rows, 1, out_features)
            torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        assert (packing.is_packed(w)) == (pack == "1" and packing.packing_enabled())


@pytest.mark.skipif(not packing.onednn_linear(), reason="torch without oneDNN's linear")
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_packed_weight_is_kept_and_refreshed(mode, dtype, monkeypatch, onednn_decode):
    """The packed copy is made once, and made anew after an in-place change (a LoRA merge)."""
    mode("emulate")
    monkeypatch.setattr(settings.current(), "pack_weights", True)
    layer = kernels.Linear(16, 40, bias=True).to(dtype).requires_grad_(False)
    x = torch.randn(4, 16).to(dtype)
    with torch.no_grad():
        first = layer(x)
        packed = packing.packed_copy(layer.weight)
        layer(x)
        assert packing.packed_copy(layer.weight) is packed
        layer.weight.add_(0.5)
        second = layer(x)
    assert packing.packed_copy(layer.weight) is not packed
    with torch.no_grad():
        mode("native")
        expected = F.linear(x, layer.weight, layer.bias)
    assert second.dtype == dtype and not torch.allclose(second.float(), first.float())
    if dtype == BF16:
        assert_bf16_close(second, expected, ulps=2)
    else:
        torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decode_kernel", ["on", "off"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_decode_attention_equals_sdpa(mask_kind, decode_kernel, monkeypatch):
    """A decode step's attention (one query per sequence over a cache view, 4 query heads per KV
    head) as qwenlite computes it on the CPU, through the decode kernel or without it, equals
    torch's SDPA."""
    monkeypatch.setattr(settings.current(), "decode_kernel", decode_kernel)
    torch.manual_seed(6)
    cache_k = torch.randn(3, 2, 20, 16)
    cache_v = torch.randn(3, 2, 20, 16)
    k, v = cache_k[:, :, :13], cache_v[:, :, :13]  # strided views, as the KV cache hands out
    q = torch.randn(3, 8, 1, 16)
    may = torch.ones(3, 1, 1, 13, dtype=torch.bool)
    may[0, ..., :5] = False  # a left-padded sequence
    mask = {None: None, "bool": may,
            "additive": torch.zeros(may.shape).masked_fill(~may, float("-inf"))}[mask_kind]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    with torch.inference_mode():
        out = kernels.attention(q, k, v, attn_mask=mask, is_causal=False, enable_gqa=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    if mask_kind is not None:  # the mask matters: without it the padded sequence differs
        assert not torch.allclose(out[0], F.scaled_dot_product_attention(
            q, k, v, enable_gqa=True)[0], atol=1e-4)


def test_decode_attention_with_autograd_is_sdpa():
    """With gradients required, the decode path steps aside for SDPA (and its backward)."""
    q = torch.randn(1, 4, 1, 8, requires_grad=True)
    k = torch.randn(1, 2, 5, 8)
    v = torch.randn(1, 2, 5, 8)
    out = kernels.attention(q, k, v, enable_gqa=True)
    out.sum().backward()
    assert q.grad is not None
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


@pytest.mark.skipif(not packing.onednn_linear(), reason="torch without oneDNN's linear")
def test_only_frozen_weights_of_decode_steps_are_packed(monkeypatch, onednn_decode):
    """Packing (on by default) keeps a copy for a frozen weight's few-row, no-grad call only:
    not for a wide call, not for a trainable weight, not under autograd."""
    monkeypatch.setattr(settings.current(), "pack_weights", True)
    frozen = kernels.Linear(16, 24).requires_grad_(False)
    trained = kernels.Linear(16, 24)
    with torch.no_grad():
        frozen(torch.randn(emulation.SKINNY_ROWS + 1, 16))
        assert not packing.is_packed(frozen.weight)
        x = torch.randn(4, 16)
        out = trained(x)
        assert not packing.is_packed(trained.weight)
        torch.testing.assert_close(out, F.linear(x, trained.weight, trained.bias))
    x = torch.randn(4, 16, requires_grad=True)
    frozen(x).sum().backward()
    assert not packing.is_packed(frozen.weight) and x.grad is not None
    with torch.no_grad():
        frozen(torch.randn(4, 16))
    assert packing.is_packed(frozen.weight)
    packing.clear_packed_weights()
    assert not packing.is_packed(frozen.weight)


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops a block of code dispatches."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _projections(dtype, biases=(True, True, False)):
    torch.manual_seed(7)
    layers = [kernels.Linear(24, n, bias=b).to(dtype).requires_grad_(False)
              for n, b in zip((32, 8, 8), biases)]
    with torch.no_grad():
        for layer in layers:
            if layer.bias is not None:
                layer.bias.normal_()
    return layers


@pytest.mark.skipif(not packing.onednn_linear(), reason="torch without oneDNN's linear")
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_stacked_decode_projections_equal_the_layers(mode, dtype, monkeypatch, onednn_decode):
    """A decode step's projections that share an input run as one matmul over their stacked
    weights (a missing bias as zeros) and give each layer's own result."""
    mode("emulate")
    monkeypatch.setattr(settings.current(), "pack_weights", True)
    layers = _projections(dtype)
    x = torch.randn(4, 1, 24).to(dtype)
    with torch.no_grad():
        expected = [layer(x) for layer in layers]
        packing.clear_packed_weights()
        with _Ops() as rec:
            got = kernels.linears(x, layers)
    aten = torch.ops.aten
    matmul_ops = {aten.mm.default, aten.addmm.default, aten.linear.default,
                  torch.ops.mkldnn._linear_pointwise.default}
    matmuls = [op for op in rec.ops if op in matmul_ops]
    assert matmuls == [torch.ops.mkldnn._linear_pointwise.default]
    assert packing.is_stacked(layers[0].weight)
    assert all(not packing.is_packed(layer.weight) for layer in layers)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == dtype
        if dtype == BF16:
            assert_bf16_close(g, e, ulps=1)
        else:
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not packing.onednn_linear(), reason="torch without oneDNN's linear")
def test_stacked_weight_is_refreshed_when_any_layer_changes(monkeypatch, onednn_decode):
    """The stacked copy is kept under the first weight but follows in-place changes of the
    others (a LoRA merge into v_proj) and of the biases."""
    monkeypatch.setattr(settings.current(), "pack_weights", True)
    layers = _projections(torch.float32)
    x = torch.randn(2, 24)
    with torch.no_grad():
        kernels.linears(x, layers)
        stacked = packing.stacked_copy(layers[0].weight)
        kernels.linears(x, layers)
        assert packing.stacked_copy(layers[0].weight) is stacked
        layers[2].weight.add_(1.0)
        after_weight = kernels.linears(x, layers)
        assert packing.stacked_copy(layers[0].weight) is not stacked
        layers[1].bias.add_(1.0)
        after_bias = kernels.linears(x, layers)
        expected = [F.linear(x, layer.weight, layer.bias) for layer in layers]
    torch.testing.assert_close(after_weight[2], expected[2], rtol=1e-6, atol=1e-6)
    for g, e in zip(after_bias, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not packing.onednn_linear(), reason="torch without oneDNN's linear")
def test_stacking_steps_aside(monkeypatch, onednn_decode):
    """Wide calls, autograd, a wrapped (LoRA) layer, hooks watching a layer and packing turned
    off all run the layers one by one."""
    from qwenlite.training.lora import LoRALinear

    monkeypatch.setattr(settings.current(), "pack_weights", True)
    layers = _projections(torch.float32)
    small = torch.randn(2, 24)

    def stacks(x, layers, grad=False):
        packing.clear_packed_weights()
        with torch.set_grad_enabled(grad):
            kernels.linears(x, layers)
        return packing.is_stacked(layers[0].weight)

    assert stacks(small, layers)
    assert not stacks(torch.randn(emulation.SKINNY_ROWS + 1, 24), layers)
    assert not stacks(small.requires_grad_(True), layers, grad=True)
    assert not stacks(torch.randn(2, 24), [LoRALinear(layers[0], r=2, alpha=4), *layers[1:]])
    seen = []
    handle = layers[1].register_forward_hook(lambda *a: seen.append(1))
    assert not stacks(torch.randn(2, 24), layers) and seen == [1]
    handle.remove()
    monkeypatch.setattr(settings.current(), "pack_weights", False)
    assert not stacks(torch.randn(2, 24), layers)


def test_widened_cache_decodes_exactly_as_a_bf16_cache(mode, onednn_decode):
    """A bf16 model emulated on the fp32 units without the decode kernel keeps its KV cache in
    fp32 holding the same bf16 values: every decode step's logits are bit for bit those of a
    cache kept in bf16."""
    from qwenlite.model.attention import KVCache

    mode("emulate")
    cfg = QwenConfig.from_name("tiny")
    model = apply(init_random(cfg, seed=9)).to(BF16).requires_grad_(False)  # frozen, as loaded
    widened = model.new_cache(2, 12)
    assert isinstance(widened, WideKVCache) and widened.k.dtype == torch.float32
    plain = KVCache(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 12, cfg.head_dim, BF16,
                    "cpu")
    assert not isinstance(plain, WideKVCache) and plain.k.dtype == BF16
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    with torch.inference_mode():
        outs = []
        for cache in (widened, plain):
            steps = [model(ids[:, :5], cache=cache)]
            for t in range(5, 8):
                steps.append(model(ids[:, t:t + 1], cache=cache, cache_start=t))
            outs.append(steps)
        assert torch.equal(widened.k[..., :8, :].to(BF16).float(), widened.k[..., :8, :])
    for a, b in zip(*outs):
        assert a.dtype == BF16 and torch.equal(a, b)
    model.set_attention_impl("eager")  # the spelled-out attention reads a widened cache too
    with torch.inference_mode():
        eager = model(ids[:, 7:8], cache=widened, cache_start=7)
    assert_bf16_close(eager, outs[0][-1], ulps=4)
    model.set_attention_impl("sdpa")
    mode("native")  # emulation off after the cache was made: torch's bf16 over the same cache
    with torch.inference_mode():
        native = model(ids[:, 7:8], cache=widened, cache_start=7)
    assert native.dtype == BF16
    assert_bf16_close(native, outs[0][-1], ulps=8)
    assert not isinstance(model.new_cache(2, 12), WideKVCache)


@pytest.mark.skipif(not packing.onednn_linear(), reason="torch without oneDNN's linear")
def test_stacking_frees_the_layers_own_packed_copies(monkeypatch, onednn_decode):
    """A decode step that once ran the projections one by one (a FLOPS counter watching) and
    then stacked keeps one copy of their weights, not two."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(settings.current(), "pack_weights", True)
    layers = _projections(torch.float32)
    x = torch.randn(2, 24)
    with torch.no_grad():
        with FlopCounterMode(display=False):
            kernels.linears(x, layers)
        assert all(packing.is_packed(layer.weight) for layer in layers)
        kernels.linears(x, layers)
    assert packing.is_stacked(layers[0].weight)
    assert all(not packing.is_packed(layer.weight) for layer in layers)


def test_native_bf16_decode_prepacks_in_bf16_where_onednn_has_bf16(mode, monkeypatch, onednn_decode):
    """On a CPU with bf16 units (native mode) a decode step prepacks its weights in bf16 (2 bytes
    per parameter) and stacks q/k/v and gate/up, as fp32 does. This CPU's oneDNN may lack bf16,
    so its two prepacked ops stand in as plain bf16 ops; what is tested is qwenlite's routing."""
    mode("native")
    monkeypatch.setattr(settings.current(), "pack_weights", True)
    packs = []

    def fake_pack(w, rows):
        packs.append(w.dtype)
        return w.clone()

    monkeypatch.setattr(packing, "pack", fake_pack)
    monkeypatch.setattr(packing, "packed_linear", lambda x, w, b: F.linear(x, w, b))
    monkeypatch.setattr(packing, "onednn_linear", lambda dtype=torch.float32: True)
    layers = _projections(BF16)
    x = torch.randn(4, 1, 24).to(BF16)
    with torch.no_grad():
        single = layers[2](x)
        assert packing.packed_copy(layers[2].weight).dtype == BF16
        stacked = kernels.linears(x, layers)
        expected = [F.linear(x, layer.weight, layer.bias) for layer in layers]
    assert packs == [BF16, BF16]  # layers[2] alone, then the stack
    assert packing.stacked_copy(layers[0].weight)[0].dtype == BF16
    torch.testing.assert_close(single, expected[2])
    for g, e in zip(stacked, expected):
        assert g.dtype == BF16
        assert_bf16_close(g, e, ulps=1)
    # Where oneDNN lacks bf16, native bf16 decode stays torch's F.linear and keeps no copy.
    packing.clear_packed_weights()
    monkeypatch.setattr(packing, "onednn_linear", lambda dtype=torch.float32: dtype != BF16)
    with torch.no_grad():
        kernels.linears(x, layers)
        layers[2](x)
    assert not packing.is_stacked(layers[0].weight) and not packing.is_packed(layers[2].weight)
