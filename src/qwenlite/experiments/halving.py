"""The budget-aware protocol: successive halving over the lr × rank grid, with continuation.

A scale with ``rungs`` (cumulative step counts, e.g. ``(150, 600)``) runs:

1. ``calibration`` — the untrained model on validation in fp32 and in bf16 (``zeroshot-fp32``,
   ``zeroshot-bf16``): the paired comparison that decides the sweep's dtype where it is
   ``auto``; then ``zeroshot`` — the untrained model in that dtype, its validation score the
   calibration's and its test score measured once;
2. ``rung1`` — every grid cell trained to ``rungs[0]`` steps at the default context;
3. ``rung2`` … — the best ``1/keep`` of the rung before (by validation forecast MAE), each
   **continuing** its checkpoint to the next rung's steps (``@rung1:2`` is the 2nd best of rung 1);
4. ``branch`` — ``branch_steps`` more from the best of the last rung: unchanged (``branch-base``),
   at the other contexts (``context-<c>``), with the logit bias added (``control-both``); and the
   logit bias alone trained from scratch for as many steps (``control-bias``). The best of the
   LoRA branches is the final model's line;
5. ``final`` — that line continued segment by segment to each of ``checkpoints`` (the last is
   ``final_steps``), every segment scored on validation;
6. ``remedy`` (where the scale has ``adapter_scales``) — the best of the final line (the segment,
   or the branch it started from, with the lowest validation forecast MAE) with its adapter
   scaled, W + λ·BA and λ × the logit bias, scored on validation for each λ (``scale-<λ>``);
   trains nothing, and is ranked with the unscaled adapter (λ = 1);
7. ``test`` — ``final``: the best of the stage before (``remedy``, else ``final``), scored on the
   test split. Its number of steps (and λ) is chosen by forecast error.

Every experiment trains only the steps after its parent's (``start``), so the ledger charges
each step once and the plan's FLOPS sum exactly to the ledger's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwenlite.experiments.plan import Experiment, Scale

#: the dtypes the calibration compares, and the parent that names the one it chose
DTYPES = ("fp32", "bf16")
DTYPE_REF = "@dtype"
#: the stage that scales the best checkpoint's adapter (:attr:`Experiment.rescales`)
REMEDY = "remedy"


def n_promoted(n: int, keep: int) -> int:
    """How many of ``n`` candidates a rung promotes: the best ``1/keep`` (at least one)."""
    return max(1, math.ceil(n / keep))


def ref(stage: str, place: int = 1) -> str:
    """A parent chosen at run time: the ``place``-th best of ``stage``."""
    return f"@{stage}:{place}"


def parse_ref(parent: str) -> tuple[str, int] | None:
    """``(stage, place)`` of a run-time parent (:func:`ref`), None for a fixed one."""
    if not parent.startswith("@") or parent == DTYPE_REF:
        return None
    stage, place = parent[1:].rsplit(":", 1)
    return stage, int(place)


def experiments(scale: Scale) -> list[Experiment]:
    """The halving protocol's experiments in running order (see the module docstring)."""
    from qwenlite.experiments.plan import Experiment

    _, _, d_context = scale.default
    out = [Experiment(f"zeroshot-{dtype}", "calibration", context=d_context, dtype=dtype)
           for dtype in DTYPES]
    out.append(Experiment("zeroshot", "zeroshot", context=d_context, test=True, parent=DTYPE_REF))
    cells = [(lr, rank) for lr in scale.lrs for rank in scale.ranks]
    out += [Experiment(f"r1-lr{lr:g}-r{rank}", "rung1", scale.rungs[0], context=d_context,
                       lr=lr, rank=rank) for lr, rank in cells]
    n = len(cells)
    for k in range(1, len(scale.rungs)):
        n = n_promoted(n, scale.keep)
        out += [Experiment(f"r{k + 1}-{j}", f"rung{k + 1}", scale.rungs[k], context=d_context,
                           parent=ref(f"rung{k}", j), start=scale.rungs[k - 1])
                for j in range(1, n + 1)]
    best, at = ref(f"rung{len(scale.rungs)}"), scale.rungs[-1]
    end = at + scale.branch_steps
    out.append(Experiment("branch-base", "branch", end, context=d_context, parent=best,
                          start=at))
    out += [Experiment(f"context-{c}", "branch", end, context=c, parent=best, start=at)
            for c in scale.contexts if c != d_context]
    out.append(Experiment("control-both", "branch", end, context=d_context, logit_bias=True,
                          parent=best, start=at))
    out.append(Experiment("control-bias", "branch", scale.branch_steps, context=d_context,
                          lr=max(scale.lrs), rank=0, logit_bias=True))
    parent, start = ref("branch"), end
    for steps in scale.checkpoints:
        out.append(Experiment(f"final-{steps}", "final", steps, context=None, logit_bias=None,
                              parent=parent, start=start))
        parent, start = f"final-{steps}", steps
    out += [Experiment(f"scale-{lam:g}", REMEDY, 0, context=None, logit_bias=None,
                       parent=ref("final"), adapter_scale=lam) for lam in scale.adapter_scales]
    out.append(Experiment("final", "test", 0, context=None, logit_bias=None,
                          parent=ref(REMEDY if scale.adapter_scales else "final"), test=True))
    return out


