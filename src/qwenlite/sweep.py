"""``python -m qwenlite.sweep plan|run|status``: the coursework's experiments from one command.

* ``plan`` prints the protocol (zero-shot; the default run; lr × rank grid; context lengths at the
  best grid point; the logit-bias control; the final run) with each experiment's training and
  evaluation FLOPS by the FLOPS module's own count, its share of the budget and its estimated
  hours, and refuses a plan over budget. ``--json`` prints it as JSON; ``--emit slurm`` writes a
  job-array script with the stages' dependencies.
* ``run`` runs what is not done yet (``--jobs N`` at once within a stage), makes each stage's
  choice on validation scores, and resumes after any interruption.
* ``status`` shows what is done, the scores, the choices and the ledger.

``--scale full`` is the GPU protocol; ``--scale cpu`` (or a plan file) is the same protocol
shrunk for a 2-core CPU, and every output says so. See :mod:`qwenlite.experiments`.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwenlite.cli import (
    ArgumentParser,
    add_data_arg,
    add_device_args,
    add_weights_arg,
    creatable_dir,
    device_name,
    main_guard,
    nonnegative_int,
    one_line_text,
    pick_dtype,
    positive_float,
    positive_int,
    resolve_device,
    resolve_weights,
)
from qwenlite.errors import QwenliteError

DEFAULT_OUT = Path("report") / "results"
#: where each named scale's sweep lives by default (the pilot's in report/results itself)
SCALE_OUT = {"halving": DEFAULT_OUT / "halving"}
DEFAULT_SCALE = "halving"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m qwenlite.sweep",
                            description="Plan, run and follow the coursework's experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("plan", "print the plan and its FLOPS"),
                       ("run", "run the experiments not done yet"),
                       ("status", "what is done, the scores and the choices"),
                       ("calibrate", "time training steps in each dtype on this machine")):
        p = sub.add_parser(name, help=text, description=text)
        p.error = parser.error  # one-line errors from the subcommands too
        p.add_argument("--scale", default=DEFAULT_SCALE, type=one_line_text,
                       help="halving (successive halving for this machine), full (GPU), cpu "
                            f"(the 60-step pilot), or a JSON plan file (default {DEFAULT_SCALE})")
        p.add_argument("--out", type=creatable_dir, default=None,
                       help=f"sweep directory (default {SCALE_OUT['halving']} for halving, "
                            f"{DEFAULT_OUT} otherwise)")
        add_weights_arg(p)
        add_data_arg(p)
        p.add_argument("--budget", type=positive_float, default=1e17)
        p.add_argument("--train-rate", type=positive_float, default=None,
                       help="training FLOPS/s of this device (default: the scale's)")
        p.add_argument("--eval-rate", type=positive_float, default=None,
                       help="evaluation FLOPS/s of this device (default: the scale's)")
        if name == "plan":
            p.add_argument("--json", action="store_true", help="print the plan as JSON")
            p.add_argument("--emit", choices=("slurm",), default=None,
                           help="write a job-array script into --out")
            p.add_argument("--partition", type=one_line_text, default=None,
                           help="Slurm partition for --emit slurm")
        if name == "calibrate":
            p.add_argument("--device", default="auto", type=device_name,
                           help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
            p.add_argument("--steps", type=positive_int, default=3,
                           help="timed steps per dtype (one more runs first, untimed)")
        if name == "run":
            add_device_args(p, dtype_default=None, dtype_help=(
                "precision of every experiment (default: a halving plan's own, decided by its "
                "calibration; fp32 for the pilot's scales); auto: bf16 where the device has "
                "bf16 units"))
            p.add_argument("--jobs", type=positive_int, default=1,
                           help="experiments at once within a stage (one per GPU)")
            p.add_argument("--only", type=one_line_text, action="append", default=None,
                           help="run only this experiment (repeatable)")
            p.add_argument("--stage", type=one_line_text, default=None,
                           help="run one stage (with --index: one experiment of it, as Slurm "
                                "arrays do)")
            p.add_argument("--index", type=nonnegative_int, default=None)
            p.add_argument("--track", choices=("wandb", "tensorboard"), default=None,
                           help="also send metrics to this tracker (if installed)")
            p.add_argument("--no-progress", action="store_true")
    return parser


def portable_path(path) -> str:
    """``path`` relative to the checkout (the working directory) where it lies in it or beside
    it, as ``../shared/data/...`` does, so that a plan names its data on every machine."""
    import os

    rel = os.path.relpath(Path(path).resolve(), Path.cwd().resolve())
    return str(path) if rel.startswith(os.path.join(os.pardir, os.pardir)) else rel


def _out(args) -> Path:
    return Path(args.out) if args.out else SCALE_OUT.get(args.scale, DEFAULT_OUT)


def _dtype(scale, out: Path) -> tuple[str, str, str]:
    """The sweep's dtype, a note on where it comes from (a halving sweep's decision), and the
    dtype whose rates estimate its hours (the likely one while the decision is pending)."""
    from qwenlite.accel.emulation import has_bf16_units
    from qwenlite.experiments.halving import DTYPE_FILE
    from qwenlite.io import read_json_object

    if (out / DTYPE_FILE).is_file():
        d = read_json_object(out / DTYPE_FILE, "sweep dtype")
        diff = d.get("bf16_minus_fp32_mae")
        note = d["rule"] if not diff else (
            f"decided by the calibration: zero-shot bf16 - fp32 validation MAE "
            f"{diff['mean']:+.4f} [{diff['ci'][0]:+.4f}, {diff['ci'][1]:+.4f}] on {diff['n']} "
            f"systems, bf16 units: {'yes' if d['bf16_units'] else 'no'}")
        return d["dtype"], note, d["dtype"]
    if scale.dtype != "auto":
        return scale.dtype, "set by the scale", scale.dtype
    likely = "bf16" if has_bf16_units("cpu") else "fp32"
    return "auto", (f"pending the calibration stage's paired zero-shot comparison; hours "
                    f"estimated in {likely}, the hardware's choice here"), likely


def _spent(scale, out: Path) -> int:
    from qwenlite.training.ledger import Ledger

    total = 0
    for rel in scale.shares_budget_with:  # absent (a sweep elsewhere, no pilot): none spent
        if (out / rel).is_file():
            total += sum(int(e["flops"]) for e in Ledger(out / rel).load()["entries"].values())
    return total


def _plan(args, weights_needed: bool):
    from qwenlite.data import load_dataset, resolve_data
    from qwenlite.experiments import calibration
    from qwenlite.experiments.plan import build_plan, load_scale
    from qwenlite.model.config import QwenConfig

    scale = load_scale(args.scale)
    out = _out(args)
    dtype, note, rates_dtype = _dtype(scale, out) if scale.rungs else ("fp32", "", "")
    if scale.rungs:
        scale = calibration.apply(scale, out, rates_dtype)
    overrides = {k: v for k, v in (("train_rate", args.train_rate),
                                   ("eval_rate", args.eval_rate)) if v is not None}
    if overrides:
        import dataclasses

        scale = dataclasses.replace(scale, **overrides, rate_source="given on the command line")
    if args.weights or weights_needed:
        weights = resolve_weights(args.weights)
        config = QwenConfig.from_json(weights / "config.json")
    else:
        weights, config = None, QwenConfig.from_name("qwen2.5-0.5b")
    data = resolve_data(args.data)
    dataset = load_dataset(data)
    plan = build_plan(scale, config, dataset.trajectories.astype("float64"), args.budget,
                      portable_path(data))
    plan.spent, plan.dtype, plan.dtype_note = _spent(scale, out), dtype, note
    plan.check()
    return plan, weights, data


def _entries_of(out: Path, name: str, entries: dict, ledger) -> list[dict]:
    """The ledger's entries for experiment ``name`` (its run directory and everything under)."""
    prefix = ledger.key(str((out / name).resolve()))
    return [v for k, v in entries.items() if k == prefix or k.startswith(prefix + "/")]


