"""Forecasting throughput: qwenlite's forecaster vs a transformers ``generate()`` loop doing the
same job, measured in one run on one checkpoint.

The job: LLMTIME prompts of ``--context-steps`` timesteps for ``--systems`` systems (one batch),
greedy continuation restricted to digits and separators, each system stopped after ``--horizon``
timesteps. transformers gets the same restriction (a logits processor) and the same stopping rule
(a stopping criterion), so both produce the same forecasts; the script checks that they agree and
prints timesteps forecast per second for each, and the ratio.

    QWENLITE_WEIGHTS=DIR python benchmarks/bench_forecast.py --dtypes bf16 fp32
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import (
    DTYPES,
    ROOT,
    add_malloc_arg,
    fmt_table,
    free_memory,
    left_pad,
    machine,
    set_malloc,
    weights_from_args,
    write_results,
)

from qwenlite.accel import apply
from qwenlite.data import load_dataset, resolve_data
from qwenlite.data.llmtime import LLMTimeSettings, decode, encode, fit_alpha
from qwenlite.data.tokenizer import Tokenizer
from qwenlite.evaluation.forecasting import forecast_token_ids, llm_forecast, max_tokens_for
from qwenlite.model import load_model


def transformers_forecast(weights, dtype, tok, settings, contexts, horizon):
    from transformers import (
        LogitsProcessor,
        LogitsProcessorList,
        Qwen2ForCausalLM,
        StoppingCriteria,
        StoppingCriteriaList,
    )

    allowed, sep = forecast_token_ids(tok, settings)
    model = Qwen2ForCausalLM.from_pretrained(weights, dtype=dtype, attn_implementation="sdpa").eval()

    class Allowed(LogitsProcessor):
        def __call__(self, input_ids, scores):
            mask = torch.full_like(scores, float("-inf"))
            mask[:, allowed] = 0
            return scores + mask

    class Horizon(StoppingCriteria):
        def __init__(self, prompt_len):
            self.prompt_len = prompt_len

        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids[:, self.prompt_len:] == sep).sum(-1) >= horizon

    prompts = [tok.encode(encode(c, settings)) for c in contexts]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=False, top_k=None, top_p=None,
                             temperature=None, max_new_tokens=max_tokens_for(settings, horizon, 2),
                             logits_processor=LogitsProcessorList([Allowed()]),
                             stopping_criteria=StoppingCriteriaList([Horizon(ids.shape[1])]),
                             pad_token_id=tok.pad_token_id, eos_token_id=None)
    seconds = time.perf_counter() - t0
    forecasts = []
    for row in out[:, ids.shape[1]:].tolist():
        text = tok.decode(row)
        text = text[: [i for i, ch in enumerate(text) if ch == ";"][horizon - 1] + 1] \
            if text.count(";") >= horizon else text
        forecasts.append(decode(text, settings).values[:horizon])
    del model
    free_memory()
    return seconds, forecasts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=DTYPES)
    parser.add_argument("--systems", type=int, default=32)
    parser.add_argument("--context-steps", type=int, default=80)
    parser.add_argument("--horizon", type=int, default=20)
    parser.add_argument("--out", default=None)
    add_malloc_arg(parser)
    args = parser.parse_args()
    malloc = set_malloc(args.malloc)
    weights = weights_from_args(args.weights)
    tok = Tokenizer(weights)
    real = ROOT.parent / "shared" / "data" / "lotka_volterra_data.h5"
    data = load_dataset(resolve_data(args.data or (str(real) if real.is_file() else None)))
    traj = data.trajectories.astype(np.float64)
    settings = fit_alpha(traj, LLMTimeSettings())
    contexts = traj[: args.systems, : args.context_steps]
    print(f"checkpoint {weights}; {machine()}; {args.systems} systems, "
          f"{args.context_steps} -> {args.horizon} steps, greedy, one batch; malloc ({malloc}) "
          "shared by both implementations")
    rows, results = [], {"machine": machine(), "weights": str(weights), "args": vars(args)}
    job = args.systems * args.horizon
    for name in args.dtypes:
        dtype = DTYPES[name]
        model = apply(load_model(weights, dtype=dtype))
        llm_forecast(model, tok, settings, contexts[:2, :8], 2, progress=False)  # warm-up
        ours = llm_forecast(model, tok, settings, contexts, args.horizon, batch=args.systems,
                            progress=False)
        del model
        free_memory()
        hf_s, hf_fc = transformers_forecast(weights, dtype, tok, settings, contexts, args.horizon)
        agree = np.mean([len(b) == args.horizon and np.allclose(a, b)
                         for a, b in zip(ours.values, hf_fc)])
        rows.append([name, f"{ours.seconds:.2f}", f"{hf_s:.2f}", f"{job / ours.seconds:.2f}",
                     f"{job / hf_s:.2f}", f"{hf_s / ours.seconds:.2f}x", f"{100 * agree:.0f}%"])
        results[name] = {"qwenlite_s": ours.seconds, "transformers_s": hf_s,
                         "agreement": float(agree), "qwenlite_flops": ours.flops}
    print(fmt_table(rows, ["dtype", "qwenlite s", "transformers s", "qwenlite steps/s",
                           "transformers steps/s", "speed-up", "same forecasts"]))
    write_results(args.out, results)


if __name__ == "__main__":
    main()