def check(scale: Scale) -> None:
    """One-line errors for a halving scale whose rungs, branches or checkpoints do not line up."""
    from qwenlite.errors import QwenliteError

    steps = [*scale.rungs, scale.rungs[-1] + scale.branch_steps, *scale.checkpoints]
    if any(b <= a for a, b in zip(steps, steps[1:])) or steps[0] < 1:
        raise QwenliteError(f"the rungs, branch and checkpoints must grow: {steps}")
    if scale.branch_steps < 1 or not scale.checkpoints:
        raise QwenliteError("a halving scale needs branch_steps >= 1 and checkpoints")
    if scale.checkpoints[-1] != scale.final_steps:
        raise QwenliteError(f"the last checkpoint ({scale.checkpoints[-1]}) must be "
                            f"final_steps ({scale.final_steps})")
    if scale.keep < 2:
        raise QwenliteError(f"keep must be >= 2 (the best 1/keep are promoted), got {scale.keep}")
    lams = scale.adapter_scales
    if (any(lam < 0 or lam == 1 for lam in lams)
            or len({f"{lam:g}" for lam in lams}) != len(lams)):  # the names scale-<λ> differ
        raise QwenliteError(f"adapter_scales must be distinct, >= 0 and not 1 (the unscaled "
                            f"adapter is always a candidate), got {list(lams)}")
    if scale.eval_interval and any(s % scale.eval_interval for s in steps):
        raise QwenliteError(f"every rung, branch and checkpoint must be a multiple of "
                            f"eval_interval ({scale.eval_interval}), so a continued run "
                            "validates where an uninterrupted one would")


# ----- choices ------------------------------------------------------------------------------------
def _eligible(row: dict) -> bool:
    """A candidate the protocol may continue: it trains LoRA (the bias alone is a control)."""
    return bool(row["rank"])


def make_choices(plan, results: dict[str, dict], rows_of) -> dict:
    """Each ranked stage's candidates, best first by validation forecast MAE (validation loss
    breaks ties), once all of the stage are done; ``rows_of(result)`` gives a candidate's row.

    ``ranking[stage]`` is what ``@stage:k`` parents read. The final stage ranks its segments
    with the branch they continue (its checkpoint is the line's first), so the test stage scores
    the checkpoint with the lowest validation forecast error: the final model's steps are chosen
    by forecast error, not by loss. The remedy stage ranks its scaled adapters with the
    unscaled one (the final stage's best).
    """
    from qwenlite.experiments.runner import METRIC

    out: dict = {"metric": f"mean MAE over {plan.scale.val_systems} validation systems, "
                           f"{plan.scale.context_steps} -> {plan.scale.horizon} steps "
                           "(validation loss breaks ties)", "stages": {}, "ranking": {}}
    for stage, exps in plan.stages().items():
        if stage in ("calibration", "zeroshot", "test"):
            continue
        if any(e.name not in results for e in exps):
            break  # later stages wait for this one
        rows = [rows_of(results[e.name]) for e in exps]
        if stage == "final" and out["ranking"].get("branch"):
            rows.insert(0, rows_of(results[out["ranking"]["branch"][0]]))
        if stage == REMEDY and out["ranking"].get("final"):  # λ = 1: the adapter as trained
            rows.insert(0, rows_of(results[out["ranking"]["final"][0]]))
        ranked = sorted((r for r in rows if _eligible(r)),
                        key=lambda r: (r[METRIC], r.get("val_loss") or float("inf")))
        out["ranking"][stage] = [r["name"] for r in ranked]
        out["stages"][stage] = {"candidates": rows, "chosen": ranked[0]["name"]}
    return out