def _spent_by(out: Path, plan, entries: dict, ledger) -> dict[str, int]:
    """FLOPS the ledger holds for each experiment of ``plan`` so far."""
    return {e.name: sum(int(v["flops"]) for v in _entries_of(out, e.name, entries, ledger))
            for e in plan.experiments}


def start_line(plan, done: set[str], spent: dict[str, int], only: list[str] | None) -> str:
    """What a ``sweep run`` is about to do, in one line: the experiments left (of those it was
    asked to run), their FLOPS still to spend, the share of the budget, and the estimated hours
    at the plan's rates (those left less the share their runs have already spent)."""
    names = [e.name for e in plan.experiments if (only is None or e.name in only)
             and e.name not in done]
    flops = hours = 0.0
    for name in names:
        c = plan.costs[name]
        total = c.train_flops + c.eval_flops
        left = max(total - spent.get(name, 0), 0)
        flops += left
        hours += c.hours * (left / total if total else 1.0)
    return (f"running {len(names)} of {len(plan.experiments)} experiments: {flops:.3e} FLOPS "
            f"to spend, {100 * flops / plan.budget:.2f}% of the {plan.budget:.0e} budget; "
            f"estimated {hours:.1f} h in {plan.dtype} (an estimate: {plan.scale.rate_source})")


