"""``python -m qwenlite.evaluate``: forecast Lotka–Volterra systems with Qwen2.5 and score them.

For each system of a split, the first ``--context-steps`` timesteps are LLMTIME-encoded as the
prompt; the KV-cached batched generator continues it with only the tokens a forecast can contain
(digits, ``.``, ``,``, ``;``) and stops each system after ``--horizon`` timesteps. By default it
generates under the LLMTIME grammar (:func:`qwenlite.data.llmtime.grammar`: exactly the run's
decimals, then ``,`` or ``;``), so every forecast parses by construction; the steps where the
unconstrained choice would have left the grammar are counted. Forecasts are decoded tolerantly
(unparseable or missing steps, possible only without the grammar, are counted, then filled so
they are penalised, not dropped) and scored against the truth in original and in scaled units, next to baselines
scored on the same systems and horizon: persistence, linear extrapolation and a Lotka–Volterra ODE
fitted to the context. Model selection uses ``--split val``; the test split is only reachable by
asking for it.

Outputs in ``--out``: ``metrics.json``, ``predictions.npz``, ``forecasts.png``,
``error_vs_horizon.png``; the generation FLOPS go into the FLOPS ledger.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwenlite.cli import (
    ArgumentParser,
    add_data_arg,
    add_device_args,
    add_weights_arg,
    existing_dir,
    positive_int,
)
from qwenlite.errors import QwenliteError


@dataclass
class Forecasts:
    """Decoded model forecasts for S systems.

    Attributes:
        values: (S, horizon, V) in original units, missing steps filled (see ``n_missing``).
        samples: (n_samples, S, horizon, V) every sample, filled the same way.
        n_missing: (S,) horizon steps that had to be filled (summed over samples).
        n_invalid: (S,) fields that could not be parsed (summed over samples).
        n_masked: (S,) horizon steps in which the grammar changed at least one token's choice
            (summed over samples; zeros without the grammar).
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
    n_masked: np.ndarray | None = None


def token_grammar(tok, settings, n_vars: int):
    """The LLMTIME grammar (:func:`qwenlite.data.llmtime.grammar`) over the tokenizer's ids."""
    from qwenlite.data.llmtime import grammar
    from qwenlite.evaluation.generation import TokenGrammar

    g = grammar(settings, n_vars)
    ids, _ = forecast_token_ids(tok, settings)
    return TokenGrammar(ids, torch.as_tensor(g.table), g.start)


def forecast_token_ids(tok, settings) -> tuple[list[int], int]:
    """Token ids a forecast may contain, and the id of the timestep separator."""
    from qwenlite.data.llmtime import allowed_characters

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
                 progress: bool = True, on_batch=None, constrained: bool = True) -> Forecasts:
    """Forecast ``horizon`` steps after each context with the language model.

    Args:
        contexts: (S, k, V) in original units.
        samples: forecasts per system (> 1 needs ``temperature > 0``).
        on_batch: called as ``on_batch(flops, tokens)`` with the totals so far after every
            batch (the evaluator records them in the ledger, so an interrupted evaluation is
            still charged for what it spent).
        constrained: generate under the LLMTIME grammar (every forecast parses); else only the
            tokens are restricted.
    """
    from tqdm import tqdm

    from qwenlite.data.llmtime import decode, encode
    from qwenlite.evaluation.generation import generate
    from qwenlite.evaluation.metrics import pad_forecast

    s_count, _, n_vars = contexts.shape
    allowed, sep_id = forecast_token_ids(tok, settings)
    budget = max_tokens_for(settings, horizon, n_vars)
    prompts = [tok.encode(encode(c, settings)) for c in contexts]
    out = np.zeros((samples, s_count, horizon, n_vars))
    n_missing = np.zeros(s_count, dtype=int)
    n_invalid = np.zeros(s_count, dtype=int)
    n_masked = np.zeros(s_count, dtype=int)
    constraint = token_grammar(tok, settings, n_vars) if constrained else None
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
                           stop_fn=stop, grammar=constraint)
            flops += gen.flops.total()
            tokens += len(chunk) * gen.prompt_len + sum(len(t) for t in gen.tokens)
            if on_batch is not None:
                on_batch(flops, tokens)
            for j, (i, new_ids) in enumerate(zip(chunk, gen.tokens)):
                if constraint is not None:  # the forecast step of each overridden token
                    seps = np.cumsum(np.asarray(new_ids) == sep_id) - (
                        np.asarray(new_ids) == sep_id)
                    n_masked[i] += len({int(seps[t]) for t in gen.overridden[j]
                                        if seps[t] < horizon})
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
                     tokens, n_masked)


def score(pred: np.ndarray, truth: np.ndarray, context: np.ndarray, alpha: float) -> dict:
    """Point metrics in original and scaled units, with bootstrap intervals over systems."""
    from qwenlite.evaluation.metrics import error_by_horizon, point_metrics, summarize

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