def parent_of(exp, choices: dict, dtype: str | None) -> str:
    """The concrete parent of ``exp`` ('' for none); a one-line error while it is not chosen."""
    from qwenlite.errors import QwenliteError

    if exp.parent == DTYPE_REF:
        if dtype is None:
            raise QwenliteError(f"{exp.name} needs the sweep's dtype, which the calibration "
                                "stage decides; finish it first (sweep status)")
        return f"zeroshot-{dtype}"
    chosen = parse_ref(exp.parent)
    if chosen is None:
        return exp.parent
    stage, place = chosen
    ranking = choices.get("ranking", {}).get(stage)
    if not ranking or place > len(ranking):
        raise QwenliteError(f"{exp.name} continues the #{place} of {stage}, not chosen yet; "
                            f"finish {stage} first (sweep status)")
    return ranking[place - 1]


# ----- the dtype ----------------------------------------------------------------------------------
DTYPE_FILE = "dtype.json"


def decide_dtype(out, plan, results: dict[str, dict], device_type: str = "cpu") -> dict | None:
    """The sweep's dtype, decided once and kept in ``dtype.json``: the scale's where it names
    one; for ``auto``, once both calibration runs are done, bf16 where the device has bf16 units
    and bf16's zero-shot validation forecasts are not measurably worse than fp32's (the paired
    interval of bf16 − fp32 MAE per system does not lie above 0), else fp32. None until then."""
    import json

    from qwenlite.evaluation.metrics import paired_difference, point_metrics
    from qwenlite.io import atomic_write_text, read_json_object

    path = out / DTYPE_FILE
    if path.is_file():
        return read_json_object(path, "sweep dtype")
    if plan.scale.dtype != "auto":
        decision = {"dtype": plan.scale.dtype, "rule": "set by the scale"}
        atomic_write_text(path, json.dumps(decision, indent=2) + "\n")
        return decision
    names = [f"zeroshot-{d}" for d in DTYPES]
    if any(n not in results for n in names):
        return None
    import numpy as np

    errors = []
    for name in names:
        with np.load(out / name / "eval-val" / "predictions.npz") as z:
            mae = point_metrics(z["pred_qwen"], z["truth"])["per_system"]["mae"]
        errors.append(np.array([np.nan if v is None else v for v in mae]))
    diff = paired_difference(errors[1], errors[0])  # bf16 - fp32
    from qwenlite.accel.emulation import has_bf16_units

    units = has_bf16_units(device_type)
    worse = diff["ci"][0] > 0
    dtype = "bf16" if units and not worse else "fp32"
    decision = {"dtype": dtype, "bf16_minus_fp32_mae": diff, "bf16_units": units,
                "device": device_type,
                "fp32_mae": results[names[0]]["val"]["mae"],
                "bf16_mae": results[names[1]]["val"]["mae"],
                "rule": "bf16 where the device has bf16 units and bf16's zero-shot validation "
                        "MAE is not measurably worse than fp32's (paired 95% interval of "
                        "bf16 - fp32 not above 0); else fp32"}
    atomic_write_text(path, json.dumps(decision, indent=2) + "\n")
    return decision


# ----- checkpoints no run will continue -----------------------------------------------------------
def prune_checkpoints(out, plan, choices: dict, results: dict[str, dict]) -> list[str]:
    """Delete the optimizer checkpoints (``train/state*.pt``) that no experiment still to run
    can continue: those of the rungs' runs a finished ranking did not promote, of the branches
    the final line did not take, and of the final line's segments that a later segment has
    passed. The newest finished segment of the last training stage keeps its checkpoint (the
    longest-trained model, which a grown plan may continue). Adapters, curves and scores stay;
    the checkpoints are what a continuation needs and what is large. Returns the experiments
    pruned."""
    from qwenlite.training.checkpoint import PREV_STATE, STATE

    needed: set[str] = set()
    stages = plan.stages()
    for e in plan.experiments:
        # the remedy and the test score their parent's adapter: they continue no checkpoint
        if e.name in results or not e.parent or e.parent == DTYPE_REF or not e.new_steps:
            continue
        chosen = parse_ref(e.parent)
        if chosen is None:
            needed.add(e.parent)
            continue
        stage, place = chosen
        ranking = choices.get("ranking", {}).get(stage)
        needed |= {ranking[place - 1]} if ranking else {x.name for x in stages[stage]}
    training = [stage for stage, exps in stages.items() if any(e.new_steps for e in exps)]
    if training:  # the last training stage's newest finished run
        done = [e.name for e in stages[training[-1]] if e.name in results]
        needed |= set(done[-1:])
    pruned = []
    for stage in training:
        for e in stages[stage]:
            train = out / e.name / "train"
            if e.name in results and e.name not in needed and (train / STATE).exists():
                for name in (STATE, PREV_STATE):
                    (train / name).unlink(missing_ok=True)
                pruned.append(e.name)
    return pruned
