"""The decode kernel (qwenlite.accel.skinny): its arithmetic, when decode steps use it, and how it
falls back where it cannot be built."""

from __future__ import annotations

import subprocess
import warnings

import pytest
import torch
import torch.nn.functional as F

from qwenlite.accel import apply, emulation, kernels, packing, settings, skinny
from qwenlite.accel.modules import WideKVCache
from qwenlite.model.config import QwenConfig
from qwenlite.model.loading import init_random

BF16 = torch.bfloat16


@pytest.fixture
def kernel(monkeypatch):
    """The kernel on (``$QWENLITE_DECODE_KERNEL=1``: also on a CPU where oneDNN outpaces it).
    Skip where this machine cannot host it (another CPU or OS, no C++ compiler); where it can, a
    kernel that fails to build or to pass its check against torch fails the test (a skip there
    would hide a broken kernel behind the oneDNN fallback)."""
    monkeypatch.setattr(settings.current(), "decode_kernel", "on")
    host = skinny.unsupported() or (None if skinny.find_compiler() else "no C++ compiler found")
    if host:
        pytest.skip(f"no decode kernel here: {host}")
    why = skinny.unavailable()
    assert why is None, f"the decode kernel should serve on this machine but does not: {why}"


@pytest.fixture
def mode(monkeypatch):
    def set_mode(value: str) -> None:
        monkeypatch.setattr(settings.current(), "bf16_matmul", value)

    return set_mode


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach the kernel."""
    seen = []
    real = skinny.linears

    def spy(x, weights, *args, **kwargs):
        seen.append(len(weights))
        return real(x, weights, *args, **kwargs)
    monkeypatch.setattr(skinny, "linears", spy)
    return seen


def _reference(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, skinny.MAX_ROWS])
@pytest.mark.parametrize("k", [8, 37, 1030])  # K ≤ 1024 and above, with and without a tail
def test_kernel_computes_linear(kernel, dtype, rows, k):
    """Several weights sharing an input, of widths that leave tails to every tile shape, with and
    without biases, from an input whose rows are strided: in fp32 the values of F.linear; in bf16
    the bf16 rounding of the exact fp32 result, but for the order of the sums."""
    gen = torch.Generator().manual_seed(rows * 1000 + k)
    x = torch.randn(rows, k + 5, generator=gen).to(dtype)[:, 2:k + 2]  # row stride k + 5
    widths = (7, 16, 1)
    ws = [torch.randn(n, k, generator=gen).to(dtype) for n in widths]
    bs = [torch.randn(n, generator=gen).to(dtype) if i != 1 else None
          for i, n in enumerate(widths)]
    outs = skinny.linears(x, ws, bs, dtype)
    for out, w, b in zip(outs, ws, bs):
        ref = _reference(x, w, b)
        assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        else:
            exact = ref.to(BF16)  # the fp32 sums can round to a neighbour of the exact result
            assert (out.float() - exact.float()).abs().max() <= 2 ** -7 * ref.abs().max()
            assert (out == exact).float().mean() > 0.9


def test_decode_linears_leave_odd_calls_to_torch(kernel, calls):
    """No rows, a weight that does not fit the input (F.linear's own error), a wrong-shaped
    bias: torch, not the kernel."""
    layer = _frozen(torch.float32)[0]
    with torch.no_grad():
        assert layer(torch.randn(0, 32)).shape == (0, 24)
        with pytest.raises(RuntimeError):
            kernels.linear(torch.randn(2, 31), layer.weight)
        with pytest.raises(RuntimeError):
            kernels.linear(torch.randn(2, 32), layer.weight, torch.randn(3))
    assert calls == []


def test_autocast_decode_rounds_keys_as_sdpa_does(kernel, mode, monkeypatch):
    """An fp32 model under bf16 autocast: its fp32 keys are not bf16 values, so its decode
    attention goes to SDPA, which rounds them (a widened cache, holding bf16 values, goes to the
    kernel)."""
    seen = []
    real = skinny.attention
    monkeypatch.setattr(skinny, "attention", lambda *a: seen.append(1) or real(*a))
    mode("emulate")
    torch.manual_seed(4)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        out = kernels.attention(q, k, v, enable_gqa=True)
        assert seen == []
        rounded = kernels.attention(q, k.to(BF16).float(), v.to(BF16).float(), kv_bf16=True,
                                    enable_gqa=True)
        assert seen == [1]
    expected = _sdpa(q.to(BF16).float(), k.to(BF16).float(), v.to(BF16).float(), None)
    for got in (out, rounded):
        assert got.dtype == BF16
        assert (got.double() - expected).abs().max() <= 2 ** -7 * expected.abs().max()


def test_kernel_refuses_what_it_does_not_take(kernel):
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match=f"1-{skinny.MAX_ROWS} rows"):
        skinny.linears(torch.randn(skinny.MAX_ROWS + 1, 8), [w], [None], torch.float32)
    with pytest.raises(ValueError, match="weights of one dtype"):
        skinny.linears(torch.randn(2, 8), [torch.randn(4, 7)], [None], torch.float32)
    with pytest.raises(ValueError, match="weights of one dtype"):
        skinny.linears(torch.randn(2, 8), [w], [torch.randn(3)], torch.float32)
    with pytest.raises(ValueError, match="1-8 weights"):
        skinny.linears(torch.randn(2, 8), [w] * 9, [None] * 9, torch.float32)
    with pytest.raises(ValueError, match="unit stride"):
        skinny.linears(torch.randn(8, 2).T, [w], [None], torch.float32)


def _frozen(dtype, out_features=(24, 8, 8), biases=(True, True, False), seed=3):
    torch.manual_seed(seed)
    return [kernels.Linear(32, n, bias=b).to(dtype).requires_grad_(False)
            for n, b in zip(out_features, biases)]


def test_bf16_decode_steps_read_weights_in_place(kernel, mode, calls):
    """An emulated bf16 decode step runs through the kernel over the bf16 weights themselves: the
    results of the emulated matmul, no fp32 or prepacked copy made, one call for q/k/v, and an
    in-place change of a weight (a LoRA merge) seen at once."""
    mode("emulate")
    layers = _frozen(BF16)
    x = torch.randn(4, 1, 32).to(BF16)
    with torch.no_grad():
        got = kernels.linears(x, layers)
        single = layers[0](x)
    assert calls == [3, 1]
    for layer, g in zip(layers, got):
        assert not packing.is_packed(layer.weight) and not emulation.keeps_copy(layer.weight)
        b = None if layer.bias is None else layer.bias.float()
        expected = F.linear(x.float(), layer.weight.float(), b).to(BF16)
        assert g.dtype == BF16 and g.shape == expected.shape
        assert (g.float() - expected.float()).abs().max() <= 2 ** -7 * expected.float().abs().max()
    assert torch.equal(single, got[0])
    assert not packing.is_stacked(layers[0].weight)
    with torch.no_grad():
        layers[0].weight.add_(1.0)
        after = layers[0](x)
    assert not torch.equal(after, single)


def test_fp32_decode_steps_use_the_kernel(kernel, calls):
    layer = _frozen(torch.float32)[0]
    x = torch.randn(5, 1, 32)
    with torch.no_grad():
        out = layer(x)
    assert calls == [1] and not packing.is_packed(layer.weight)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_kernel_steps_aside(kernel, mode, calls, monkeypatch):
    """Whatever an opaque call would hide or does not fit runs through torch: dispatch modes (a
    FLOPS counter), more than MAX_ROWS rows, autograd, an fp32 model under bf16 autocast, a CPU
    that runs bf16 natively, and the kernel turned off."""
    from torch.utils.flop_counter import FlopCounterMode

    layers = _frozen(torch.float32)
    x = torch.randn(2, 32)
    with torch.no_grad():
        with FlopCounterMode(display=False):
            kernels.linears(x, layers)
        layers[0](torch.randn(skinny.MAX_ROWS + 1, 32))
        with torch.autocast("cpu", dtype=BF16):
            mode("emulate")
            layers[0](x)
        mode("native")
        bf16 = _frozen(BF16)[0]
        bf16(x.to(BF16))
        monkeypatch.setattr(settings.current(), "decode_kernel", "off")
        layers[0](x)
    layers[0](x.requires_grad_(True)).sum().backward()
    assert calls == []
    monkeypatch.setattr(settings.current(), "decode_kernel", "on")
    with torch.no_grad():
        layers[0](x)
    assert calls == [1]


def test_decode_steps_match_without_the_kernel(kernel, mode, monkeypatch):
    """A tiny model's prefill and decode steps with the kernel and without it (oneDNN): fp32
    logits equal to rounding and the same greedy tokens; bf16 logits within a few roundings."""
    mode("emulate")
    cfg = QwenConfig.from_name("tiny")
    ids = torch.randint(0, cfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))

    def run(dtype, on):
        monkeypatch.setattr(settings.current(), "decode_kernel", "on" if on else "off")
        packing.clear_packed_weights()
        model = apply(init_random(cfg, seed=4)).to(dtype).requires_grad_(False)
        cache = model.new_cache(3, 9)
        with torch.inference_mode():
            steps = [model(ids[:, :5], cache=cache, logits_to_keep=1)]
            for t in range(5, 9):
                steps.append(model(ids[:, t:t + 1], cache=cache, cache_start=t))
        return torch.cat(steps, dim=1).float()

    on, off = run(torch.float32, True), run(torch.float32, False)
    torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-5)
    assert torch.equal(on.argmax(-1), off.argmax(-1))
    on, off = run(BF16, True), run(BF16, False)
    assert (on - off).abs().max() <= 8 * 2 ** -7 * off.abs().max()


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache and no loaded kernel; the real one is loaded again afterwards."""
    monkeypatch.setenv("QWENLITE_CACHE", str(tmp_path))
    skinny.reset()
    yield tmp_path
    skinny.reset()


def test_a_failed_build_falls_back_with_one_warning(fresh_build, mode, monkeypatch):
    """No working compiler: one warning that says why, then decode steps run through oneDNN with
    the same results; status() says it too."""
    monkeypatch.setattr(skinny, "unsupported", lambda: None)
    monkeypatch.setattr(skinny, "outpaced", lambda: None)  # a CPU where the kernel would serve
    monkeypatch.setattr(skinny, "find_compiler", lambda: "/bin/false")
    mode("emulate")
    layer = _frozen(BF16)[0]
    x = torch.randn(2, 32).to(BF16)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="decode kernel is off .*false failed"):
        out = layer(x)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(layer(x), out)
    assert skinny.status().startswith("decode kernel off: false failed")
    expected = F.linear(x.float(), layer.weight.float(), layer.bias.float()).to(BF16)
    assert (out.float() - expected.float()).abs().max() <= 2 ** -7 * expected.float().abs().max()
    monkeypatch.setattr(skinny, "find_compiler", lambda: None)
    skinny.reset()
    assert "no C++ compiler" in skinny.status()
    monkeypatch.setattr(skinny, "unsupported", lambda: "the CPU lacks avx2")
    skinny.reset()
    assert skinny.status() == "decode kernel off: the CPU lacks avx2"


