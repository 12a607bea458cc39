"""The measurements behind qwenlite's CPU-specific choices, each reproducible on its own.

    python benchmarks/bench_cpu_measures.py decode-matmuls [--rows 8]
        All of a Qwen2.5-0.5B decode step's matmuls (24 layers' seven projections and the LM head,
        random weights of the real shapes, cold cache) for a few rows: x·Wᵀ, W·xᵀ, oneDNN with
        prepacked weights (``qwenlite.accel.packing``' decode path where the decode kernel is not
        built) and the decode kernel (``qwenlite.accel.skinny``) over fp32 and over bf16 weights.
    QWENLITE_WEIGHTS=DIR python benchmarks/bench_cpu_measures.py prefill [--prompts 8]
            [--prompt-steps 80] [--dtype fp32]
        Prefill of LLMTIME prompts (8 of 800-867 tokens by default): one padded, masked batch
        against one prompt at a time at its own length (``qwenlite.generate`` on a CPU).
    python benchmarks/bench_cpu_measures.py malloc
        Elementwise work on fresh large tensors, with glibc malloc as it is and keeping freed
        memory (``qwenlite.accel.memory``), each in its own process; with page-fault counts.
    python benchmarks/bench_cpu_measures.py decode-bound
        What bounds a decode step's matmuls: reading all of the step's weights (``sum``) against
        oneDNN's prepacked matmul for 8 rows on 2 threads and on 1, and the prepacked matmul's
        time as the number of rows grows (48 distinct 4864×896 weights, cold cache).
    QWENLITE_WEIGHTS=DIR python benchmarks/bench_cpu_measures.py decode-step [--dtype bf16]
            [--rows 8] [--cached 250] [--repeats 15]
        The model's decode step with each of its choices turned off in turn, in alternating
        rounds: the decode kernel (``qwenlite.accel.skinny``; off, the matmuls run through
        oneDNN's prepacked weights and attention through SDPA), its attention alone, q/k/v and
        gate/up as one call each (``qwenlite.accel.kernels.linears``: one kernel call, or one
        matmul over stacked prepacked weights), SDPA over each KV head's stacked query heads
        (``kernels.decode_attention``, else two matmuls), and for an emulated bf16 model the KV
        cache qwenlite keeps (bf16 with the kernel; fp32 holding bf16 values without it,
        ``KVCache(widen_bf16=True)``).
    python benchmarks/bench_cpu_measures.py decode-attention [--rows 8] [--cached 900]
        One decode step's attention over 24 layers' KV caches (14 query heads over 2 KV heads,
        left-padding mask): torch's SDPA with GQA against ``qwenlite.accel.kernels.
        decode_attention`` (one SDPA over each KV head's stacked query heads, the way without
        the decode kernel), two batched matmuls (qwenlite's way before) and the decode kernel
        (``qwenlite.accel.skinny.attention``) over fp32 and bf16 caches, and what widening a bf16
        cache to fp32 costs (emulated bf16 attention through SDPA on a cache kept in bf16, which
        qwenlite's KV cache avoids by holding bf16 values in fp32).
    python benchmarks/bench_cpu_measures.py train-attention [--dtype bf16] [--rows 4]
            [--seq 768]
        What bounds a training step's attention (14 query heads over 2 KV heads, 64-wide, causal):
        torch's SDPA forward and forward + backward for one layer, against the batched matmuls an
        attention consists of (each KV head's 7 query heads stacked as the rows of one matmul),
        each at its own measured rate, and a row softmax over the scores. The "bound" is the time
        of the causal half of the forward's two and the backward's five matmuls (the scores
        recomputed, as flash attention does) at those rates: no kernel built on these matmuls
        runs faster. In bf16 on an AVX512-BF16 CPU, also qwenlite's kernel
        (``qwenlite.accel.flash``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from common import llmtime_prompts, machine, timed, weights_from_args

from qwenlite.accel.packing import pack as _pack  # oneDNN's prepack and linear
from qwenlite.accel.packing import packed_linear as _packed_linear

SHAPES = {"q": (896, 896), "k": (128, 896), "v": (128, 896), "o": (896, 896),
          "gate": (4864, 896), "up": (4864, 896), "down": (896, 4864)}


def decode_matmuls(rows: int, repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    layers = [{k: torch.randn(*s, generator=gen) * 0.02 for k, s in SHAPES.items()}
              for _ in range(24)]
    head = torch.randn(151936, 896, generator=gen) * 0.02
    weights = [w for layer in layers for w in layer.values()] + [head]
    names = [k for layer in layers for k in layer] + ["head"]
    packed = [_pack(w, rows) for w in weights]
    ways = {
        "x·Wᵀ": lambda x, i: F.linear(x, weights[i]),
        "W·xᵀ": lambda x, i: (weights[i] @ x.T).T.contiguous(),
        "oneDNN prepacked": lambda x, i: _packed_linear(x, packed[i], None),
    }
    x = torch.randn(rows, 896)
    err = (ways["oneDNN prepacked"](x, 4) - F.linear(x, weights[4])).abs().max().item()
    from qwenlite.accel import skinny

    if skinny.enabled() and rows <= skinny.MAX_ROWS:
        halves = [w.to(torch.bfloat16) for w in weights]
        ways["decode kernel fp32"] = lambda x, i: skinny.linears(x, [weights[i]], [None],
                                                                  torch.float32)
        ways["decode kernel bf16"] = lambda x, i: skinny.linears(
            x.to(torch.bfloat16), [halves[i]], [None], torch.bfloat16)
    else:
        print(f"({skinny.status()})")
    best: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        for way, fn in ways.items():
            times: dict[str, float] = {}
            for i, w in enumerate(weights):  # every weight once: cold in cache, as in a step
                x = torch.randn(rows, w.shape[1])
                t0 = time.perf_counter()
                fn(x, i)
                times[names[i]] = times.get(names[i], 0.0) + time.perf_counter() - t0
            old = best.get(way)
            best[way] = times if old is None else {k: min(old[k], times[k]) for k in times}
    print(f"{machine()}; {rows} rows through every matmul of a 0.5B decode step, "
          f"best of {repeats}; prepacked vs x·Wᵀ max |diff| {err:.1e}")
    for way, times in best.items():
        parts = " ".join(f"{k} {1e3 * v:.1f}" for k, v in times.items())
        print(f"  {way:18s} total {1e3 * sum(times.values()):6.1f} ms  ({parts})")
    per_matrix = sum(min(best[w][k] for w in ("x·Wᵀ", "W·xᵀ")) for k in best["x·Wᵀ"])
    print(f"  best BLAS layout per matrix: {1e3 * per_matrix:.1f} ms")


def decode_bound(repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(*s, generator=gen) * 0.02 for _ in range(24) for s in SHAPES.values()]
    weights.append(torch.randn(151936, 896, generator=gen) * 0.02)
    gb = sum(w.numel() for w in weights) * 4 / 1e9

    packed = [_pack(w, 8) for w in weights]
    xs = [torch.randn(8, w.shape[1]) for w in weights]
    read_s, _ = timed(lambda: [w.sum() for w in weights], repeats, warmup=1)
    print(f"{machine()}; every weight of a 0.5B decode step ({gb:.2f} GB fp32), cold cache, "
          f"best of {repeats}")
    print(f"  read (sum)                   {1e3 * read_s:6.1f} ms  {gb / read_s:5.1f} GB/s")
    threads = torch.get_num_threads()
    for n in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n)
        mm_s, _ = timed(lambda: [_packed_linear(x, p, None) for x, p in zip(xs, packed)], repeats,
                        warmup=1)
        print(f"  oneDNN matmul, 8 rows, {n} thread(s) {1e3 * mm_s:6.1f} ms  {gb / mm_s:5.1f} GB/s")
    torch.set_num_threads(threads)
    del packed
    gate = [torch.randn(4864, 896, generator=gen) * 0.02 for _ in range(48)]
    print("  prepacked matmul through 48 distinct 4864×896 weights, by rows:")
    for rows in (1, 2, 4, 8, 16, 32):
        packed = [_pack(w, rows) for w in gate]
        x = torch.randn(rows, 896)
        t, _ = timed(lambda: [_packed_linear(x, p, None) for p in packed], repeats, warmup=1)
        flops = 2 * rows * 48 * 4864 * 896
        print(f"    {rows:3d} rows {1e3 * t:6.1f} ms  {48 * 4864 * 896 * 4 / 1e9 / t:5.1f} GB/s  "
              f"{flops / t / 1e9:6.1f} GFLOPS")


def _two_matmul_attention(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
    """Decode attention as qwenlite computed it before stacking query heads into one SDPA
    (``kernels.decode_attention`` up to commit e5b6fd5): two batched matmuls around a masked
    softmax, scaled and masked in place."""
    b, h, _, d = q.shape
    kv = k.shape[1]
    scores = torch.matmul(q.reshape(b, kv, h // kv, d), k.transpose(-1, -2))
    scores.mul_(1.0 / d ** 0.5)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores.masked_fill_(~attn_mask, float("-inf"))
        else:
            scores.add_(attn_mask)
    return torch.matmul(torch.softmax(scores, dim=-1), v).reshape(b, h, 1, d)


def decode_step(weights, dtype: str, rows: int, cached: int, rounds: int) -> None:
    import statistics

    from qwenlite.accel import apply, emulation, kernels, settings, skinny
    from qwenlite.accel.modules import WideKVCache
    from qwenlite.model import load_model
    from qwenlite.model.attention import KVCache

    model = apply(load_model(weights, dtype=dtype))
    c = model.config
    gen = torch.Generator().manual_seed(0)
    caches = {}
    for widen in (False, True):
        kind = WideKVCache if widen and model.dtype == torch.bfloat16 else KVCache
        caches[widen] = kind(c.num_hidden_layers, rows, c.num_key_value_heads, cached + 200,
                             c.head_dim, model.dtype, "cpu")
        caches[widen].k.normal_(generator=gen)
        caches[widen].v.normal_(generator=gen)
    tokens = torch.randint(100, 5000, (rows, 1), generator=gen)
    stacked, sdpa = kernels.linears, kernels.decode_attention
    kernel_attention = kernels.attention_kernel

    def one_by_one(x, layers):
        return [layer(x) for layer in layers]
    # (decode kernel, its attention, projections sharing an input in one call, SDPA over stacked
    # query heads (else two matmuls), a bf16 cache widened to fp32)
    bf16 = model.dtype == torch.bfloat16 and emulation.bf16_matmul_mode() == "emulate"
    ways = {"all of them": (True, True, True, True, False),
            "kernel's attention off (SDPA)": (True, False, True, True, False),
            "projections one by one": (True, True, False, True, False),
            "decode kernel off (oneDNN, SDPA)": (False, False, True, True, bf16),
            "kernel off, two-matmul attention": (False, False, True, False, bf16),
            "none of them": (False, False, False, False, False)}
    if bf16:
        ways["kernel over a widened cache"] = (True, True, True, True, True)
        ways["kernel off, cache not widened"] = (False, False, True, True, False)
    if not skinny.enabled():
        print(f"({skinny.status()}: its ways are left out)")
        ways = {way: flags for way, flags in ways.items() if not flags[0]}
    position = [cached]
    switches = settings.current()
    kernel_on = switches.decode_kernel

    def step(kernel, attention, stack, attend, widen):
        switches.decode_kernel = "on" if kernel else "off"
        kernels.attention_kernel = kernel_attention if attention else (lambda *a, **k: None)
        kernels.linears = stacked if stack else one_by_one
        kernels.decode_attention = sdpa if attend else _two_matmul_attention
        t = position[0]
        position[0] = cached + (t + 1 - cached) % 190
        with torch.inference_mode():
            t0 = time.perf_counter()
            hidden = model(tokens, position_ids=torch.full((rows, 1), t), cache=caches[widen],
                           cache_start=t, logits_to_keep=1, return_hidden=True)[:, -1]
            model.lm_head(hidden).float().argmax(-1)
            return time.perf_counter() - t0
    print(f"{machine()}; checkpoint {weights}; {dtype}; one decode step of {rows} sequences over "
          f"{cached}-{cached + 189} cached tokens (positions cycle); the ways in alternating "
          f"rounds of two steps (the second timed), {rounds} rounds")
    times: dict[str, list[float]] = {way: [] for way in ways}
    try:
        for way in ways.values():
            step(*way), step(*way)  # make the prepacked copies each way needs
        for _ in range(rounds):
            for way, flags in ways.items():
                step(*flags)
                times[way].append(step(*flags))
    finally:
        kernels.linears, kernels.decode_attention = stacked, sdpa
        kernels.attention_kernel = kernel_attention
        switches.decode_kernel = kernel_on
    for way, ts in times.items():
        print(f"  {way:34s} median {1e3 * statistics.median(ts):6.1f} ms  "
              f"best {1e3 * min(ts):6.1f} ms")


def prefill(weights, data, repeats: int, n_prompts: int, steps: int, dtype: str) -> None:
    from qwenlite.accel import apply
    from qwenlite.data.tokenizer import Tokenizer
    from qwenlite.evaluation.generation import generate
    from qwenlite.model import load_model

    prompts = llmtime_prompts(Tokenizer(weights), n_prompts, steps, data)
    model = apply(load_model(weights, dtype=dtype))
    print(f"{machine()}; checkpoint {weights}; {dtype}; {n_prompts} prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens")
    generate(model, prompts, 1, eos_token_id=[])  # warm-up
    results: dict[str, list[float]] = {"padded batch": [], "one by one": []}
    for _ in range(repeats):
        for name, flag in (("padded batch", False), ("one by one", True)):
            out = generate(model, prompts, 1, eos_token_id=[], per_sequence_prefill=flag)
            results[name].append(out.prefill_seconds)
    for name, times in results.items():
        print(f"  {name:12s} prefill " + ", ".join(f"{t:.2f}" for t in times) + " s")


MALLOC_PROBE = """
import json, resource, time, torch, torch.nn.functional as F
from qwenlite.accel.memory import keep_freed_memory
tuned = keep_freed_memory()
a, b = torch.randn(4, 512, 4864), torch.randn(4, 512, 4864)
logits = torch.randn(256, 151936)
out = {"tuned": tuned}
for name, fn in (("a * b, (4, 512, 4864)", lambda: a * b),
                 ("silu, (4, 512, 4864)", lambda: F.silu(a)),
                 ("log_softmax, (256, 151936)", lambda: torch.log_softmax(logits, -1))):
    fn()
    f0, best = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, 1e9
    for _ in range(5):
        t0 = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t0)
    out[name] = (best, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5)
