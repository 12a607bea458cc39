"""How long a run will take here, said before it starts: FLOPS per second by machine and dtype.

Every finished training run and evaluation records the rate it achieved (its counted FLOPS over
its wall time) in a small per-user file, ``~/.cache/qwenlite/rates.json`` (``$QWENLITE_RATES``
to move it), keyed by the machine (CPU model and threads, or GPU name), the dtype and the kind
of work (``train``: LoRA steps and their validations; ``generate``: forecasting) and the model's
size. A later run of the same kind on the same machine estimates its time from that rate. Before any run has
finished here, :func:`estimate` times a short matmul at the model's MLP shape (~0.1 s) and
scales it by the fraction of that rate each kind of work reached where it was measured
(:data:`EFFICIENCY`); that estimate is rougher and says so.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

RATES_ENV = "QWENLITE_RATES"

#: The counted FLOPS per second of each kind of work over :func:`probe`'s matmul rate, measured
#: on a 2-core AMD EPYC with AVX512-BF16 (torch 2.13.0, stand-in weights; report/results/halving:
#: calibration.json's 4x512 rank-8 LoRA steps, 4.57e11 bf16 / 2.50e11 fp32, and the zero-shot
#: forecasts of 150 validation systems, 2.11e11 / 1.09e11, against a probe of 4.1e11 / 1.87e11
#: timed with the sweep paused). Training counts its FLOPS by the 3x-forward rule, more than a
#: step with a frozen base executes, so its ratio exceeds 1.
EFFICIENCY = {("train", "bf16"): 1.11, ("train", "fp32"): 1.34,
              ("generate", "bf16"): 0.51, ("generate", "fp32"): 0.58}
_PROBE = (512, 896, 4864)  # tokens x hidden -> intermediate: the MLP's up projection


def rates_file() -> Path:
    return Path(os.environ.get(RATES_ENV) or Path.home() / ".cache" / "qwenlite" / "rates.json")


def machine_key(device: torch.device | str) -> str:
    """What the rate depends on: the GPU's name, or the CPU's model and torch's threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "mps"
    from qwenlite.experiments.calibration import machine

    m = machine()
    return f"cpu: {m['cpu']} ({', '.join(m['flags']) or 'no vector flags'}), {m['threads']} threads"


def _load() -> dict:
    try:
        data = json.loads(rates_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def work_key(kind: str, dtype: str, model) -> str:
    """``train bf16 896x24``: the kind of work, the dtype and the model's width x depth."""
    c = model.config
    return f"{kind} {dtype} {c.hidden_size}x{c.num_hidden_layers}"


def recorded(kind: str, dtype: str, device: torch.device | str, model) -> float | None:
    """The rate the last finished run of ``kind`` in ``dtype`` reached here with this model."""
    entry = _load().get(machine_key(device), {}).get(work_key(kind, dtype, model))
    return float(entry["flops_per_second"]) if isinstance(entry, dict) else None


def record(kind: str, dtype: str, device: torch.device | str, model, flops: float,
           seconds: float) -> None:
    """Keep the rate a finished run reached (a cache: a failure to write it is ignored)."""
    if flops <= 0 or seconds <= 0.1:  # too short to time
        return
    from qwenlite.io import atomic_write_text

    data = _load()
    data.setdefault(machine_key(device), {})[work_key(kind, dtype, model)] = {
        "flops_per_second": flops / seconds, "flops": flops, "seconds": round(seconds, 1),
        "torch": torch.__version__}
    try:
        rates_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rates_file(), json.dumps(data, indent=2) + "\n")
    except OSError:
        pass


def probe(dtype: str, device: torch.device | str, repeats: int = 8) -> float:
    """FLOPS per second of a ``512x896 @ 896x4864`` matmul in ``dtype`` on ``device``."""
    t = torch.bfloat16 if dtype == "bf16" else torch.float32
    m, k, n = _PROBE
    a = torch.randn(m, k, device=device, dtype=t)
    b = torch.randn(k, n, device=device, dtype=t)
    a @ b  # warm-up: oneDNN's kernel selection, allocation
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * m * k * n * repeats / max(time.perf_counter() - t0, 1e-9)


def estimate(kind: str, flops: float, dtype: str, device: torch.device | str, model
             ) -> tuple[float, str]:
    """Seconds ``flops`` of ``kind`` should take here in ``dtype``, and where the rate is from."""
    rate = recorded(kind, dtype, device, model)
    if rate:
        return flops / rate, "the rate of the last such run on this machine"
    rate = probe(dtype, device) * EFFICIENCY[(kind, dtype)]
    return flops / rate, "a matmul probe; rough until a run here has finished"


def duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3.4 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def start_line(what: str, kind: str, flops: float, budget: float, dtype: str,
               device: torch.device | str, model) -> str:
    """The line a command prints before it starts: FLOPS, share of the budget, estimated time."""
    from qwenlite.training.ledger import fmt_flops

    seconds, source = estimate(kind, flops, dtype, device, model)
    return (f"{what}: {fmt_flops(flops)} FLOPS, {flops / budget:.2%} of the {budget:.0e} budget; "
            f"estimated {duration(seconds)} on this machine in {dtype} (an estimate from "
            f"{source})")