def test_the_build_is_cached_per_source(kernel, fresh_build, monkeypatch):
    """Built once into $QWENLITE_CACHE/kernels under a name that follows the source and the
    compiler; a second process-wide load reuses it without compiling."""
    compiler = skinny.find_compiler()
    path = skinny.build(compiler)
    assert path.parent == fresh_build / "kernels" and path.exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")
    monkeypatch.setattr(subprocess, "run", no_compiling)
    assert skinny.build(compiler) == path
    assert skinny.enabled()


def test_auto_leaves_the_kernel_off_where_onednn_is_faster(kernel, calls, monkeypatch):
    """``$QWENLITE_DECODE_KERNEL``: ``auto`` uses the kernel on an AVX2 CPU and leaves it off,
    without a warning, on one with AVX-512 (status() says why and how to force it); ``1`` uses
    it there all the same; ``0`` never."""
    layer = _frozen(torch.float32)[0]
    x = torch.randn(4, 32)
    mode = settings.current()
    monkeypatch.setattr(skinny, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    assert "AVX-512" in skinny.outpaced()
    monkeypatch.setattr(mode, "decode_kernel", "auto")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not skinny.enabled()
        off = layer(x)
    assert calls == []
    assert "AVX-512" in skinny.status() and "QWENLITE_DECODE_KERNEL=1" in skinny.status()
    monkeypatch.setattr(mode, "decode_kernel", "on")
    with torch.no_grad():
        on = layer(x)
    assert calls == [1] and skinny.status() == "decode kernel on (AVX2 C++)"
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(skinny, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(mode, "decode_kernel", "auto")
    assert skinny.outpaced() is None and skinny.enabled()
    monkeypatch.setattr(mode, "decode_kernel", "off")
    assert not skinny.enabled() and skinny.status().endswith("=0)")


def _sdpa(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1),
        attn_mask=mask)


@pytest.mark.parametrize("kv_dtype", [torch.float32, BF16])
@pytest.mark.parametrize("groups, d, t", [(7, 64, 300), (1, 8, 1), (3, 16, 13), (8, 24, 2)])
def test_attention_kernel_equals_sdpa(kernel, kv_dtype, groups, d, t):
    """One query per sequence and head over cache views (strided, as a KVCache hands them out):
    torch's SDPA in fp32, with no mask, a per-sequence mask (one sequence fully masked: zeros,
    as SDPA gives) and a mask broadcast over the batch."""
    gen = torch.Generator().manual_seed(groups * 100 + t)
    b, kv = 3, 2
    k = torch.randn(b, kv, t + 4, d, generator=gen).to(kv_dtype)[:, :, :t]
    v = torch.randn(b, kv, t + 4, d, generator=gen).to(kv_dtype)[:, :, :t]
    q = torch.randn(b, 1, kv * groups, d, generator=gen).transpose(1, 2)  # strided, as from RoPE
    per_sequence = torch.rand(b, 1, 1, t, generator=gen) > 0.4
    per_sequence[1] = False
    for mask in (None, per_sequence, torch.rand(1, 1, 1, t, generator=gen) > 0.5):
        out = skinny.attention(q, k, v, mask, d ** -0.5)
        assert out.shape == (b, kv * groups, 1, d) and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), _sdpa(q, k, v, mask), rtol=1e-5, atol=1e-6)