def _status(args) -> int:
    from qwenlite.experiments.runner import load_results, make_choices
    from qwenlite.training.ledger import Ledger

    plan, _, _ = _plan(args, weights_needed=False)
    out = _out(args)
    results = load_results(out, plan)
    ledger = Ledger(out / "ledger.json")
    entries = ledger.load()["entries"]  # empty, and nothing created, if there is none yet
    print(f"sweep {out}: {plan.scale.name} plan"
          + (" (SHRUNK for a CPU)" if plan.scale.shrunk else ""))
    for e in plan.experiments:
        r = results.get(e.name)
        mine = _entries_of(out, e.name, entries, ledger)
        flops = sum(int(v["flops"]) for v in mine)
        state = "done" if r else ("started" if mine else "pending")
        score = (f"val MAE {r['val']['mae']:.4f}" + (f"  val loss {r['val_loss']:.4f}"
                                                     if r.get("val_loss") else "")
                 + (f"  test MAE {r['test']['mae']:.4f}" if "test" in r else "")) if r else ""
        minutes = sum(r["seconds"].values()) / 60 if r else 0
        print(f"  {e.name:<18} {e.stage:<9} {state:<8} {flops:.3e} FLOPS"
              + (f"  {minutes:6.1f} min  {score}" if r else ""))
    choices = make_choices(plan, results)
    for stage, c in choices["stages"].items():
        print(f"  choice {stage}: {c['chosen']}" + (f" -> {c['sets']}" if "sets" in c else ""))
    for stage, names in choices.get("ranking", {}).items():
        print(f"  ranking {stage}: {', '.join(names)}")
    used = sum(int(v["flops"]) for v in entries.values())
    print(f"  ledger total {used:.3e} FLOPS ({100 * used / plan.budget:.3f}% of "
          f"{plan.budget:.0e})" + (f"; with {plan.spent:.3e} spent before, "
                                   f"{100 * (used + plan.spent) / plan.budget:.3f}%"
                                   if plan.spent else ""))
    if plan.scale.rungs:
        from qwenlite.experiments.calibration import hours_left

        partial = {}
        for e in plan.experiments:
            key = ledger.key(str((out / e.name / "train").resolve()))
            if key in entries:
                partial[e.name] = int(entries[key]["flops"])
        print(f"  remaining: {len(plan.experiments) - len(results)} of "
              f"{len(plan.experiments)} experiments, about "
              f"{hours_left(plan, set(results), partial):.1f} h (an estimate: "
              f"{plan.scale.rate_source}); dtype {plan.dtype}")
    return 0


