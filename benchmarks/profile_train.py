"""Where a LoRA training step's time goes: torch.profiler over qwenlite's step, by kind of work.

Loads the checkpoint as ``python -m qwenlite.train`` does (glibc malloc keeping freed memory,
fp32 weights, the accelerated model, LoRA on q_proj/v_proj, bf16 under autocast for ``--dtype
bf16``), runs warm-up steps, then
profiles whole optimizer steps (forward, fused LM-head loss, backward, AdamW). Printed per
step: wall time, each kind of work's self time (matmuls, attention, dtype conversions,
elementwise passes, the loss's softmax, the optimizer, …) with its share, the top operators,
and the time inside the fused LM head + loss. With ``--rate`` also the executed FLOPS per second
against torch's matmul rate measured in the same run.

    QWENLITE_WEIGHTS=DIR python benchmarks/profile_train.py --dtype bf16 --seq 512 [--seq 768]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from common import DTYPES, fmt_table, machine, matmul_rate, weights_from_args, write_results

#: operator name -> kind of work (first matching prefix wins; self time, so no double counting)
KINDS = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
                "aten::baddbmm", "aten::addmv", "aten::mv", "mkldnn", "onednn")),
    ("attention", ("aten::_scaled_dot_product", "aten::scaled_dot_product",
                   "aten::_flash_attention", "aten::_efficient_attention")),
    ("dtype conversion", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::_autocast")),
    ("loss softmax", ("aten::_log_softmax", "aten::log_softmax", "aten::exp", "aten::gather",
                      "aten::index_put", "aten::index")),
    ("optimizer", ("Optimizer", "aten::_foreach", "aten::lerp", "aten::addcmul", "aten::addcdiv",
                   "aten::sqrt", "aten::_fused_adam")),
    ("memory", ("aten::empty", "aten::zeros", "aten::zero_", "aten::fill_", "aten::resize_",
                "aten::clone", "aten::contiguous", "aten::cat", "aten::stack")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu",
                     "aten::pow", "aten::mean", "aten::rsqrt", "aten::neg", "aten::sum",
                     "aten::where", "aten::masked_fill", "aten::sigmoid", "aten::embedding",
                     "aten::threshold", "aten::silu_backward", "aten::sigmoid_backward",
                     "aten::pow_backward")),
    ("views", ("aten::view", "aten::reshape", "aten::transpose", "aten::t", "aten::slice",
               "aten::select", "aten::expand", "aten::permute", "aten::unsqueeze",
               "aten::squeeze", "aten::split", "aten::as_strided", "aten::narrow",
               "aten::_unsafe_view", "aten::detach", "aten::alias", "aten::unbind",
               "aten::chunk", "aten::flatten", "aten::numpy_T")),
]


def kind_of(name: str) -> str:
    for kind, prefixes in KINDS:
        if name.startswith(prefixes):
            return kind
    return "other"


def build(weights: str, rank: int):
    from qwenlite.accel import apply
    from qwenlite.model import load_model
    from qwenlite.training.lora import apply_lora

    model = apply(load_model(weights, dtype=torch.float32))
    apply_lora(model, r=rank, alpha=rank)
    model.train()
    return model


def profile(model, dtype: str, batch: int, seq: int, warmup: int, steps: int,
            shapes: bool = False) -> dict:
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    from qwenlite.training import trainer
    from qwenlite.training.loss import linear_cross_entropy

    def labelled_loss(*args, **kwargs):
        with record_function("lm_head+loss"):
            return linear_cross_entropy(*args, **kwargs)

    trainer.linear_cross_entropy = labelled_loss
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151000, (batch, seq), generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step():
        with record_function("forward"), autocast:
            loss = trainer.lm_loss(model, ids, None)
        opt.zero_grad(set_to_none=True)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
        return loss

    for _ in range(warmup):
        step()
    walls = []
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t0)
    events = prof.key_averages()
    by_kind: dict[str, float] = defaultdict(float)
    ops = []
    regions = {}
    for e in events:
        if e.key in ("forward", "backward", "optimizer", "lm_head+loss"):
            regions[e.key] = e.cpu_time_total / 1e6 / steps
            continue
        if e.key.startswith("ProfilerStep"):
            continue
        self_s = e.self_cpu_time_total / 1e6 / steps
        by_kind[kind_of(e.key)] += self_s
        ops.append((e.key, self_s, e.count // steps))
    ops.sort(key=lambda o: -o[1])
    result = {"wall_seconds": walls, "kinds": dict(by_kind), "regions": regions,
              "top_ops": ops[:25]}
    if shapes:  # each matmul shape: its time, and its rate counted as 2·m·n·k
        mms = []
        for e in prof.key_averages(group_by_input_shape=True):
            if e.key in ("aten::mm", "aten::addmm") and e.input_shapes:
                dims = [d for d in e.input_shapes if len(d) == 2]
                a, b = dims[-2], dims[-1]
                flops = 2 * a[0] * a[1] * b[1] * e.count
                seconds = e.self_cpu_time_total / 1e6
                mms.append((f"{e.key} {a[0]}x{a[1]} @ {b[0]}x{b[1]}", seconds / steps,
                            e.count // steps, flops / seconds / 1e9))
        mms.sort(key=lambda m: -m[1])
        result["matmuls"] = mms
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, nargs="+", default=[512])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1, help="profiled steps (averaged)")
    parser.add_argument("--rate", action="store_true",
                        help="also measure torch's matmul rate in the dtype, in this run")
    parser.add_argument("--shapes", action="store_true",
                        help="also time each matmul shape and its GFLOPS")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    from qwenlite.flops import counting_model, train_step_flops
    from qwenlite.model import QwenConfig

    from qwenlite.accel.memory import keep_freed_memory

    keep_freed_memory()  # as python -m qwenlite.train does (cli.main_guard)
    weights = weights_from_args(args.weights)
    config = QwenConfig.from_json(weights / "config.json")
    rate = matmul_rate(DTYPES[args.dtype]) if args.rate else None
    model = build(str(weights), args.rank)
    results = {"machine": machine(), "args": vars(args), "matmul_rate": rate, "runs": {}}
    for seq in args.seq:
        executed = train_step_flops(counting_model(config, lora_rank=args.rank), seq,
                                    args.batch).executed
        run = profile(model, args.dtype, args.batch, seq, args.warmup, args.steps, args.shapes)
        run["executed_flops"] = executed
        results["runs"][seq] = run
        wall = min(run["wall_seconds"])
        total = sum(run["kinds"].values())
        line = (f"[{args.dtype} {args.batch}x{seq} rank {args.rank}] step {wall:.2f} s "
                f"(profiled; profiler self time {total:.2f} s); executed {executed:.3e} FLOPS = "
                f"{executed / wall / 1e9:.0f} GFLOPS")
        if rate:
            line += f", {100 * executed / wall / rate:.0f}% of torch's matmul ({rate / 1e9:.0f} GFLOPS)"
        print(line)
        print("regions (total time): " + ", ".join(f"{k} {v:.2f} s"
                                                   for k, v in run["regions"].items()))
        rows = [[k, f"{v:.3f}", f"{100 * v / total:.1f}%"]
                for k, v in sorted(run["kinds"].items(), key=lambda kv: -kv[1])]
        print(fmt_table(rows, ["kind", "self s", "share"]))
        rows = [[name, kind_of(name), f"{s:.3f}", str(n)] for name, s, n in run["top_ops"]]
        print(fmt_table(rows, ["operator", "kind", "self s", "calls"]))
        if args.shapes:
            rows = [[name, f"{sec:.3f}", str(n), f"{gf:.0f}"] for name, sec, n, gf in run["matmuls"]]
            print(fmt_table(rows, ["matmul", "self s", "calls", "GFLOPS"]))
    write_results(args.out, results)


if __name__ == "__main__":
    main()