def test_attention_kernel_declines_what_it_does_not_take(kernel):
    q = torch.randn(1, 9, 1, 8)
    k = v = torch.randn(1, 1, 5, 8)
    assert skinny.attention(q, k, v, None, 1.0) is None  # 9 query heads per KV head
    assert skinny.attention(q[:, :4], k, v, None, 1.0) is not None
    assert skinny.attention(q[:, :4], k, v.to(BF16), None, 1.0) is None  # k and v differ
    assert skinny.attention(q[:, :4], k, torch.randn(1, 1, 6, 8), None, 1.0) is None  # shapes
    assert skinny.attention(q[:, :4, :, :4], k, v, None, 1.0) is None  # head size
    assert skinny.attention(q[:, :4].double(), k, v, None, 1.0) is None  # dtype
    per_head = torch.ones(1, 4, 1, 5, dtype=torch.bool)
    assert skinny.attention(q[:, :4], k, v, per_head, 1.0) is None  # SDPA takes it


def test_decode_attention_uses_the_kernel(kernel, mode, monkeypatch):
    """kernels.attention sends a decode step to the kernel (emulated bf16 over a bf16 or a
    widened cache, fp32); an additive mask, autograd, a dispatch mode, native bf16 and the kernel
    turned off go to torch's SDPA."""
    seen = []
    real = skinny.attention
    monkeypatch.setattr(skinny, "attention", lambda *a: seen.append(1) or real(*a))
    torch.manual_seed(2)
    q = torch.randn(2, 4, 1, 16)
    k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    mask = torch.rand(2, 1, 1, 9) > 0.3
    kw = dict(attn_mask=mask, enable_gqa=True)
    mode("emulate")
    with torch.no_grad():
        got = kernels.attention(q.to(BF16), k.to(BF16), v.to(BF16), **kw)
        wide = kernels.attention(q.to(BF16), k.to(BF16).float(), v.to(BF16).float(),
                                 kv_bf16=True, **kw)
        fp32 = kernels.attention(q, k, v, **kw)
    assert len(seen) == 3 and got.dtype == BF16 and torch.equal(got, wide)
    expected = _sdpa(q.to(BF16).float(), k.to(BF16).float(), v.to(BF16).float(), mask)
    assert (got.double() - expected).abs().max() <= 2 ** -7 * expected.abs().max()
    torch.testing.assert_close(fp32.double(), _sdpa(q, k, v, mask), rtol=1e-5, atol=1e-6)
    additive = torch.zeros(2, 1, 1, 9).masked_fill(~mask, float("-inf"))
    with torch.no_grad():
        kernels.attention(q, k, v, attn_mask=additive, enable_gqa=True)
        with _Recorder():
            kernels.attention(q, k, v, **kw)
        mode("native")
        kernels.attention(q.to(BF16), k.to(BF16), v.to(BF16), **kw)
        mode("emulate")
        monkeypatch.setattr(settings.current(), "decode_kernel", "off")
        kernels.attention(q, k, v, **kw)
    monkeypatch.setattr(settings.current(), "decode_kernel", "on")
    kernels.attention(q.requires_grad_(True), k, v, **kw)
    assert len(seen) == 3


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_a_bf16_model_keeps_its_cache_in_bf16_with_the_kernel(kernel, mode, monkeypatch):
    """With the kernel the emulated bf16 model's KV cache stays bf16 (half the memory of a widened
    one) and its decode steps give the logits of a widened cache without the kernel, within a
    few bf16 roundings."""
    mode("emulate")
    cfg = QwenConfig.from_name("tiny")
    model = apply(init_random(cfg, seed=5)).to(BF16).requires_grad_(False)
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))

    def steps():
        cache = model.new_cache(2, 8)
        with torch.inference_mode():
            out = [model(ids[:, :5], cache=cache, logits_to_keep=1)]
            out += [model(ids[:, t:t + 1], cache=cache, cache_start=t) for t in range(5, 8)]
        return cache, torch.cat(out, 1).float()

    seen = []
    real = skinny.attention
    monkeypatch.setattr(skinny, "attention", lambda *a: seen.append(1) or real(*a))
    cache, on = steps()
    assert not isinstance(cache, WideKVCache) and cache.k.dtype == BF16
    assert len(seen) == 3 * cfg.num_hidden_layers  # every decode step's attention
    monkeypatch.setattr(settings.current(), "decode_kernel", "off")
    cache, off = steps()
    assert isinstance(cache, WideKVCache) and cache.k.dtype == torch.float32
    assert (on - off).abs().max() <= 8 * 2 ** -7 * off.abs().max()