def _calibrate(args) -> int:
    from qwenlite.data import resolve_data
    from qwenlite.experiments.calibration import calibrate

    out = _out(args)
    weights = resolve_weights(args.weights)
    entry = calibrate(out, str(weights), str(resolve_data(args.data)), steps=args.steps,
                      device=args.device)
    for dtype, t in entry["train"].items():
        print(f"{dtype}: {t['rank']}-rank LoRA step at {t['batch']}x{t['context']}: "
              f"{', '.join(f'{x:.2f}' for x in t['step_seconds'])} s -> "
              f"{t['train_rate']:.3e} FLOPS/s by the 3x rule")
    print(f"on {entry['machine']['cpu']} ({', '.join(entry['machine']['flags'])}); "
          f"kept in {out / 'calibration.json'}")
    return 0


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "status":
        return _status(args)
    if args.command == "calibrate":
        return _calibrate(args)
    if args.command == "plan":
        plan, _, _ = _plan(args, weights_needed=False)
        if args.emit == "slurm":
            from qwenlite.experiments.slurm import slurm_script
            from qwenlite.io import atomic_write_text

            out = _out(args)
            run_args = ["--scale", args.scale, "--out", str(out)]
            for flag in ("weights", "data"):
                if getattr(args, flag):
                    run_args += [f"--{flag}", str(getattr(args, flag))]
            out.mkdir(parents=True, exist_ok=True)
            path = out / "submit_slurm.sh"
            atomic_write_text(path, slurm_script(plan, run_args, args.partition))
            print(f"wrote {path}: bash it on a login node to queue every stage")
        print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
        return 0
    return _run(args)


def _run(args) -> int:
    from qwenlite.experiments.plan import check_same_plan, save_plan
    from qwenlite.experiments.runner import Context, code_version, run_sweep
    from qwenlite.training.ledger import Ledger

    plan, weights, data = _plan(args, weights_needed=True)
    only = args.only
    if args.stage is not None or args.index is not None:
        members = {stage: [e.name for e in exps] for stage, exps in plan.stages().items()}
        if args.stage in members and args.index is None:  # the whole stage, in order
            only = members[args.stage]
        elif args.stage not in members or args.index >= len(members[args.stage]):
            raise QwenliteError(f"--stage/--index name no experiment: stages "
                                f"{', '.join(f'{k} (0-{len(v) - 1})' for k, v in members.items())}")
        else:
            only = [members[args.stage][args.index]]
    known = {e.name for e in plan.experiments}
    unknown = sorted(set(only or ()) - known)
    if unknown:
        raise QwenliteError(f"no experiment {unknown[0]!r} in the plan ({', '.join(known)})")
    if args.track:
        from qwenlite.experiments.tracking import check_tracker

        check_tracker(args.track)
    out = _out(args)
    Ledger(out / "ledger.json", budget=args.budget).check()
    check_same_plan(plan, out / "plan.json")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "plan.json").is_file():
        save_plan(plan, out / "plan.json", commit=code_version())
    elif plan.scale.rungs:  # the same plan with today's dtype and rates; its first commit kept
        from qwenlite.io import read_json_object

        first = read_json_object(out / "plan.json", "sweep plan").get("commit", "")
        save_plan(plan, out / "plan.json", commit=first)
    print(plan.table())
    from qwenlite.experiments.runner import load_results

    ledger = Ledger(out / "ledger.json")
    print(start_line(plan, set(load_results(out, plan)),
                     _spent_by(out, plan, ledger.load()["entries"], ledger), only))
    if plan.scale.rungs and args.dtype is not None:
        raise QwenliteError("a halving sweep runs every experiment in its plan's dtype "
                            f"({plan.scale.dtype}); leave out --dtype")
    dtype = pick_dtype(args.dtype, resolve_device(args.device)) if args.dtype else "fp32"
    ctx = Context(out, plan, str(weights), str(data), args.device, dtype,
                  progress=not args.no_progress, track=args.track)
    results = run_sweep(ctx, jobs=args.jobs, only=only)
    print(f"{len(results)} of {len(plan.experiments)} experiments done in {out}"
          + (" (SHRUNK plan)" if plan.scale.shrunk else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
