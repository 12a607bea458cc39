"""Run a plan: train, evaluate, select, resume — every experiment a separate process.

Layout of a sweep directory (``report/results/`` for the reported one)::

    plan.json                 the plan as run (scale, costs, commit)
    ledger.json               the FLOPS ledger of exactly these experiments
    choices.json              each stage's choice and the validation numbers behind it
    <experiment>/result.json  settings, commit, wall times, FLOPS, validation (and test) scores
    <experiment>/train/       the training run directory (config, split, α, metrics, adapter)
    <experiment>/eval-val/    metrics.json, predictions.npz, figures (and eval-test/)

An experiment with a ``result.json`` is done and is skipped; any other is (re)started, and its
training resumes from its last checkpoint (:mod:`qwenlite.training.trainer`). Selection reads only the
validation scores; the test split is scored for ``zeroshot`` and ``final`` alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qwenlite.errors import QwenliteError
from qwenlite.experiments.plan import Experiment, Plan
from qwenlite.io import atomic_write_text, read_json_object
from qwenlite.model.loading import checkpoint_id

RESULT = "result.json"
CHOICES = "choices.json"
METRIC = "val_mae"


def code_version() -> str:
    """The git commit of the running qwenlite (``+dirty`` with uncommitted changes), or
    ``unknown`` outside a checkout."""
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "src"],
                               text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def read_result(directory: Path, name: str) -> dict | None:
    path = directory / name / RESULT
    return read_json_object(path, "experiment result") if path.is_file() else None


def _score(metrics_file: Path) -> dict:
    """The model's and the baselines' scores from an evaluation's ``metrics.json``."""
    raw = read_json_object(metrics_file, "evaluation metrics")
    out = {}
    for name, r in raw["results"].items():
        overall = r["original"]["metrics"]["overall"]
        out[name] = {"mae": overall["mae"], "mse": overall["mse"],
                     "median_system_mae": r["original"]["systems"]["mae"]["median"]}
    return out


# ----- selection ----------------------------------------------------------------------------------
def _pick(candidates: list[dict]) -> dict:
    """The candidate with the lowest validation MAE (validation loss breaks ties)."""
    return min(candidates, key=lambda c: (c[METRIC], c.get("val_loss") or float("inf")))


def _row(result: dict) -> dict:
    s = result["settings"]
    return {"name": result["name"], "lr": s["lr"], "rank": s["rank"], "context": s["context"],
            "logit_bias": s["logit_bias"], "adapter_scale": s.get("adapter_scale", 1.0),
            METRIC: result["val"]["mae"], "val_loss": result.get("val_loss")}


def make_choices(plan: Plan, results: dict[str, dict]) -> dict:
    """Each stage's choice from the recorded validation scores, as far as they go.

    * ``grid``: the default and grid cells → ``lr``, ``rank``;
    * ``context``: the context runs and the chosen grid cell (context 512) → ``context``;
    * ``control``: LoRA + bias against LoRA alone (the chosen cell) → ``logit_bias``;
    * ``final``: all of the above.

    A stage whose candidates are not all done yet is left out. A halving plan ranks its stages
    instead (:func:`qwenlite.experiments.halving.make_choices`).
    """
    if plan.scale.rungs:
        from qwenlite.experiments import halving

        return halving.make_choices(plan, results, _row)
    by_stage = plan.stages()
    choices: dict = {"metric": f"mean MAE over {plan.scale.val_systems} validation systems, "
                               f"{plan.scale.context_steps} -> {plan.scale.horizon} steps "
                               "(validation loss breaks ties)", "stages": {}}
    grid = by_stage.get("grid", [])
    if not grid or any(e.name not in results for e in grid):
        return choices
    rows = [_row(results[e.name]) for e in grid]
    best = _pick(rows)
    settings = {"lr": best["lr"], "rank": best["rank"]}
    choices["stages"]["grid"] = {"candidates": rows, "chosen": best["name"],
                                 "sets": dict(settings)}
    context = by_stage.get("context", [])
    if context and all(e.name in results for e in context):
        rows = [_row(results[e.name]) for e in context] + [best]
        pick = _pick(rows)
        choices["stages"]["context"] = {"candidates": rows, "chosen": pick["name"],
                                        "sets": {"context": pick["context"]}}
        settings["context"] = pick["context"]
    control = by_stage.get("control", [])
    if control and all(e.name in results for e in control):
        rows = [_row(results[e.name]) for e in control] + [best]
        both = next(r for r in rows if r["logit_bias"] and r["rank"])
        use_bias = both[METRIC] < best[METRIC]
        choices["stages"]["control"] = {
            "candidates": rows, "chosen": both["name"] if use_bias else best["name"],
            "sets": {"logit_bias": use_bias},
            "rule": "the bias joins the final model only if LoRA + bias beats LoRA alone"}
        settings["logit_bias"] = use_bias
    choices["settings"] = settings
    return choices


