"""``python -m qwenlite.diagnose``: why a model forecasts as it does (:mod:`qwenlite.evaluation.diagnosis`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qwenlite.cli import (
    ArgumentParser,
    creatable_dir,
    main_guard,
    one_line_text,
    positive_float,
    positive_int,
    pick_dtype,
    resolve_device,
    resolve_weights,
    writable_file,
)
from qwenlite.errors import QwenliteError

#: Token classes of a forecast, in the order the report shows them.
CLASSES = ("tens", "units", "dec1", "dec2", "point", "var_sep", "time_sep")
from qwenlite.evaluation.diagnosis import diagnose


def build_parser() -> ArgumentParser:
    from qwenlite.evaluation.forecasting import add_forecast_args

    parser = ArgumentParser(prog="python -m qwenlite.diagnose",
                            description="Teacher-forced NLL by digit position and free-running "
                                        "forecasts, with and without an adapter.")
    add_forecast_args(parser, adapter_required=True)
    parser.add_argument("--systems", type=positive_int, default=16,
                        help="the first N validation systems")
    parser.add_argument("--samples", type=positive_int, default=5,
                        help="sampled forecasts per system for the median (1: greedy only)")
    parser.add_argument("--temperature", type=positive_float, default=0.7)
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--out", type=creatable_dir, required=True, help="output directory")
    parser.add_argument("--ledger", type=writable_file, default=None, help="FLOPS ledger file")
    parser.add_argument("--experiment", type=one_line_text, default="",
                        help="name in the FLOPS ledger")
    parser.add_argument("--no-progress", action="store_true")
    return parser


@main_guard
def main(argv: list[str] | None = None) -> int:
    from qwenlite.accel import for_device
    from qwenlite.data import Split, load_dataset, resolve_data
    from qwenlite.data.llmtime import LLMTimeSettings
    from qwenlite.data.tokenizer import Tokenizer
    from qwenlite.evaluate import check_run_dir
    from qwenlite.model.loading import load_model
    from qwenlite.training.ledger import Ledger
    from qwenlite.training.lora import load_adapter

    args = build_parser().parse_args(argv)
    run = check_run_dir(args.adapter)
    weights = resolve_weights(args.weights)
    dataset = load_dataset(resolve_data(args.data))
    k, h = args.context_steps, args.horizon
    if k + h > dataset.trajectories.shape[1]:
        raise QwenliteError(f"--context-steps {k} + --horizon {h} exceed the "
                            f"{dataset.trajectories.shape[1]} timesteps of the series")
    split, settings = Split.load(run / "split.json"), LLMTimeSettings.load(run / "llmtime.json")
    systems = np.asarray(split.val)[: args.systems]
    traj = dataset.trajectories[systems].astype(np.float64)
    contexts, truth = traj[:, :k], traj[:, k:k + h]
    device = resolve_device(args.device)
    args.dtype = pick_dtype(args.dtype, device)
    ledger = Ledger(args.ledger)
    ledger.check()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = str(out_dir.resolve())
    ledger.plan(key, args.experiment or f"diagnose {run.name}", "eval", 0,
                systems=len(systems), split="val")

    tok = Tokenizer(weights)
    model = for_device(load_model(weights, dtype=args.dtype, device=device))
    model.eval()
    opts = dict(samples=args.samples, temperature=args.temperature, batch=args.batch, seed=0,
                progress=not args.no_progress)
    result = {"adapter": str(run), "weights": str(weights), "systems": systems.tolist(),
              "context_steps": k, "horizon": h, "samples": args.samples,
              "temperature": args.temperature, "classes": list(CLASSES)}
    result["base"] = diagnose(model, tok, settings, contexts, truth, dataset.time, **opts)
    ledger.record(key, result["base"]["flops"])
    load_adapter(model, run / "adapter")
    result["adapter_model"] = diagnose(model, tok, settings, contexts, truth, dataset.time, **opts)
    total = result["base"]["flops"] + result["adapter_model"]["flops"]
    ledger.record(key, total, status="done")
    (out_dir / "diagnosis.json").write_text(json.dumps(result, indent=2))
    for name in ("base", "adapter_model"):
        r = result[name]
        tf = r["teacher_forced"]
        print(f"{name:<14} NLL " + " ".join(f"{c} {tf['nll'][c]:.3f}" for c in tf["nll"])
              + f" | greedy MAE {r['greedy']['mae']:.4f} collapsed {r['greedy']['collapsed']}"
              + (f" | median-of-{args.samples} MAE {r['sample_median']['mae']:.4f}"
                 if "sample_median" in r else ""))
    print(f"outputs in {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
