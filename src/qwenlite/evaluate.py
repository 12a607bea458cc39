"""``python -m qwenlite.evaluate``: forecast Lotka–Volterra systems with Qwen2.5 and score them.

For each system of a split, the first ``--context-steps`` timesteps are LLMTIME-encoded as the
prompt; the KV-cached batched generator continues it with only the tokens a forecast can contain
(digits, ``.``, ``,``, ``;``) and stops each system after ``--horizon`` timesteps. Forecasts are
decoded tolerantly (unparseable or missing steps are counted, then filled so they are penalised,
not dropped) and scored against the truth in original and in scaled units, next to baselines
scored on the same systems and horizon: persistence, linear extrapolation and a Lotka–Volterra ODE
fitted to the context. Model selection uses ``--split val``; the test split is only reachable by
asking for it.

Outputs in ``--out``: ``metrics.json``, ``predictions.npz``, ``forecasts.png``,
``error_vs_horizon.png``; the generation FLOPS go into the FLOPS ledger.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwenlite.cli import (ArgumentParser, add_data_arg, add_device_args, add_weights_arg,
                          creatable_dir, existing_dir, main_guard, nonnegative_float,
                          nonnegative_int, one_line_text, positive_int, probability,
                          resolve_device, resolve_dtype, resolve_weights, warn_if_slow_bf16,
                          writable_file)
from qwenlite.errors import QwenliteError
from qwenlite.io import check_dir_creatable


@dataclass
class Forecasts:
    """Decoded model forecasts for S systems.

    Attributes:
        values: (S, horizon, V) in original units, missing steps filled (see ``n_missing``).
        samples: (n_samples, S, horizon, V) every sample, filled the same way.
        n_missing: (S,) horizon steps that had to be filled (summed over samples).
        n_invalid: (S,) fields that could not be parsed (summed over samples).
        texts: the generated text of the first sample per system.
        flops: FLOPS of all generation (prefill + decode), batch and samples included.
        tokens: prompt tokens (padding included) plus generated tokens, over all batches.
    """

    values: np.ndarray
    samples: np.ndarray
    n_missing: np.ndarray
    n_invalid: np.ndarray
    texts: list[str]
    flops: int
    seconds: float
    tokens: int = 0


def forecast_token_ids(tok, settings) -> tuple[list[int], int]:
    """Token ids a forecast may contain, and the id of the timestep separator."""
    from qwenlite.preprocessor import allowed_characters

    ids = []
    for ch in allowed_characters(settings):
        enc = tok.encode(ch)
        if len(enc) != 1:
            raise QwenliteError(f"tokenizer does not map {ch!r} to a single token")
        ids.append(enc[0])
    sep = tok.encode(settings.time_sep)
    return ids, sep[0]


def max_tokens_for(settings, horizon: int, n_vars: int, int_digits: int = 3) -> int:
    """A token budget that fits ``horizon`` timesteps of values below 10**int_digits."""
    per_value = int_digits + 1 + settings.decimals
    return horizon * (n_vars * (per_value + 1)) + 2


def llm_forecast(model, tok, settings, contexts: np.ndarray, horizon: int, *, batch: int = 32,
                 samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 progress: bool = True, on_batch=None) -> Forecasts:
    """Forecast ``horizon`` steps after each context with the language model.

    Args:
        contexts: (S, k, V) in original units.
        samples: forecasts per system (> 1 needs ``temperature > 0``).
        on_batch: called as ``on_batch(flops, tokens)`` with the totals so far after every
            batch (the evaluator records them in the ledger, so an interrupted evaluation is
            still charged for what it spent).
    """
    from tqdm import tqdm

    from qwenlite.generate import generate
    from qwenlite.metrics import pad_forecast
    from qwenlite.preprocessor import decode, encode

    s_count, _, n_vars = contexts.shape
    allowed, sep_id = forecast_token_ids(tok, settings)
    budget = max_tokens_for(settings, horizon, n_vars)
    prompts = [tok.encode(encode(c, settings)) for c in contexts]
    out = np.zeros((samples, s_count, horizon, n_vars))
    n_missing = np.zeros(s_count, dtype=int)
    n_invalid = np.zeros(s_count, dtype=int)
    texts = [""] * s_count
    flops = tokens = 0

    def stop(generated: torch.Tensor) -> torch.Tensor:
        return (generated == sep_id).sum(-1) >= horizon

    t0 = time.perf_counter()
    bar = tqdm(total=samples * s_count, disable=not progress, unit="system", desc="forecasting")
    for k in range(samples):
        for start in range(0, s_count, batch):
            chunk = list(range(start, min(start + batch, s_count)))
            gen = generate(model, [prompts[i] for i in chunk], budget, temperature=temperature,
                           top_p=top_p, seed=seed + 1000 * k + start, eos_token_id=[],
                           pad_token_id=tok.pad_token_id or 0, allowed_tokens=allowed,
                           stop_fn=stop)
            flops += gen.flops.total()
            tokens += len(chunk) * gen.prompt_len + sum(len(t) for t in gen.tokens)
            if on_batch is not None:
                on_batch(flops, tokens)
            for i, new_ids in zip(chunk, gen.tokens):
                text = tok.decode(new_ids)
                result = decode(text, settings, n_vars=n_vars)
                values, missing = pad_forecast(result.values[:horizon], horizon, contexts[i])
                out[k, i] = values
                n_missing[i] += missing
                n_invalid[i] += result.n_invalid
                if k == 0:
                    texts[i] = text
            bar.update(len(chunk))
    bar.close()
    point = np.median(out, axis=0) if samples > 1 else out[0]
    return Forecasts(point, out, n_missing, n_invalid, texts, flops, time.perf_counter() - t0,
                     tokens)


def score(pred: np.ndarray, truth: np.ndarray, context: np.ndarray, alpha: float) -> dict:
    """Point metrics in original and scaled units, with bootstrap intervals over systems."""
    from qwenlite.metrics import error_by_horizon, point_metrics, summarize

    result = {}
    for units, factor in (("original", 1.0), ("scaled", 1.0 / alpha)):
        m = point_metrics(pred * factor, truth * factor, context * factor)
        per_system = m.pop("per_system", {})
        result[units] = {
            "metrics": m,
            "systems": {name: summarize(np.asarray(v)) for name, v in per_system.items()},
        }
    mae_h, mse_h = error_by_horizon(pred, truth)[:2]
    result["by_horizon"] = {"mae": np.asarray(mae_h).tolist(), "mse": np.asarray(mse_h).tolist()}
    return result


def plot(out_dir: Path, time_axis, contexts, truth, preds: dict, by_horizon: dict,
         n_show: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, h = contexts.shape[1], truth.shape[1]
    t = np.asarray(time_axis)[: k + h]
    n_show = min(n_show, len(contexts))
    fig, axes = plt.subplots(n_show, 2, figsize=(11, 2.6 * n_show), squeeze=False)
    names = ("prey", "predator")
    for row in range(n_show):
        for v in range(2):
            ax = axes[row, v]
            ax.axvspan(t[0], t[k - 1], color="0.92", label="context" if row == v == 0 else None)
            ax.plot(t, np.concatenate([contexts[row, :, v], truth[row, :, v]]), "k-", lw=1.2,
                    label="truth")
            for name, p in preds.items():
                ax.plot(t[k:], p[row, :, v], lw=1.2, label=name,
                        ls="-" if name == "qwen" else "--")
            ax.set_title(f"system {row}: {names[v]}", fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(out_dir / "forecasts.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, mae in by_horizon.items():
        ax.plot(np.arange(1, len(mae) + 1), mae, marker="o", ms=3, label=name)
    ax.set_xlabel("horizon step")
    ax.set_ylabel("MAE (original units)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "error_vs_horizon.png", dpi=110)
    plt.close(fig)


def add_forecast_args(parser: ArgumentParser, adapter_required: bool) -> None:
    """Weights, data, device, ``--adapter`` and the forecast's context and horizon (shared by
    ``evaluate`` and ``diagnose``)."""
    add_weights_arg(parser)
    add_data_arg(parser)
    add_device_args(parser)
    parser.add_argument("--adapter", type=existing_dir, metavar="RUN_DIR", default=None,
                        required=adapter_required,
                        help="a training run directory (its adapter, split and α are used)")
    parser.add_argument("--context-steps", type=positive_int, default=80)
    parser.add_argument("--horizon", type=positive_int, default=20)


def build_parser() -> ArgumentParser:
    """The argument parser of ``python -m qwenlite.evaluate``."""
    parser = ArgumentParser(prog="python -m qwenlite.evaluate",
                            description="Forecast with Qwen2.5 (zero-shot or a LoRA adapter) and "
                                        "score against baselines.")
    add_forecast_args(parser, adapter_required=False)
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
    from qwenlite.lora import is_adapter_dir

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
    from qwenlite.preprocessor import LLMTimeSettings, fit_alpha

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
    from qwenlite.baselines import BASELINES
    from qwenlite.budget import Ledger, fmt_flops
    from qwenlite.data import load_dataset, resolve_data
    from qwenlite.generate import generation_flops
    from qwenlite.lora import load_adapter, lora_layers
    from qwenlite.metrics import crps_from_samples, summarize
    from qwenlite.accel import for_device
    from qwenlite.model.loading import load_model
    from qwenlite.preprocessor import encode
    from qwenlite.tokenizer import Tokenizer

    args = parse_args(argv)
    temperature = args.temperature if args.temperature is not None else (
        0.0 if args.samples == 1 else 0.7)
    if args.samples > 1 and temperature <= 0:
        raise QwenliteError("--samples > 1 needs --temperature > 0 (greedy samples are identical)")
    device = resolve_device(args.device)
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
        for layer in lora_layers(model).values():
            layer.merge()  # identical outputs, no extra matmuls while generating
    tok = Tokenizer(weights)

    key = str(out_dir.resolve())
    experiment = args.experiment or f"eval-{tag}-{args.split}"
    longest = max(len(tok.encode(encode(c, settings))) for c in contexts)
    steps = max_tokens_for(settings, h, traj.shape[2])
    per_batch = generation_flops(model, longest, steps - 1, 1).total()
    ledger.plan(key, experiment, "eval", per_batch * len(systems) * args.samples,
                systems=len(systems), split=args.split)
    out_dir.mkdir(parents=True, exist_ok=True)  # only once everything is checked and planned

    fc = llm_forecast(model, tok, settings, contexts, h, batch=args.batch, samples=args.samples,
                      temperature=temperature, top_p=args.top_p, seed=args.seed,
                      progress=not args.no_progress,
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
    }
    if args.samples > 1:
        crps = crps_from_samples(fc.samples, truth)
        results["qwen"]["crps"] = summarize(np.asarray(crps).reshape(len(systems), -1).mean(-1))
    summary = {
        "weights": str(weights), "adapter": args.adapter, "split": args.split,
        "systems": len(systems), "context_steps": k, "horizon": h, "samples": args.samples,
        "temperature": temperature, "top_p": args.top_p, "dtype": args.dtype,
        "alpha": settings.alpha, "decimals": settings.decimals,
        "generation_flops": fc.flops, "generation_seconds": fc.seconds,
        "baseline_seconds": baseline_seconds, "results": results,
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    np.savez_compressed(out_dir / "predictions.npz", systems=systems, context=contexts,
                        truth=truth, samples=fc.samples, n_missing=fc.n_missing,
                        n_invalid=fc.n_invalid, texts=np.asarray(fc.texts),
                        **{f"pred_{n}": p for n, p in preds.items()})
    plot(out_dir, dataset.time, contexts, truth, preds,
         {n: r["by_horizon"]["mae"] for n, r in results.items()})
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
          + (f", adapter {args.adapter}" if args.adapter else ""))
    print("\n".join(rows))
    print(f"missing-step rate {results['qwen']['parse']['missing_step_rate']:.3%}; generation "
          f"{fc.seconds:.1f} s, {fmt_flops(fc.flops)} FLOPS (ledger {ledger.path}); "
          f"outputs in {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
