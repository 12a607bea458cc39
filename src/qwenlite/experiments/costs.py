"""What each experiment of a plan costs, by the FLOPS module's own count: training steps and
validations at the experiment's worst case, and the forecasts that evaluate it (an upper bound:
every sequence decodes to the token budget)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwenlite.experiments.plan import Experiment, Scale

FORECAST_TOKENS = 13  # digits, ".", ",", ";": the LM-head rows a forecast step computes


@dataclass
class Costs:
    """FLOPS and estimated hours of one experiment (at its worst case if not yet resolved)."""

    train_flops: int
    eval_flops: int
    hours: float


def prompt_lengths(trajectories, split, settings, n: int, context_steps: int) -> list[int]:
    """Token counts of the first ``n`` forecast prompts of ``split`` (LLMTIME is one token per
    character: digits, ``.``, ``,``, ``;``)."""
    from qwenlite.data.llmtime import encode

    return [len(encode(trajectories[i, :context_steps], settings)) for i in split[:n]]


def generation_upper_bound(model, prompt_len: int, new_tokens: int, batch: int,
                           head_rows: int = FORECAST_TOKENS) -> int:
    """:func:`qwenlite.evaluation.generation.run_flops` of a padded batch decoding all ``new_tokens``
    (no sequence stopping early), in closed form: a decode step's FLOPS are affine in the number
    of cached tokens, so the steps sum to an arithmetic series (tests check it is exact)."""
    from qwenlite.model.counting import matmul_flops

    head = matmul_flops(1, model.config.hidden_size, head_rows)
    if model.lm_head.bias is not None:
        head += head_rows
    steps = new_tokens - 1
    prefill = model.flops(prompt_len, 0, logits=0).total() + head
    first = model.flops(1, prompt_len, logits=0, masked=True).total()
    growth = model.flops(1, prompt_len + 1, logits=0, masked=True).total() - first
    decode = steps * (first + head) + growth * steps * (steps - 1) // 2
    return batch * (prefill + decode)


def eval_flops(model, lengths: list[int], scale: Scale) -> int:
    """Generation FLOPS of forecasting these prompts ``horizon`` steps ahead, batch by batch
    (padded to each batch's longest prompt; decoding to the token budget, an upper bound)."""
    from qwenlite.data.llmtime import LLMTimeSettings
    from qwenlite.evaluation.forecasting import max_tokens_for

    new_tokens = max_tokens_for(LLMTimeSettings(), scale.horizon, 2)
    total = 0
    for s in range(0, len(lengths), scale.eval_batch):
        chunk = lengths[s:s + scale.eval_batch]
        total += generation_upper_bound(model, max(chunk), new_tokens, len(chunk))
    return total * scale.samples


def cost(exp: Experiment, scale: Scale, config, val_lengths, test_lengths,
         _evals: dict | None = None) -> Costs:
    """What ``exp`` costs by the FLOPS module's own count, at its worst case. ``_evals`` caches
    the evaluation FLOPS, which depend only on whether the LM head has a bias."""
    from qwenlite.flops import counting_model, forward_flops, train_step_flops
    from qwenlite.training.trainer import n_validations

    e = exp.worst_case(scale)
    train = 0
    if e.trains and e.new_steps:
        model = counting_model(config, e.rank or None, logit_bias=bool(e.logit_bias))
        step = train_step_flops(model, e.context, e.batch).rule
        val = forward_flops(model, e.context, loss=True).total() * scale.eval_windows
        # a continued run's validations are those after its parent's last one
        evals = n_validations(e.steps, e.steps, scale.eval_interval) - (
            n_validations(e.start, e.start, scale.eval_interval) if e.start else 0)
        train = e.new_steps * step + evals * val
    _evals = {} if _evals is None else _evals
    bias = bool(e.logit_bias)
    if bias not in _evals:
        evaluator = counting_model(config, None, logit_bias=bias)  # LoRA is merged to evaluate
        _evals[bias] = (eval_flops(evaluator, val_lengths, scale),
                        eval_flops(evaluator, test_lengths, scale))
    # an experiment that scores its parent's model takes the parent's validation score
    ev = (0 if e.reuses_parent else _evals[bias][0]) + (_evals[bias][1] if e.test else 0)
    hours = (train / scale.train_rate + ev / scale.eval_rate) / 3600
    return Costs(int(train), int(ev), hours)
