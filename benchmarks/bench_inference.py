"""Inference speed: qwenlite vs transformers, measured in one run on one checkpoint.

Times (1) batched greedy generation of LLMTIME prompts — prefill and decode separately — and
(2) one forward pass over a (batch × seq) block, in fp32 and bf16, and prints the ratios and the
achieved GFLOPS against the matmul rates measured in the same run (torch's in the dtype, and the
fp32 one where qwenlite runs bf16 matmuls on the fp32 units) (all FLOPS in the coursework's
convention: an (m×n)(n×p) matmul is m·p·(2n−1)).

    QWENLITE_WEIGHTS=/path/to/checkpoint python benchmarks/bench_inference.py
    python benchmarks/bench_inference.py --weights DIR --dtypes bf16 --prompts 8 --new-tokens 100

Both implementations run in this one process, loaded side by side, so they share its malloc
setting (``--malloc``; by default the one qwenlite makes, ``qwenlite.accel.memory``). After a
warm-up each, they are timed in alternating rounds (``--repeats``) and each phase's best round is
kept: on a shared machine one implementation's single run can land in a slow spell (single runs
of the same code measured a prefill ratio from 0.95× to 1.25× here). transformers' decode is
timed from its first new token to its last (a streamer notes when each arrives), as qwenlite's
``generate()`` times its own.

Say which checkpoint produced any figure you quote (the offline stand-in is not the official
Qwen2.5-0.5B-Instruct, but has its exact architecture, so timings carry over).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import (
    DTYPES,
    add_malloc_arg,
    describe_rates,
    fmt_table,
    free_memory,
    left_pad,
    llmtime_prompts,
    machine,
    matmul_rates,
    peak_rss_gb,
    set_malloc,
    timed,
    weights_from_args,
    write_results,
)

from qwenlite.accel import apply
from qwenlite.data.tokenizer import Tokenizer
from qwenlite.evaluation.generation import generate
from qwenlite.model import load_model


class Qwenlite:
    name = "qwenlite"

    def __init__(self, weights, dtype, prompts, new_tokens, fwd_ids, pad_id):
        self.model = apply(load_model(weights, dtype=dtype))
        self.prompts, self.new_tokens, self.fwd_ids = prompts, new_tokens, fwd_ids

    def warm_up(self):
        generate(self.model, self.prompts, 2, eos_token_id=[])  # full size: caches, packing
        with torch.inference_mode():
            self.model(self.fwd_ids)

    def round(self):
        out = generate(self.model, self.prompts, self.new_tokens, eos_token_id=[])
        with torch.inference_mode():
            fwd_s, _ = timed(lambda: self.model(self.fwd_ids))
        gen = out.flops  # as run: on a CPU each long prompt is prefilled at its own length
        prefill_flops = sum(v for k, v in gen.items() if k.startswith("prefill"))
        fwd_flops = self.model.flops(self.fwd_ids.shape[1]).total() * self.fwd_ids.shape[0]
        return dict(prefill_s=out.prefill_seconds, decode_s=out.decode_seconds, steps=out.steps,
                    forward_s=fwd_s, prefill_flops=prefill_flops,
                    decode_flops=gen.total() - prefill_flops, forward_flops=fwd_flops)


class _TokenClock:
    """A ``generate()`` streamer that notes when the prompt and then each new token arrive."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


class Transformers:
    name = "transformers"

    def __init__(self, weights, dtype, prompts, new_tokens, fwd_ids, pad_id):
        from transformers import Qwen2ForCausalLM

        self.model = Qwen2ForCausalLM.from_pretrained(weights, dtype=dtype,
                                                      attn_implementation="sdpa").eval()
        self.ids, self.mask = left_pad(prompts, pad_id)
        self.new_tokens, self.fwd_ids = new_tokens, fwd_ids
        self.kwargs = dict(do_sample=False, pad_token_id=pad_id, eos_token_id=None, top_k=None,
                           top_p=None, temperature=None)

    def warm_up(self):
        with torch.inference_mode():
            self.model.generate(self.ids, attention_mask=self.mask, max_new_tokens=2,
                                **self.kwargs)
            self.model(self.fwd_ids)

    def round(self):
        ids, mask = self.ids, self.mask
        with torch.inference_mode():
            # Prefill as generate() runs it: the prompt forward with a cache, last logits only.
            prefill_s, _ = timed(lambda: self.model(ids, attention_mask=mask, use_cache=True,
                                                    logits_to_keep=1))
            clock = _TokenClock()
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=self.new_tokens,
                                      min_new_tokens=self.new_tokens, streamer=clock,
                                      **self.kwargs)
            assert out.shape[1] == ids.shape[1] + self.new_tokens
            assert len(clock.times) == 1 + self.new_tokens
            fwd_s, _ = timed(lambda: self.model(self.fwd_ids))
        # decode: from the first new token to the last, as qwenlite's generate() times it
        return dict(prefill_s=prefill_s, decode_s=clock.times[-1] - clock.times[1],
                    steps=self.new_tokens - 1, forward_s=fwd_s)


