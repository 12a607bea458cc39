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
    main_guard,
    nonnegative_int,
    one_line_text,
    positive_float,
    positive_int,
    resolve_weights,
)
from qwenlite.errors import QwenliteError

DEFAULT_OUT = Path("report") / "results"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m qwenlite.sweep",
                            description="Plan, run and follow the coursework's experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("plan", "print the plan and its FLOPS"),
                       ("run", "run the experiments not done yet"),
                       ("status", "what is done, the scores and the choices")):
        p = sub.add_parser(name, help=text, description=text)
        p.error = parser.error  # one-line errors from the subcommands too
        p.add_argument("--scale", default="cpu", type=one_line_text,
                       help="full (GPU), cpu (shrunk), or a JSON plan file (default cpu)")
        p.add_argument("--out", type=creatable_dir, default=DEFAULT_OUT,
                       help=f"sweep directory (default {DEFAULT_OUT})")
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
        if name == "run":
            add_device_args(p)
            p.add_argument("--jobs", type=positive_int, default=1,
                           help="experiments at once within a stage (one per GPU)")
            p.add_argument("--only", type=one_line_text, action="append", default=None,
                           help="run only this experiment (repeatable)")
            p.add_argument("--stage", type=one_line_text, default=None,
                           help="with --index: run one experiment of a stage (Slurm arrays)")
            p.add_argument("--index", type=nonnegative_int, default=None)
            p.add_argument("--track", choices=("wandb", "tensorboard"), default=None,
                           help="also send metrics to this tracker (if installed)")
            p.add_argument("--no-progress", action="store_true")
    return parser


def _plan(args, weights_needed: bool):
    from qwenlite.data import load_dataset, resolve_data
    from qwenlite.experiments.plan import build_plan, load_scale
    from qwenlite.model.config import QwenConfig

    scale = load_scale(args.scale, train_rate=args.train_rate, eval_rate=args.eval_rate)
    if args.weights or weights_needed:
        weights = resolve_weights(args.weights)
        config = QwenConfig.from_json(weights / "config.json")
    else:
        weights, config = None, QwenConfig.from_name("qwen2.5-0.5b")
    data = resolve_data(args.data)
    dataset = load_dataset(data)
    plan = build_plan(scale, config, dataset.trajectories.astype("float64"), args.budget,
                      str(data))
    plan.check()
    return plan, weights, data


def _status(args) -> int:
    from qwenlite.experiments.runner import load_results, make_choices
    from qwenlite.training.ledger import Ledger

    plan, _, _ = _plan(args, weights_needed=False)
    results = load_results(Path(args.out), plan)
    ledger = Ledger(Path(args.out) / "ledger.json")
    entries = ledger.load()["entries"]  # empty, and nothing created, if there is none yet
    print(f"sweep {args.out}: {plan.scale.name} plan"
          + (" (SHRUNK for a CPU)" if plan.scale.shrunk else ""))
    for e in plan.experiments:
        r = results.get(e.name)
        prefix = ledger.key(str((Path(args.out) / e.name).resolve()))
        mine = [v for k, v in entries.items() if k == prefix or k.startswith(prefix + "/")]
        flops = sum(int(v["flops"]) for v in mine)
        state = "done" if r else ("started" if mine else "pending")
        score = (f"val MAE {r['val']['mae']:.4f}" + (f"  val loss {r['val_loss']:.4f}"
                                                     if r.get("val_loss") else "")
                 + (f"  test MAE {r['test']['mae']:.4f}" if "test" in r else "")) if r else ""
        minutes = sum(r["seconds"].values()) / 60 if r else 0
        print(f"  {e.name:<18} {e.stage:<9} {state:<8} {flops:.3e} FLOPS"
              + (f"  {minutes:6.1f} min  {score}" if r else ""))
    for stage, c in make_choices(plan, results)["stages"].items():
        print(f"  choice {stage}: {c['chosen']} -> {c['sets']}")
    used = sum(int(v["flops"]) for v in entries.values())
    print(f"  ledger total {used:.3e} FLOPS ({100 * used / plan.budget:.3f}% of "
          f"{plan.budget:.0e})")
    return 0


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "status":
        return _status(args)
    if args.command == "plan":
        plan, _, _ = _plan(args, weights_needed=False)
        if args.emit == "slurm":
            from qwenlite.experiments.slurm import slurm_script
            from qwenlite.io import atomic_write_text

            out = Path(args.out)
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
        if args.stage not in members or args.index is None or args.index >= len(
                members[args.stage]):
            raise QwenliteError(f"--stage/--index name no experiment: stages "
                                f"{', '.join(f'{k} (0-{len(v) - 1})' for k, v in members.items())}")
        only = [members[args.stage][args.index]]
    known = {e.name for e in plan.experiments}
    unknown = sorted(set(only or ()) - known)
    if unknown:
        raise QwenliteError(f"no experiment {unknown[0]!r} in the plan ({', '.join(known)})")
    if args.track:
        from qwenlite.experiments.tracking import check_tracker

        check_tracker(args.track)
    out = Path(args.out)
    Ledger(out / "ledger.json", budget=args.budget).check()
    check_same_plan(plan, out / "plan.json")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "plan.json").is_file():
        save_plan(plan, out / "plan.json", commit=code_version())
    print(plan.table())
    ctx = Context(out, plan, str(weights), str(data), args.device, args.dtype,
                  progress=not args.no_progress, track=args.track)
    results = run_sweep(ctx, jobs=args.jobs, only=only)
    print(f"{len(results)} of {len(plan.experiments)} experiments done in {out}"
          + (" (SHRUNK plan)" if plan.scale.shrunk else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