def resolve(exp: Experiment, choices: dict, results: dict[str, dict] | None = None,
            dtype: str | None = None) -> Experiment:
    """``exp`` with the choices filled in; a one-line error if a choice it needs is missing.

    An experiment that continues a parent gets the concrete parent (a run-time parent: the
    ranked candidate it names, see :mod:`qwenlite.experiments.halving`) and inherits the
    parent's settings it leaves open; one that rescales its parent's adapter (the remedy stage)
    takes the parent's steps, and one that scores its parent's model takes its adapter scale."""
    if exp.parent:
        from qwenlite.experiments import halving

        parent = halving.parent_of(exp, choices, dtype)
        if parent not in (results or {}):
            raise QwenliteError(f"{exp.name} continues {parent}, which is not done yet; "
                                "finish it first (sweep status)")
        inherited = (results or {})[parent]["settings"]
        exp = dataclasses.replace(exp, parent=parent)
        if exp.rescales:
            exp = dataclasses.replace(exp, steps=inherited["steps"], start=inherited["steps"])
        elif exp.reuses_parent:
            exp = dataclasses.replace(exp, adapter_scale=inherited.get("adapter_scale", 1.0))
        done = exp.resolved({k: inherited[k] for k in ("lr", "rank", "context", "logit_bias")})
    else:
        done = exp.resolved(choices.get("settings", {}))
    needed = ("lr", "rank", "context", "logit_bias") if exp.trains else ("context", "logit_bias")
    missing = [k for k in needed if getattr(done, k) is None]
    if missing:
        raise QwenliteError(f"{exp.name} needs the {missing[0]} chosen by an earlier stage; "
                            "finish those experiments first (sweep status)")
    return done


# ----- running one experiment ---------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    """What every experiment of a sweep shares."""

    out: Path
    plan: Plan
    weights: str
    data: str
    device: str = "auto"
    dtype: str | None = "fp32"  # None: a halving sweep's calibration has not decided it yet
    progress: bool = True
    track: str | None = None

    @property
    def ledger(self) -> Path:
        return self.out / "ledger.json"


def _python(module: str, args: list[str], env: dict | None, log: Path | None) -> None:
    cmd = [sys.executable, "-m", f"qwenlite.{module}", *args]
    with open(log, "a") if log else contextlib.nullcontext() as sink:  # None: the terminal
        proc = subprocess.run(cmd, env=env, stdout=sink, stderr=sink)
    if proc.returncode:
        where = f"; see {log}" if log else ""
        raise QwenliteError(f"{' '.join(cmd[2:4])} failed with status {proc.returncode}{where}")


def _eval_done(ledger: Path, out_dir: Path) -> bool:
    """Whether the evaluation into ``out_dir`` finished: its metrics written and its ledger
    entry closed."""
    from qwenlite.training.ledger import Ledger

    if not (out_dir / "metrics.json").is_file():
        return False
    book = Ledger(ledger)
    entry = book.load()["entries"].get(book.key(str(out_dir.resolve())))
    return bool(entry) and entry.get("status") == "done"