def best_of(rounds: list[dict]) -> dict:
    """Each phase's best time over the rounds (with the FLOPS and steps of the round)."""
    best = dict(rounds[0])
    for r in rounds[1:]:
        for phase in ("prefill_s", "decode_s", "forward_s"):
            best[phase] = min(best[phase], r[phase])
    best["rounds"] = rounds
    return best


def measure(weights, dtype, prompts, new_tokens, fwd_ids, pad_id, repeats):
    """Both implementations loaded side by side, warmed up, then timed in alternating rounds
    (qwenlite, transformers, qwenlite, ...): a slow spell of a shared machine then hits both, and
    each phase's best round is kept."""
    impls = [cls(weights, dtype, prompts, new_tokens, fwd_ids, pad_id)
             for cls in (Qwenlite, Transformers)]
    for impl in impls:
        impl.warm_up()
    rounds = {impl.name: [] for impl in impls}
    for r in range(repeats):
        for impl in impls:
            rounds[impl.name].append(impl.round())
            x = rounds[impl.name][-1]
            print(f"  round {r + 1} {impl.name}: prefill {x['prefill_s']:.2f} s, decode "
                  f"{x['decode_s']:.2f} s, forward {x['forward_s']:.2f} s", flush=True)
    del impls
    free_memory()
    return best_of(rounds["qwenlite"]), best_of(rounds["transformers"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=DTYPES)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-steps", type=int, default=80, help="LLMTIME timesteps per prompt")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--forward-batch", type=int, default=4)
    parser.add_argument("--forward-seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2,
                        help="alternating timed rounds per implementation; the best is kept")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    add_malloc_arg(parser)
    args = parser.parse_args()
    malloc = set_malloc(args.malloc)
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = weights_from_args(args.weights)
    tok = Tokenizer(weights)
    prompts = llmtime_prompts(tok, args.prompts, args.prompt_steps, args.data)
    gen = torch.Generator().manual_seed(0)
    fwd_ids = torch.randint(0, 151000, (args.forward_batch, args.forward_seq), generator=gen)
    from qwenlite.accel import skinny

    print(f"checkpoint {weights}; {machine()}; malloc ({malloc}) shared by both implementations; "
          f"qwenlite's {skinny.status()}")
    print(f"generation: {len(prompts)} prompts of {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens, {args.new_tokens} new tokens, greedy; "
          f"forward: {args.forward_batch}x{args.forward_seq}; best of {args.repeats} "
          "alternating rounds after a warm-up")
    results = {"machine": machine(), "weights": str(weights), "args": vars(args),
               "malloc": malloc, "decode_kernel": skinny.status(), "runs": {}}
    rows = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        rates = matmul_rates(dtype)
        ours, theirs = measure(weights, dtype, prompts, args.new_tokens, fwd_ids,
                               tok.pad_token_id, args.repeats)
        results["runs"][name] = {"matmul_rates": rates, "qwenlite": ours, "transformers": theirs}
        b = len(prompts)
        for phase, flops_key in (("prefill", "prefill_flops"), ("decode", "decode_flops"),
                                 ("forward", "forward_flops")):
            t_ours, t_hf = ours[f"{phase}_s"], theirs[f"{phase}_s"]
            gflops = ours[flops_key] / t_ours / 1e9
            extra = ""
            if phase == "decode":
                extra = (f"{b * ours['steps'] / t_ours:.1f} vs {b * theirs['steps'] / t_hf:.1f} "
                         "tok/s")
            rows.append([name, phase, f"{t_ours:.3f}", f"{t_hf:.3f}", f"{t_hf / t_ours:.2f}x",
                         f"{gflops:.1f}", f"{100 * gflops * 1e9 / rates['native']:.0f}%",
                         f"{100 * gflops * 1e9 / rates['units']:.0f}%", extra])
        print(f"{describe_rates(name, rates)}; peak RSS so far {peak_rss_gb():.1f} GB")
    print(fmt_table(rows, ["dtype", "phase", "qwenlite s", "transformers s", "speed-up",
                           "qwenlite GFLOPS", "of dtype matmul", "of units' matmul", "decode"]))
    write_results(args.out, results)


if __name__ == "__main__":
    main()
