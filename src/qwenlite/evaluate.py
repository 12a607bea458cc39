"""``python -m qwenlite.evaluate``: forecast Lotka-Volterra systems and score them against the baselines
(:mod:`qwenlite.evaluation.forecasting`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from qwenlite import rates
from qwenlite.cli import (
    ArgumentParser,
    creatable_dir,
    main_guard,
    nonnegative_float,
    nonnegative_int,
    one_line_text,
    pick_dtype,
    positive_int,
    probability,
    resolve_device,
    resolve_dtype,
    resolve_weights,
    warn_if_slow_bf16,
    writable_file,
)
from qwenlite.errors import QwenliteError
from qwenlite.evaluation.forecasting import (
    add_forecast_args,
    llm_forecast,
    max_tokens_for,
    plot,
    score,
)
from qwenlite.io import check_dir_creatable


def build_parser() -> ArgumentParser:
    """The argument parser of ``python -m qwenlite.evaluate``."""
    parser = ArgumentParser(prog="python -m qwenlite.evaluate",
                            description="Forecast with Qwen2.5 (zero-shot or a LoRA adapter) and "
                                        "score against baselines.")
    add_forecast_args(parser, adapter_required=False)
    parser.add_argument("--adapter-scale", type=nonnegative_float, default=1.0, metavar="LAMBDA",
                        help="score the adapter scaled: W + LAMBDA*BA and LAMBDA x the logit "
                             "bias (default 1: as trained; 0: the base model)")
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="systems to evaluate (test only when asked for)")
    parser.add_argument("--samples", type=positive_int, default=1,
                        help="forecasts per system; > 1 samples (median forecast and CRPS)")
    parser.add_argument("--temperature", type=nonnegative_float, default=None,
                        help="sampling temperature (default 0 = greedy for 1 sample, 0.7 else)")
    parser.add_argument("--top-p", type=probability, default=0.9)
    parser.add_argument("--systems", type=positive_int, default=None,
                        help="evaluate the first N systems of the split (default all)")
    parser.add_argument("--batch", type=positive_int, default=32, help="systems per batch")
    parser.add_argument("--grammar", action=argparse.BooleanOptionalAction, default=True,
                        help="generate under the LLMTIME grammar, so every forecast parses "
                             "(--no-grammar: only digits and separators)")
    parser.add_argument("--seed", type=nonnegative_int, default=0,
                        help="split seed and sampler seed")
    parser.add_argument("--out", type=creatable_dir, default=None,
                        help="output directory (default runs/eval-...)")
    parser.add_argument("--experiment", type=one_line_text, default="",
                        help="name in the FLOPS ledger")
    parser.add_argument("--ledger", type=writable_file, default=None, help="FLOPS ledger file")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def parse_args(argv):
    """The parsed command line (see :func:`build_parser`)."""
    return build_parser().parse_args(argv)


def check_run_dir(run: str | Path) -> Path:
    """``run`` as a Path, if it is a training run directory (split, α and an adapter or logit
    bias); else a one-line error."""
    from qwenlite.training.lora import is_adapter_dir

    run = Path(run)
    for name in ("split.json", "llmtime.json"):
        if not (run / name).is_file():
            raise QwenliteError(f"{run} is not a training run directory: no {name}")
    if not is_adapter_dir(run / "adapter"):
        raise QwenliteError(f"{run} is not a training run directory: no adapter in {run}/adapter")
    return run


def load_split_and_settings(args, dataset):
    """The run's split and α (with --adapter), else a fresh split and α fitted on its train part
    by the same rule as training."""
    from qwenlite.data import Split, split_systems
    from qwenlite.data.llmtime import LLMTimeSettings, fit_alpha

    if args.adapter:
        run = check_run_dir(args.adapter)
        split = Split.load(run / "split.json")
        settings = LLMTimeSettings.load(run / "llmtime.json")
        if max(np.max(split.train), np.max(split.val), np.max(split.test)) >= len(
                dataset.trajectories):
            raise QwenliteError(f"the split of {run} does not fit this dataset "
                                f"({len(dataset.trajectories)} systems); pass the run's --data")
        return split, settings
    split = split_systems(len(dataset.trajectories), seed=args.seed)
    settings = fit_alpha(dataset.trajectories[split.train], LLMTimeSettings())
    return split, settings


@main_guard
def main(argv: list[str] | None = None) -> int:
    """Evaluate; every input (paths, ledger, weights, data, adapter, budget) is checked before
    the output directory or the ledger is written."""
    from qwenlite.accel import for_device
    from qwenlite.data import load_dataset, resolve_data
    from qwenlite.data.llmtime import encode
    from qwenlite.data.tokenizer import Tokenizer
    from qwenlite.evaluation.baselines import BASELINES
    from qwenlite.evaluation.generation import run_flops
    from qwenlite.evaluation.metrics import crps_from_samples, summarize
    from qwenlite.model.loading import checkpoint_id, load_model
    from qwenlite.training.ledger import Ledger, fmt_flops
    from qwenlite.training.lora import load_adapter, lora_layers, scale_adapter

    args = parse_args(argv)
    temperature = args.temperature if args.temperature is not None else (
        0.0 if args.samples == 1 else 0.7)
    if args.samples > 1 and temperature <= 0:
        raise QwenliteError("--samples > 1 needs --temperature > 0 (greedy samples are identical)")
    if args.adapter_scale != 1 and not args.adapter:
        raise QwenliteError("--adapter-scale scales an adapter: pass --adapter RUN_DIR")
    device = resolve_device(args.device)
    args.dtype = pick_dtype(args.dtype, device)
    k, h = args.context_steps, args.horizon
    tag = "adapter" if args.adapter else "zeroshot"
    out_dir = check_dir_creatable(args.out or f"runs/eval-{tag}-{args.split}-{k}to{h}",
                                  "output directory")
    ledger = Ledger(args.ledger)
    ledger.check()
    weights = resolve_weights(args.weights)
    dataset = load_dataset(resolve_data(args.data))
    if k + h > dataset.trajectories.shape[1]:
        raise QwenliteError(f"--context-steps {k} + --horizon {h} exceed the "
                            f"{dataset.trajectories.shape[1]} timesteps of the series")
    split, settings = load_split_and_settings(args, dataset)
    systems = np.asarray(getattr(split, args.split))[: args.systems]
    traj = dataset.trajectories[systems].astype(np.float64)
    contexts, truth = traj[:, :k], traj[:, k:k + h]

    warn_if_slow_bf16(resolve_dtype(args.dtype), device)
    model = for_device(load_model(weights, dtype=args.dtype, device=device))
    if args.adapter:
        load_adapter(model, Path(args.adapter) / "adapter")
        scale_adapter(model, args.adapter_scale)
        for layer in lora_layers(model).values():
            layer.merge()  # identical outputs, no extra matmuls while generating
    tok = Tokenizer(weights)

    key = str(out_dir.resolve())
    experiment = args.experiment or f"eval-{tag}-{args.split}"
    longest = max(len(tok.encode(encode(c, settings))) for c in contexts)
    steps = max_tokens_for(settings, h, traj.shape[2])
    per_batch = run_flops(model, longest, steps - 1, 1).total()
    ledger.plan(key, experiment, "eval", per_batch * len(systems) * args.samples,
                systems=len(systems), split=args.split)
    out_dir.mkdir(parents=True, exist_ok=True)  # only once everything is checked and planned
    print(rates.start_line(f"forecasting {len(systems)} {args.split} systems (at most)", "generate",
                           per_batch * len(systems) * args.samples, ledger.budget, args.dtype,
                           device, model), file=sys.stderr)

    fc = llm_forecast(model, tok, settings, contexts, h, batch=args.batch, samples=args.samples,
                      temperature=temperature, top_p=args.top_p, seed=args.seed,
                      progress=not args.no_progress, constrained=args.grammar,
                      on_batch=lambda f, t: ledger.record(key, f, tokens=t))
    preds = {"qwen": fc.values}
    t0 = time.perf_counter()
    for name, fn in BASELINES.items():
        preds[name] = np.stack([fn(c, h, np.asarray(dataset.time)[: k + h]) for c in contexts])
    baseline_seconds = time.perf_counter() - t0

    results = {name: score(p, truth, contexts, settings.alpha) for name, p in preds.items()}
    results["qwen"]["parse"] = {
        "systems_with_missing_steps": int((fc.n_missing > 0).sum()),
        "missing_step_rate": float(fc.n_missing.sum() / (len(systems) * h * args.samples)),
        "invalid_fields": int(fc.n_invalid.sum()),
        "grammar": args.grammar,
        "systems_with_masked_steps": int((fc.n_masked > 0).sum()),
        "masked_step_rate": float(fc.n_masked.sum() / (len(systems) * h * args.samples)),
    }
    if args.samples > 1:
        crps = crps_from_samples(fc.samples, truth)
        results["qwen"]["crps"] = summarize(np.asarray(crps).reshape(len(systems), -1).mean(-1))
    summary = {
        "weights": checkpoint_id(weights),
        "adapter": None if not args.adapter else os.path.relpath(args.adapter, out_dir),
        "adapter_scale": args.adapter_scale if args.adapter else None, "split": args.split,
        "systems": len(systems), "context_steps": k, "horizon": h, "samples": args.samples,
        "temperature": temperature, "top_p": args.top_p, "dtype": args.dtype,
        "alpha": settings.alpha, "decimals": settings.decimals,
        "generation_flops": fc.flops, "generation_seconds": fc.seconds,
        "baseline_seconds": baseline_seconds, "results": results,
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    np.savez_compressed(out_dir / "predictions.npz", systems=systems, context=contexts,
                        truth=truth, samples=fc.samples, n_missing=fc.n_missing,
                        n_invalid=fc.n_invalid, n_masked=fc.n_masked, texts=np.asarray(fc.texts),
                        **{f"pred_{n}": p for n, p in preds.items()})
    plot(out_dir, dataset.time, contexts, truth, preds,
         {n: r["by_horizon"]["mae"] for n, r in results.items()})
    rates.record("generate", args.dtype, device, model, fc.flops, fc.seconds)
    ledger.record(key, fc.flops, steps=0, tokens=fc.tokens, status="done", systems=len(systems),
                  seconds=round(fc.seconds, 1))

    rows = []
    for name, r in results.items():
        m = r["original"]["metrics"]["overall"]
        s = r["original"]["systems"]
        mae = s.get("mae", {})
        rows.append(f"{name:<12} MAE {m['mae']:.4f}  MSE {m['mse']:.4f}  "
                    f"median-system MAE {mae.get('median', float('nan')):.4f}")
    print(f"{len(systems)} {args.split} systems, {k} -> {h} steps, weights {weights}"
          + (f", adapter {args.adapter}" if args.adapter else "")
          + (f" scaled by {args.adapter_scale:g}" if args.adapter and args.adapter_scale != 1
             else ""))
    print("\n".join(rows))
    print(f"missing-step rate {results['qwen']['parse']['missing_step_rate']:.3%}, steps the "
          f"grammar changed {results['qwen']['parse']['masked_step_rate']:.3%}; generation "
          f"{fc.seconds:.1f} s, {fmt_flops(fc.flops)} FLOPS (ledger {ledger.path}); "
          f"outputs in {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