def _train_args(ctx: Context, exp: Experiment, d: Path) -> list[str]:
    s = ctx.plan.scale
    return ["--out", str(d / "train"), "--lr", f"{exp.lr:g}", "--rank", str(exp.rank),
            "--context", str(exp.context), "--batch", str(exp.batch),
            "--max-steps", str(exp.steps), "--eval-interval", str(s.eval_interval),
            "--eval-windows", str(s.eval_windows),
            "--save-interval", str(max(1, min(10, exp.new_steps // 3))),
            "--experiment", f"{exp.name} (train)", *(["--logit-bias"] if exp.logit_bias else [])]


def _continue(ctx: Context, exp: Experiment, d: Path) -> None:
    """Start ``exp``'s run from its parent's checkpoint, with the settings it changes."""
    from qwenlite.training.checkpoint import BRANCHABLE, continue_run

    parent = read_result(ctx.out, exp.parent)["settings"]
    changes = {k: getattr(exp, k) for k in BRANCHABLE if getattr(exp, k) != parent[k]}
    continue_run(ctx.out / exp.parent / "train", d / "train", changes)


def _adapter_of(ctx: Context, exp: Experiment, parent: dict | None) -> Path:
    """The run directory whose adapter ``exp`` scores: its own, or for one that trains nothing
    (reusing or rescaling its parent's) the one its parent scored."""
    if not (exp.reuses_parent or exp.rescales):
        return ctx.out / exp.name / "train"
    return ctx.out / (parent.get("adapter") or f"{exp.parent}/train")


def run_experiment(ctx: Context, exp: Experiment, env: dict | None = None,
                   log: Path | None = None) -> dict:
    """Train (continuing its parent, resuming) and evaluate one resolved experiment; write and
    return its result. One that reuses its parent (:attr:`Experiment.reuses_parent`) trains
    nothing: it takes the parent's validation score and adapter and is scored on test. One that
    rescales its parent's adapter (:attr:`Experiment.rescales`) trains nothing either: it scores
    that adapter, scaled, on validation."""
    s, d = ctx.plan.scale, ctx.out / exp.name
    dtype = exp.dtype or ctx.dtype
    if dtype is None:
        raise QwenliteError(f"{exp.name}: the sweep's dtype is not decided yet (calibration)")
    common = ["--weights", ctx.weights, "--data", ctx.data, "--ledger", str(ctx.ledger),
              "--device", ctx.device, "--dtype", dtype]
    quiet = [] if ctx.progress and log is None else ["--no-progress"]
    d.mkdir(parents=True, exist_ok=True)
    seconds, val_loss = {}, None
    parent = read_result(ctx.out, exp.parent) if exp.parent else None
    adapter = _adapter_of(ctx, exp, parent)
    if exp.reuses_parent:
        val_loss = parent.get("val_loss")
    elif exp.trains and not exp.rescales:
        if exp.parent:
            _continue(ctx, exp, d)
        t0 = time.time()
        _python("train", [*common, *_train_args(ctx, exp, d), *quiet], env, log)
        seconds["train"] = round(time.time() - t0, 1)
        lines = (d / "train" / "metrics.jsonl").read_text().splitlines()
        vals = [json.loads(x)["val_loss"] for x in lines if '"val_loss"' in x]
        val_loss = vals[-1] if vals else None
    scores = {}
    splits = ("test",) if exp.reuses_parent else ("val", "test") if exp.test else ("val",)
    for split in splits:
        out = d / f"eval-{split}"
        n = s.val_systems if split == "val" else s.test_systems
        if not _eval_done(ctx.ledger, out):
            t0 = time.time()
            _python("evaluate", [*common, "--split", split, "--systems", str(n),
                                 "--context-steps", str(s.context_steps),
                                 "--horizon", str(s.horizon), "--samples", str(s.samples),
                                 "--temperature", f"{s.temperature:g}",
                                 "--batch", str(s.eval_batch), "--out", str(out),
                                 "--experiment", f"{exp.name} ({split} {n} systems)",
                                 "--grammar" if s.grammar else "--no-grammar",
                                 *(["--adapter", str(adapter)] if exp.trains else []),
                                 *(["--adapter-scale", repr(exp.adapter_scale)]
                                   if exp.trains and exp.adapter_scale != 1 else []),
                                 *quiet], env, log)
            seconds[f"eval_{split}"] = round(time.time() - t0, 1)
        scores[split] = _score(out / "metrics.json")
    if exp.reuses_parent:
        scores["val"] = {"qwen": parent["val"], **parent["baselines_val"]}
    result = {"name": exp.name, "stage": exp.stage, "settings": dataclasses.asdict(exp),
              "scale": s.name, "shrunk": s.shrunk, "commit": code_version(), "dtype": dtype,
              "weights": checkpoint_id(ctx.weights), "val_loss": val_loss, "seconds": seconds,
              **({"adapter": adapter.relative_to(ctx.out).as_posix()} if exp.trains else {}),
              "val": scores["val"]["qwen"], "baselines_val": {
                  k: v for k, v in scores["val"].items() if k != "qwen"}}
    if "test" in scores:
        result["test"] = scores["test"]["qwen"]
        result["baselines_test"] = {k: v for k, v in scores["test"].items() if k != "qwen"}
    atomic_write_text(d / RESULT, json.dumps(result, indent=2) + "\n")
    if ctx.track:
        from qwenlite.experiments.tracking import track

        track(ctx.track, exp.name, result, d / "train" / "metrics.jsonl")
    return result


# ----- the sweep ----------------------------------------------------------------------------------
def load_results(out: Path, plan: Plan) -> dict[str, dict]:
    """The results of the plan's finished experiments in the sweep directory ``out``."""
    return {e.name: r for e in plan.experiments if (r := read_result(out, e.name)) is not None}


def write_choices(ctx: Context, results: dict[str, dict]) -> dict:
    """Write ``choices.json``; in a halving sweep, drop the checkpoints no run still to come
    continues: runs not promoted, branches not taken, segments passed
    (:func:`qwenlite.experiments.halving.prune_checkpoints`)."""
    choices = make_choices(ctx.plan, results)
    atomic_write_text(ctx.out / CHOICES, json.dumps(choices, indent=2) + "\n")
    if ctx.plan.scale.rungs:
        from qwenlite.experiments.halving import prune_checkpoints

        prune_checkpoints(ctx.out, ctx.plan, choices, results)
    return choices


def _decide_dtype(ctx: Context, results: dict[str, dict]) -> None:
    if ctx.plan.scale.rungs:
        from qwenlite.experiments import halving
        from qwenlite.cli import resolve_device

        decision = halving.decide_dtype(ctx.out, ctx.plan, results,
                                        resolve_device(ctx.device).type)
        ctx.dtype = decision["dtype"] if decision else None


def run_sweep(ctx: Context, *, jobs: int = 1, only: list[str] | None = None) -> dict[str, dict]:
    """Run every experiment not done yet, stage by stage (``jobs`` at once within a stage,
    each on its own device slot: ``CUDA_VISIBLE_DEVICES``), choosing as each stage completes.
    A stage whose experiments continue each other (the final line) runs one at a time."""
    results = load_results(ctx.out, ctx.plan)
    _decide_dtype(ctx, results)
    for group in ctx.plan.stages().values():
        todo = [e for e in group if e.name not in results and (not only or e.name in only)]
        if not todo:
            continue
        names = {e.name for e in group}
        chained = any(e.parent in names for e in group)
        if jobs == 1 or chained:
            for e in todo:
                choices = write_choices(ctx, results)
                results[e.name] = run_experiment(ctx, resolve(e, choices, results, ctx.dtype))
                _decide_dtype(ctx, results)
        else:
            choices = write_choices(ctx, results)
            todo = [resolve(e, choices, results, ctx.dtype) for e in todo]

            def work(item):
                i, e = item
                env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(i % jobs))
                return run_experiment(ctx, e, env, ctx.out / e.name / "log.txt")

            with ThreadPoolExecutor(max_workers=jobs) as pool:
                for e, r in zip(todo, pool.map(work, enumerate(todo))):
                    results[e.name] = r
            _decide_dtype(ctx, results)
        write_choices(ctx, results)
    return results
