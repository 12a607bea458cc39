"""``python -m qwenlite.train``: LoRA fine-tuning with a FLOPS ledger (:mod:`qwenlite.training.trainer`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from qwenlite.cli import (
    ArgumentParser,
    add_data_arg,
    add_device_args,
    add_weights_arg,
    creatable_dir,
    main_guard,
    name_list,
    nonnegative_int,
    number_type,
    one_line_text,
    pick_dtype,
    positive_float,
    positive_int,
    resolve_device,
    resolve_dtype,
    resolve_weights,
    warn_if_slow_bf16,
    writable_file,
)
from qwenlite.errors import CheckpointError, QwenliteError
from qwenlite.io import check_dir_creatable, file_id, read_json_object
from qwenlite.model.loading import checkpoint_id
from qwenlite.training.ledger import Ledger
from qwenlite.training.trainer import TrainConfig, Trainer


def build_parser() -> ArgumentParser:
    """The argument parser of ``python -m qwenlite.train``."""
    from qwenlite.data.llmtime import MAX_DECIMALS
    from qwenlite.training.lora import PROJECTIONS

    defaults = TrainConfig()
    parser = ArgumentParser(prog="python -m qwenlite.train",
                            description="LoRA fine-tuning of Qwen2.5 on LLMTIME-encoded series.")
    add_weights_arg(parser)
    add_data_arg(parser)
    add_device_args(parser)
    parser.add_argument("--out", type=creatable_dir, default=None, metavar="RUN_DIR",
                        help="run directory (default runs/lora-r{rank}-lr{lr}-ctx{context}); "
                             "rerun with the same one to resume")
    parser.add_argument("--lr", type=positive_float, default=defaults.lr)
    parser.add_argument("--rank", type=nonnegative_int, default=defaults.rank,
                        help="LoRA rank (0: no LoRA; needs --logit-bias)")
    parser.add_argument("--logit-bias", action="store_true",
                        help="also train the course's logit bias (one per vocabulary entry, "
                             "added to the LM head), saved as adapter/logit_bias.safetensors")
    parser.add_argument("--alpha", type=positive_float, default=None,
                        help="LoRA alpha (default: the rank, i.e. scaling 1)")
    parser.add_argument("--context", type=positive_int, default=defaults.context,
                        help="tokens per training window")
    parser.add_argument("--batch", type=positive_int, default=defaults.batch)
    parser.add_argument("--max-steps", type=positive_int, default=defaults.max_steps)
    parser.add_argument("--eval-interval", type=nonnegative_int, default=defaults.eval_interval,
                        help="validate every N steps (0: only at the end)")
    parser.add_argument("--eval-windows", type=positive_int, default=defaults.eval_windows,
                        help="validation windows per validation")
    parser.add_argument("--save-interval", type=positive_int, default=defaults.save_interval)
    parser.add_argument("--seed", type=nonnegative_int, default=defaults.seed)
    parser.add_argument("--targets", type=name_list(PROJECTIONS),
                        default=",".join(defaults.targets),
                        help="comma-separated projections to adapt")
    parser.add_argument("--decimals", type=number_type(int, f"an integer from 1 to {MAX_DECIMALS}",
                                                       low=1, high=MAX_DECIMALS),
                        default=defaults.decimals)
    parser.add_argument("--stride", type=positive_int, default=None,
                        help="tokens between training windows (default: half the context)")
    parser.add_argument("--experiment", type=one_line_text, default="",
                        help="name in the FLOPS ledger")
    parser.add_argument("--ledger", type=writable_file, default=None, help="FLOPS ledger file")
    parser.add_argument("--budget", type=positive_float, default=None,
                        help="FLOPS budget stored in the ledger (default: the ledger's, 1e17 for a new one)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line (see :func:`build_parser`)."""
    return build_parser().parse_args(argv)


def recorded_config(run_dir: Path) -> TrainConfig | None:
    """The settings of the run a run directory holds (None for a new run)."""
    config_file = run_dir / "config.json"
    if not config_file.exists():
        return None
    raw = read_json_object(config_file, "run config", CheckpointError)
    try:
        return TrainConfig.from_dict(raw)
    except TypeError as exc:
        raise CheckpointError(f"{config_file} is unreadable ({exc})") from None


def check_resumable(cfg: TrainConfig, old: TrainConfig | None, run_dir: Path) -> None:
    """Refuse to reuse a run directory that holds a run (``old``) with other settings."""
    if old is None:
        return
    diff = [f.name for f in dataclasses.fields(cfg) if f.name not in TrainConfig.RESUMABLE
            and getattr(old, f.name) != getattr(cfg, f.name)
            and not (f.name.endswith("_id") and not getattr(old, f.name))]  # a run from before ids
    if diff:
        name = diff[0]
        raise QwenliteError(
            f"{run_dir} holds a run with {name}={getattr(old, name)!r}, not "
            f"{getattr(cfg, name)!r}; use another --out for a new run")


@main_guard
def main(argv: list[str] | None = None) -> int:
    """Train; every input (paths, ledger, budget, weights, data, settings) is checked before the
    run directory or the ledger is written."""
    from qwenlite.data import resolve_data

    args = parse_args(argv)
    cfg = TrainConfig(lr=args.lr, rank=args.rank, alpha=args.alpha, context=args.context,
                      batch=args.batch, max_steps=args.max_steps,
                      eval_interval=args.eval_interval, eval_windows=args.eval_windows,
                      save_interval=args.save_interval, seed=args.seed,
                      dtype=args.dtype, targets=args.targets, decimals=args.decimals,
                      stride=args.stride, logit_bias=args.logit_bias,
                      experiment=args.experiment)
    if not cfg.rank and not cfg.logit_bias:
        raise QwenliteError("--rank 0 trains nothing: add --logit-bias or give a rank >= 1")
    device = resolve_device(args.device)
    default_dir = f"runs/lora-r{cfg.rank}-lr{cfg.lr:g}-ctx{cfg.context}"
    run_dir = check_dir_creatable(args.out or default_dir, "run directory")
    old = recorded_config(run_dir)
    # --dtype auto resumes a run in its recorded dtype, whatever this machine would pick
    cfg.dtype = pick_dtype(old.dtype if old and args.dtype == "auto" else args.dtype, device)
    warn_if_slow_bf16(resolve_dtype(cfg.dtype), device)
    ledger = Ledger(args.ledger, budget=args.budget)
    ledger.check()
    cfg.weights = str(resolve_weights(args.weights))
    cfg.data = str(resolve_data(args.data))
    cfg.weights_id = checkpoint_id(cfg.weights)["sha256"]
    cfg.data_id = file_id(cfg.data)
    check_resumable(cfg, old, run_dir)
    result = Trainer(cfg, run_dir, device, ledger, progress=not args.no_progress).run()
    summary = {k: v for k, v in result.items() if v is not None}
    print(json.dumps({"run_dir": str(run_dir), **summary}))
    if isinstance(summary.get("val_loss"), float) and not math.isfinite(summary["val_loss"]):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
