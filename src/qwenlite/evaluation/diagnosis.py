"""``python -m qwenlite.diagnose``: why does a model forecast as it does? Measurements, not guesses.

For the same validation systems, with and without an adapter (``--adapter RUN_DIR``), it measures:

* **teacher-forced NLL of the forecast tokens** (the ``--horizon`` steps after a
  ``--context-steps`` prompt), split by what each token is: the tens or units digit, the first or
  second decimal, the ``.``, or a separator. Next to it, the share of tokens whose argmax is the
  true token (what greedy decoding would pick given a correct past);
* **free-running forecasts**: greedy, and the median of ``--samples`` sampled forecasts (as
  LLMTIME does), each scored by MAE against the truth, by horizon step, and by how close it stays to
  the persistence and linear baselines (a forecast that has collapsed onto "repeat the last value" or
  "keep the last step" is closer to those than to the truth), plus how many forecasts end in a
  *collapse*: the last five steps constant, or changing by a constant step.

Everything goes to ``--out`` as ``diagnosis.json`` (and the FLOPS into the ledger), so the answer
to "fine-tuning made forecasts worse: why?" is a committed measurement.
"""

from __future__ import annotations

import numpy as np
import torch

from qwenlite.errors import QwenliteError

#: Token classes of a forecast, in the order the report shows them.
CLASSES = ("tens", "units", "dec1", "dec2", "point", "var_sep", "time_sep")


def char_classes(text: str, settings) -> list[str]:
    """The class of every character of LLMTIME ``text`` (see :data:`CLASSES`).

    Digits are named by their place relative to the decimal point: ``units`` just before it,
    ``tens`` (and anything higher) before that, ``dec1``/``dec2``/... after it.
    """
    out: list[str] = []
    for group in text.split(settings.time_sep):
        for j, number in enumerate(group.split(settings.var_sep)):
            if j:
                out.append("var_sep")
            whole, _, frac = number.partition(".")
            for i in range(len(whole)):
                out.append("units" if i == len(whole) - 1 else "tens")
            if _:
                out.append("point")
                out.extend(f"dec{i + 1}" for i in range(len(frac)))
        out.append("time_sep")
    return out[:len(text)]  # the split leaves one separator too many after the last group


@torch.no_grad()
def teacher_forced(model, tok, settings, contexts: np.ndarray, targets: np.ndarray) -> dict:
    """Per-class mean NLL (nats/token) and argmax accuracy of the target tokens after each
    context, one system at a time (no (batch, seq, vocab) logits are ever held).

    Returns ``{"nll": {class: mean}, "argmax_acc": {class: share}, "tokens": {class: n},
    "flops": forward FLOPS spent}``.
    """
    from qwenlite.data.llmtime import encode

    nll = {c: [] for c in CLASSES}
    acc = {c: [] for c in CLASSES}
    flops = 0
    head = model.lm_head.weight
    for context, target in zip(contexts, targets):
        prompt, future = encode(context, settings), encode(target, settings)
        p_ids, f_ids = tok.encode(prompt), tok.encode(future)
        if len(f_ids) != len(future):  # LLMTIME text must be one token per character
            raise QwenliteError("the tokenizer does not split this forecast one token per "
                                "character; per-digit NLL is undefined")
        ids = torch.tensor([p_ids + f_ids], device=model.device)
        h = model(ids, return_hidden=True)[0, len(p_ids) - 1:-1]
        logits = (h @ head.T).float()
        logp = torch.log_softmax(logits, -1)
        truth = torch.tensor(f_ids, device=model.device)
        token_nll = -logp.gather(-1, truth[:, None])[:, 0]
        hit = logits.argmax(-1) == truth
        for cls, v, a in zip(char_classes(future, settings), token_nll.tolist(), hit.tolist()):
            nll[cls].append(v)
            acc[cls].append(float(a))
        flops += model.flops(ids.shape[1], logits=len(f_ids)).total()
    every = [v for c in CLASSES for v in nll[c]]
    every_acc = [v for c in CLASSES for v in acc[c]]
    return {"nll": {**{c: float(np.mean(v)) for c, v in nll.items() if v},
                    "all": float(np.mean(every))},
            "argmax_acc": {**{c: float(np.mean(v)) for c, v in acc.items() if v},
                           "all": float(np.mean(every_acc))},
            "tokens": {c: len(v) for c, v in nll.items()}, "flops": int(flops)}


def collapsed(forecast: np.ndarray, tail: int = 5, tol: float = 1e-9) -> bool:
    """Whether the last ``tail`` steps of a (h, V) forecast (scaled units, rounded) are constant
    or change by one constant step: the two fixed points a degenerate forecast falls into."""
    last = forecast[-tail:]
    second = np.diff(last, n=2, axis=0)
    return bool(np.all(np.abs(second) < tol))


def free_running(pred: np.ndarray, truth: np.ndarray, contexts: np.ndarray, time_axis,
                 settings) -> dict:
    """Scores of (S, h, V) forecasts: MAE, MAE by horizon step, distance to the persistence and
    linear baselines, and the number of collapsed forecasts (in scaled units)."""
    from qwenlite.evaluation.baselines import linear, persistence

    k, h = contexts.shape[1], truth.shape[1]
    t = np.asarray(time_axis)[: k + h]
    pers = np.stack([persistence(c, h, t) for c in contexts])
    lin = np.stack([linear(c, h, t) for c in contexts])
    scaled = np.round(pred / settings.alpha, settings.decimals)
    per_system = np.abs(pred - truth).mean(axis=(1, 2))
    return {
        "mae": float(per_system.mean()), "median_system_mae": float(np.median(per_system)),
        "mae_by_horizon": np.abs(pred - truth).mean(axis=(0, 2)).tolist(),
        "distance_to_truth": float(np.abs(pred - truth).mean()),
        "distance_to_persistence": float(np.abs(pred - pers).mean()),
        "distance_to_linear": float(np.abs(pred - lin).mean()),
        "collapsed": int(sum(collapsed(s) for s in scaled)),
        "collapsed_truth": int(sum(collapsed(np.round(s / settings.alpha, settings.decimals))
                                   for s in truth)),
    }


def diagnose(model, tok, settings, contexts, truth, time_axis, *, samples: int,
             temperature: float, batch: int, seed: int, progress: bool) -> dict:
    """All measurements for one model (see the module docstring)."""
    from qwenlite.evaluation.forecasting import llm_forecast

    out = {"teacher_forced": teacher_forced(model, tok, settings, contexts, truth)}
    flops = out["teacher_forced"]["flops"]
    greedy = llm_forecast(model, tok, settings, contexts, truth.shape[1], batch=batch,
                          progress=progress)
    out["greedy"] = free_running(greedy.values, truth, contexts, time_axis, settings)
    out["greedy"]["texts"] = greedy.texts
    flops += greedy.flops
    if samples > 1:
        sampled = llm_forecast(model, tok, settings, contexts, truth.shape[1], batch=batch,
                               samples=samples, temperature=temperature, top_p=0.9, seed=seed,
                               progress=progress)
        out["sample_median"] = free_running(sampled.values, truth, contexts, time_axis, settings)
        flops += sampled.flops
    out["flops"] = int(flops)
    return out
