"""Shared pieces of the benchmarks: timing, the matmul roofline, LLMTIME prompts, reporting."""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(fn, repeats: int = 1, warmup: int = 0) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls after ``warmup`` calls, and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def matmul_rate(dtype: torch.dtype) -> float:
    """Best measured FLOPS/s, counted as m·p·(2n−1), over the model's large matmul shapes
    (4096 rows through the MLP's up and down projections, and through q_proj), in the layout a
    linear layer uses (x·Wᵀ with W stored (out, in): other layouts can be far slower in bf16)."""
    import torch.nn.functional as F

    best = 0.0
    for m, n, p in ((4096, 896, 4864), (4096, 4864, 896), (4096, 896, 896)):
        a = torch.randn(m, n, dtype=dtype)
        w = torch.randn(p, n, dtype=dtype)
        seconds, _ = timed(lambda: F.linear(a, w), repeats=3, warmup=1)
        best = max(best, m * p * (2 * n - 1) / seconds)
    return best


def matmul_rates(dtype: torch.dtype) -> dict[str, float]:
    """The reference rates for a run in ``dtype``: ``native``, torch's own matmul in that dtype
    (what transformers runs on), and ``units``, the matmul qwenlite's run actually executes — the
    fp32 rate when bf16 matmuls are emulated on fp32 units (``qwenlite.accel.emulation``)."""
    from qwenlite.accel import emulation

    native = matmul_rate(dtype)
    if dtype == torch.bfloat16 and emulation.bf16_matmul_mode() == "emulate":
        return {"native": native, "units": matmul_rate(torch.float32)}
    return {"native": native, "units": native}


def describe_rates(name: str, rates: dict[str, float]) -> str:
    text = f"[{name}] torch {name} matmul rate {rates['native'] / 1e9:.1f} GFLOPS"
    if rates["units"] != rates["native"]:
        text += (f"; qwenlite runs {name} matmuls exactly on the fp32 units "
                 f"(QWENLITE_BF16_MATMUL=emulate): fp32 matmul rate {rates['units'] / 1e9:.1f} GFLOPS")
    return text


def llmtime_prompts(tokenizer, n_prompts: int, steps: int, data: str | None = None) -> list[list[int]]:
    """Token ids of the first ``steps`` timesteps of ``n_prompts`` systems, LLMTIME-encoded."""
    from qwenlite.data import load_dataset, resolve_data
    from qwenlite.data.llmtime import LLMTimeSettings, encode, fit_alpha

    real = ROOT.parent / "shared" / "data" / "lotka_volterra_data.h5"
    path = resolve_data(data or (str(real) if real.is_file() else None))
    traj = load_dataset(path).trajectories
    settings = fit_alpha(traj, LLMTimeSettings())
    return [tokenizer.encode(encode(traj[i, :steps], settings)) for i in range(n_prompts)]


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def free_memory() -> None:
    gc.collect()


def add_malloc_arg(parser) -> None:
    parser.add_argument("--malloc", choices=["keep", "system"], default="keep",
                        help="glibc malloc for the whole run, both implementations: keep freed "
                             "memory (qwenlite's setting, qwenlite.accel.memory) or as it is")


def set_malloc(choice: str) -> str:
    """Set glibc malloc for this process as ``--malloc`` says (qwenlite's commands keep freed
    memory, ``cli.main_guard``; a library call does not), before anything large is allocated;
    the setting in words."""
    os.environ["QWENLITE_MALLOC"] = choice
    from qwenlite.accel.memory import keep_freed_memory

    return "keep freed memory" if keep_freed_memory() else "system"


def machine() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }


def weights_from_args(arg: str | None) -> Path:
    path = arg or os.environ.get("QWENLITE_WEIGHTS")
    if not path:
        sys.exit("benchmarks need a checkpoint: --weights DIR or QWENLITE_WEIGHTS=DIR "
                 "(e.g. the stand-in built by ../shared/standin/build.sh)")
    return Path(path)


def write_results(out: str | None, results: dict) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2, default=float))
        print(f"results written to {out}")


def fmt_table(rows: list[list], headers: list[str]) -> str:
    cols = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cols[1:]]
    return "\n".join(lines)


__all__ = ["np"]
