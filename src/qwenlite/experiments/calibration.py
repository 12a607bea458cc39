"""How fast this machine runs a sweep's experiments, measured on it and kept with the results.

``python -m qwenlite.sweep calibrate`` times a few LoRA training steps in each dtype (the grid's
largest cell at the default context) and appends the rates, with the CPU they were measured
on, to ``calibration.json`` in the sweep directory; the timing runs are charged to the sweep's
ledger like any experiment. Evaluation rates come from the calibration stage's zero-shot
forecasts (their generation FLOPS over their generation seconds) once they have run. The plan's
and the status's hours use the newest measurement taken on a CPU like this one, and say so.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import statistics
import subprocess
import sys
from pathlib import Path

from qwenlite.errors import QwenliteError
from qwenlite.io import atomic_write_text, read_json_object, read_records

CALIBRATION = "calibration.json"
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def machine() -> dict:
    """The CPU this runs on: its model name, the vector and bf16 flags, the cores torch uses."""
    import torch

    from qwenlite.accel.emulation import cpu_flags

    model, flags = "unknown", cpu_flags()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
                break
    except OSError:
        pass
    return {"cpu": model, "flags": [f for f in FLAGS if f in flags],
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def load(out: Path) -> dict:
    """The sweep's calibration file (``{"timings": []}`` if there is none yet)."""
    path = out / CALIBRATION
    return read_json_object(path, "calibration") if path.is_file() else {"timings": []}


def _step_seconds(metrics: Path) -> list[float]:
    """Seconds of each optimizer step but the first (which pays for warm-up)."""
    t = [r["seconds"] for r in read_records(metrics) if "seconds" in r]
    return [b - a for a, b in zip(t, t[1:])]


def time_training(out: Path, weights: str, data: str, ledger: Path, dtype: str, *, steps: int,
                  context: int, batch: int, rank: int, device: str = "auto") -> dict:
    """Run ``steps + 1`` LoRA steps in ``dtype`` and measure them (see the module docstring)."""
    from qwenlite.flops import counting_model, train_step_flops
    from qwenlite.model.config import QwenConfig

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    run = out / "calibration" / f"timing-{stamp}-{dtype}"
    cmd = [sys.executable, "-m", "qwenlite.train", "--weights", weights, "--data", data,
           "--ledger", str(ledger), "--device", device, "--dtype", dtype, "--out", str(run),
           "--lr", "1e-4", "--rank", str(rank), "--context", str(context), "--batch", str(batch),
           "--max-steps", str(steps + 1), "--eval-interval", "0", "--eval-windows", "1",
           "--save-interval", str(steps + 1), "--experiment", f"calibration: {dtype} steps",
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise QwenliteError(f"the {dtype} timing run failed: "
                            f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    seconds = _step_seconds(run / "metrics.jsonl")
    for name in ("state.pt", "state.prev.pt"):  # only the timings are kept
        (run / name).unlink(missing_ok=True)
    import shutil

    shutil.rmtree(run / "adapter", ignore_errors=True)
    config = QwenConfig.from_json(Path(weights) / "config.json")
    flops = train_step_flops(counting_model(config, rank), context, batch).rule
    median = statistics.median(seconds)
    return {"dtype": dtype, "run": run.name, "context": context, "batch": batch, "rank": rank,
            "step_seconds": [round(x, 3) for x in seconds], "flops_per_step": flops,
            "train_rate": flops / median}


def calibrate(out: Path, weights: str, data: str, *, dtypes=("fp32", "bf16"), steps: int = 3,
              context: int = 512, batch: int = 4, rank: int = 8, device: str = "auto") -> dict:
    """Time training in each dtype on this machine; append to ``calibration.json``."""
    from qwenlite.experiments.runner import code_version

    out.mkdir(parents=True, exist_ok=True)
    entry = {"measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "machine": machine(), "commit": code_version(),
             "train": {d: time_training(out, weights, data, out / "ledger.json", d, steps=steps,
                                        context=context, batch=batch, rank=rank, device=device)
                       for d in dtypes}}
    calib = load(out)
    calib["timings"].append(entry)
    atomic_write_text(out / CALIBRATION, json.dumps(calib, indent=2) + "\n")
    return entry


def eval_rate(out: Path, dtype: str) -> float | None:
    """Generation FLOPS per second of the calibration stage's zero-shot forecasts in ``dtype``."""
    path = out / f"zeroshot-{dtype}" / "eval-val" / "metrics.json"
    if not path.is_file():
        return None
    m = read_json_object(path, "evaluation metrics")
    return m["generation_flops"] / m["generation_seconds"] if m.get("generation_seconds") else None


def apply(scale, out: Path, dtype: str):
    """``scale`` with the rates measured on a CPU like this one in ``dtype`` (the newest), and
    a ``rate_source`` that says where they come from; unchanged if there is none."""
    here = machine()
    timings = [t for t in load(out)["timings"] if t["machine"]["cpu"] == here["cpu"]
               and dtype in t["train"]]
    if not timings:
        return dataclasses.replace(
            scale, rate_source=f"{scale.rate_source}; NOT calibrated on this CPU "
            f"({here['cpu']}): run python -m qwenlite.sweep calibrate")
    t = timings[-1]
    train = t["train"][dtype]["train_rate"]
    evals = eval_rate(out, dtype)
    source = (f"calibrated on this CPU ({here['cpu']}; {', '.join(here['flags']) or 'no'} "
              f"flags) on {t['measured'][:10]}: {dtype} LoRA step "
              f"{statistics.median(t['train'][dtype]['step_seconds']):.1f} s at "
              f"{t['train'][dtype]['batch']}x{t['train'][dtype]['context']}")
    if evals:
        source += f"; evaluation from the zero-shot {dtype} forecasts"
    else:
        source += "; evaluation rate the scale's (no zero-shot forecast timed yet)"
    return dataclasses.replace(scale, train_rate=train, eval_rate=evals or scale.eval_rate,
                               rate_source=source)


def hours_left(plan, done: set[str], partial: dict[str, int]) -> float:
    """Estimated hours of what remains: the experiments not done, less what the started ones
    already spent (``partial``: experiment -> FLOPS recorded)."""
    s = plan.scale
    left = 0.0
    for e in plan.experiments:
        if e.name in done:
            continue
        c = plan.costs[e.name]
        spent = partial.get(e.name, 0)
        train = max(c.train_flops - spent, 0)
        left += train / s.train_rate + c.eval_flops / s.eval_rate
    return left / 3600