print(json.dumps(out))
"""


def malloc() -> None:
    print(f"{machine()}; fresh results of large elementwise ops, best of 5, page faults per call")
    for setting in ("system", "keep"):
        env = {**os.environ, "QWENLITE_MALLOC": setting}
        proc = subprocess.run([sys.executable, "-c", MALLOC_PROBE], env=env, check=True,
                              capture_output=True, text=True)
        res = json.loads(proc.stdout)
        label = "kept freed memory" if res.pop("tuned") else "glibc as it is"
        print(f"  {label}:")
        for name, (seconds, faults) in res.items():
            print(f"    {name:28s} {1e3 * seconds:7.1f} ms  {faults:9.0f} faults")


def decode_attention(rows: int, cached: int, repeats: int) -> None:
    from qwenlite.accel.kernels import decode_attention
    from qwenlite.accel.memory import keep_freed_memory

    keep_freed_memory()  # as load_model sets it: fresh 1-4 MB results would fault in page by page

    gen = torch.Generator().manual_seed(0)
    max_len = cached + 100
    caches = [(torch.randn(rows, 2, max_len, 64, generator=gen),
               torch.randn(rows, 2, max_len, 64, generator=gen)) for _ in range(24)]
    mask = torch.ones(rows, 1, 1, cached, dtype=torch.bool)
    mask[: rows // 2, ..., :50] = False  # half the sequences left-padded
    q = torch.randn(rows, 14, 1, 64, generator=gen)
    ways = {
        "SDPA": lambda k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                           enable_gqa=True),
        "decode_attention": lambda k, v: decode_attention(q, k, v, attn_mask=mask),
        "two matmuls": lambda k, v: _two_matmul_attention(q, k, v, attn_mask=mask),
    }
    from qwenlite.accel import skinny

    bf16_caches = [(k.bfloat16(), v.bfloat16()) for k, v in caches]
    kernel = skinny.enabled()
    if kernel:
        ways["decode kernel"] = lambda k, v: skinny.attention(q, k, v, mask, 64 ** -0.5)
    k, v = caches[0][0][:, :, :cached], caches[0][1][:, :, :cached]
    errs = {way: (ways["SDPA"](k, v) - fn(k, v)).abs().max().item()
            for way, fn in ways.items() if way != "SDPA"}
    print(f"{machine()}; {rows} sequences x 14 heads attending to {cached} cached tokens, "
          f"24 layers, best of {repeats}; max |diff| from SDPA: "
          + ", ".join(f"{way} {e:.1e}" for way, e in errs.items())
          + ("" if kernel else f" ({skinny.status()})"))
    runs = [(way, fn, caches) for way, fn in ways.items()]
    runs.append(("widening a bf16 cache", lambda k, v: (k.float(), v.float()), bf16_caches))
    if kernel:
        runs.append(("decode kernel, bf16 cache",
                     lambda k, v: skinny.attention(q, k, v, mask, 64 ** -0.5), bf16_caches))
    with torch.inference_mode():
        for way, fn, store in runs:
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                for kc, vc in store:
                    fn(kc[:, :, :cached], vc[:, :, :cached])  # cache views, as in the model
                best = min(best, time.perf_counter() - t0)
            print(f"  {way:26s} {1e3 * best:6.1f} ms per step")


def train_attention(dtype: str, rows: int, seq: int, repeats: int) -> None:
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    heads, kv_heads, dim = 14, 2, 64
    group = heads // kv_heads
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dt)

    q = randn(rows, heads, seq, dim).requires_grad_()
    k, v = (randn(rows, kv_heads, seq, dim).requires_grad_() for _ in range(2))
    grad = randn(rows, heads, seq, dim)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def kernel(q, k, v):
        return flash.attention(q, k, v, is_causal=True, enable_gqa=True)

    def forward(fn):  # as in training: autograd records it
        return lambda: fn(q, k, v)

    def forward_backward(fn):
        def run():
            fn(q, k, v).backward(grad)
            q.grad = k.grad = v.grad = None
        return run

    from qwenlite.accel import flash, settings

    settings.current().train_attention = "1"  # measured wherever it runs
    served = dt == torch.bfloat16 and flash.available()
    sdpa_fwd, _ = timed(forward(sdpa), repeats, warmup=1)
    sdpa_both, _ = timed(forward_backward(sdpa), repeats, warmup=1)
    if served:
        mine = (timed(forward(kernel), repeats, warmup=1)[0],
                timed(forward_backward(kernel), repeats, warmup=1)[0])
    # each KV head's query heads stacked: m = 7·seq rows against seq keys
    b, m = rows * kv_heads, group * seq
    rows_dim, rows_keys = randn(b, m, dim), randn(b, m, seq)
    keys_dim = randn(b, seq, dim)
    matmuls = {  # name: (inputs, how many of it the forward and the backward run)
        "rows×64 · 64×keys (scores, dP, recomputed scores)":
            (lambda: torch.bmm(rows_dim, keys_dim.transpose(1, 2)), 1, 2),
        "rows×keys · keys×64 (P·V, dS·K)": (lambda: torch.bmm(rows_keys, keys_dim), 1, 1),
        "keys×rows · rows×64 (Pᵀ·dO, dSᵀ·Q)":
            (lambda: torch.bmm(rows_keys.transpose(1, 2), rows_dim), 0, 2),
    }
    flops = 2 * b * m * seq * dim  # each of these matmuls, whole square
    print(f"{machine()}; {dtype}, {rows} sequences x {seq} tokens, 14 heads over 2 KV heads, "
          f"one layer (x24 for the model), best of {repeats}")
    print(f"  SDPA causal forward             {1e3 * sdpa_fwd:7.1f} ms")
    print(f"  SDPA causal forward + backward  {1e3 * sdpa_both:7.1f} ms "
          f"(backward {1e3 * (sdpa_both - sdpa_fwd):.1f} ms)")
    if served:
        print(f"  qwenlite.accel.flash forward    {1e3 * mine[0]:7.1f} ms")
        print(f"  qwenlite.accel.flash fwd + bwd  {1e3 * mine[1]:7.1f} ms "
              f"(backward {1e3 * (mine[1] - mine[0]):.1f} ms; {sdpa_both / mine[1]:.2f}x SDPA)")
    else:
        print("  qwenlite.accel.flash: does not run here (bf16 on an AVX512-BF16 CPU only)")
    bound_fwd = bound_both = 0.0
    for name, (fn, n_fwd, n_bwd) in matmuls.items():
        seconds, _ = timed(fn, repeats, warmup=1)
        half = seconds / 2  # the causal half of the square
        bound_fwd += n_fwd * half
        bound_both += (n_fwd + n_bwd) * half
        print(f"  {name:52s} {1e3 * seconds:6.1f} ms whole square, "
              f"{flops / seconds / 1e9:6.1f} GFLOPS")
    scores = torch.randn(b, m, seq, generator=gen)
    softmax, _ = timed(lambda: torch.softmax(scores, -1), repeats, warmup=1)
    print(f"  fp32 row softmax over the scores                     {1e3 * softmax:6.1f} ms "
          "whole square")
    print(f"  bound, matmuls only, causal half: forward {1e3 * bound_fwd:.1f} ms, forward + "
          f"backward {1e3 * bound_both:.1f} ms (SDPA: {sdpa_fwd / bound_fwd:.2f}x and "
          f"{sdpa_both / bound_both:.2f}x that"
          + (f"; qwenlite.accel.flash {mine[0] / bound_fwd:.2f}x and {mine[1] / bound_both:.2f}x)"
             if served else ")"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["decode-matmuls", "decode-bound", "decode-step",
                                         "prefill", "malloc", "decode-attention",
                                         "train-attention"])
    parser.add_argument("--cached", type=int, default=900, help="cached tokens per sequence")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-steps", type=int, default=80)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="fp32, except train-attention's bf16")
    parser.add_argument("--rows", type=int, default=None,
                        help="sequences: 8, except train-attention's 4")
    parser.add_argument("--seq", type=int, default=768, help="train-attention's tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    if args.what != "train-attention":
        args.rows, args.dtype = args.rows or 8, args.dtype or "fp32"
    # The decode kernel is one of the ways measured, also where qwenlite leaves it off by default
    # (``skinny.outpaced``), unless $QWENLITE_DECODE_KERNEL says otherwise.
    os.environ.setdefault("QWENLITE_DECODE_KERNEL", "1")
    if args.what != "malloc":  # measured as qwenlite's commands run (cli.main_guard sets it)
        from qwenlite.accel.memory import keep_freed_memory

        keep_freed_memory()
    if args.what == "decode-matmuls":
        decode_matmuls(args.rows, args.repeats)
    elif args.what == "decode-bound":
        decode_bound(args.repeats)
    elif args.what == "decode-step":
        decode_step(weights_from_args(args.weights), args.dtype, args.rows, args.cached,
                    args.repeats)
    elif args.what == "prefill":
        prefill(weights_from_args(args.weights), args.data, args.repeats, args.prompts,
                args.prompt_steps, args.dtype)
    elif args.what == "decode-attention":
        decode_attention(args.rows, args.cached, args.repeats)
    elif args.what == "train-attention":
        train_attention(args.dtype or "bf16", args.rows or 4, args.seq, args.repeats)
    else:
        malloc()


if __name__ == "__main__":
    main()
