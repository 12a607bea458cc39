"""LoRA training step: qwenlite vs transformers + PEFT, measured in one run on one checkpoint.

Each implementation runs in its own subprocess (so peak RSS is its own): load the checkpoint, wrap
q_proj/v_proj with rank-4 LoRA, and time full optimizer steps (forward, loss, backward, AdamW) on
a (batch × seq) block of tokens, in fp32 and under bf16 autocast. Printed: seconds per step, the
speed-up, the achieved GFLOPS — FLOPS actually executed (forward + backward without weight
gradients of frozen matrices, from :func:`qwenlite.flops.train_step_flops`) — against the
matmul rates measured in the same run (torch's in the dtype, and for qwenlite the fp32 one where it
runs bf16 matmuls on the fp32 units), and each implementation's peak RSS.

qwenlite tunes glibc malloc to keep freed memory (``qwenlite.accel.memory``: large temporaries
stop page-faulting). That is a process setting any program could make, so transformers+PEFT runs
both as it is and with the same setting (``--baseline-malloc``), and the speed-up is printed
against each.

    QWENLITE_WEIGHTS=DIR python benchmarks/bench_train.py [--batch 4 --seq 512 --dtypes fp32 bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from common import (
    DTYPES,
    describe_rates,
    fmt_table,
    machine,
    matmul_rates,
    peak_rss_gb,
    weights_from_args,
    write_results,
)


def worker(impl: str, weights: str, dtype: str, batch: int, seq: int, steps: int,
           warmup: int) -> dict:
    from qwenlite.accel.memory import keep_freed_memory

    malloc = "keep" if keep_freed_memory() else "system"  # $QWENLITE_MALLOC, set by main()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151000, (batch, seq), generator=gen)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    if impl == "qwenlite":
        from qwenlite.accel import apply
        from qwenlite.model import load_model
        from qwenlite.training.lora import apply_lora
        from qwenlite.training.trainer import lm_loss

        model = apply(load_model(weights, dtype=torch.float32))
        apply_lora(model, r=4, alpha=4)
        model.train()

        def loss_fn():
            return lm_loss(model, ids, None)
    else:
        import peft
        from transformers import Qwen2ForCausalLM

        base = Qwen2ForCausalLM.from_pretrained(weights, dtype=torch.float32,
                                                attn_implementation="sdpa")
        model = peft.get_peft_model(base, peft.LoraConfig(
            r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
            task_type="CAUSAL_LM"))
        model.train()

        def loss_fn():
            return model(input_ids=ids, labels=ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times, faults = [], []
    for _ in range(warmup + steps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        with autocast:
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"seconds": min(times[warmup:]), "all_seconds": times, "page_faults": faults,
            "loss": float(loss),
            "peak_rss_gb": peak_rss_gb(), "malloc": malloc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=DTYPES)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (the best is reported)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first: the heap grows over the first few steps of "
                             "a process (page faults) before it settles to the steady state a "
                             "long run sees; the per-step faults are in the --out JSON")
    parser.add_argument("--baseline-malloc", choices=["system", "keep", "both"], default="both",
                        help="run transformers+PEFT with glibc malloc as it is, with the setting "
                             "qwenlite makes (keep freed memory, qwenlite.accel.memory), or both")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "DTYPE", "WEIGHTS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, dtype, weights = args.worker
        print(json.dumps(worker(impl, weights, dtype, args.batch, args.seq, args.steps,
                                args.warmup)))
        return

    from qwenlite.flops import counting_model, train_step_flops
    from qwenlite.model import QwenConfig

    weights = weights_from_args(args.weights)
    config = QwenConfig.from_json(weights / "config.json")
    flops = train_step_flops(counting_model(config, lora_rank=4), args.seq, args.batch)
    print(f"checkpoint {weights}; {machine()}; LoRA r=4 on q_proj,v_proj; "
          f"batch {args.batch} x {args.seq} tokens; best of {args.steps} steps after "
          f"{args.warmup} warm-up steps")
    print(f"FLOPS per step: rule (3x forward) {flops.rule:.3e}, executed {flops.executed:.3e}")
    results = {"machine": machine(), "weights": str(weights), "args": vars(args),
               "flops": flops.as_dict(), "runs": {}}
    rows = []
    for dtype in args.dtypes:
        rates = matmul_rates(DTYPES[dtype])
        run = {"matmul_rates": rates}
        baselines = ["system", "keep"] if args.baseline_malloc == "both" else [args.baseline_malloc]
        jobs = [("qwenlite", "qwenlite", "keep")] + [
            (f"peft-malloc-{m}", "peft", m) for m in baselines]
        for key, impl, malloc in jobs:
            cmd = [sys.executable, __file__, "--worker", impl, dtype, str(weights),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            env = {**os.environ, "QWENLITE_MALLOC": malloc}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{key} {dtype} failed:\n{proc.stderr[-2000:]}")
            run[key] = json.loads(proc.stdout.strip().splitlines()[-1])
        ours = run["qwenlite"]
        for key, _, _ in jobs:
            print(f"{dtype} {key}: every step (s) "
                  f"{' '.join(f'{t:.1f}' for t in run[key]['all_seconds'])}; page faults "
                  f"{' '.join(str(f) for f in run[key]['page_faults'])}")
        for key, impl, _ in jobs:
            r = run[key]
            achieved = flops.executed / r["seconds"]
            units = rates["units"] if impl == "qwenlite" else rates["native"]
            name = impl if impl == "qwenlite" else f"transformers+peft (malloc {r['malloc']})"
            rows.append([dtype, name, f"{r['seconds']:.2f}", f"{achieved / 1e9:.1f}",
                         f"{100 * achieved / rates['native']:.0f}%",
                         f"{100 * achieved / units:.0f}%", f"{r['peak_rss_gb']:.2f}",
                         f"{r['loss']:.4f}"])
        for key, impl, _ in jobs[1:]:
            theirs = run[key]
            rows.append([dtype, f"speed-up vs malloc {theirs['malloc']}",
                         f"{theirs['seconds'] / ours['seconds']:.2f}x", "", "", "",
                         f"{ours['peak_rss_gb'] / theirs['peak_rss_gb']:.2f}x", ""])
        results["runs"][dtype] = run
        print(describe_rates(dtype, rates))
    print(fmt_table(rows, ["dtype", "implementation", "s/step", "GFLOPS (executed)",
                           "of dtype matmul", "of units' matmul", "peak RSS GB", "last loss"]))
    write_results(args.out, results)


if __name__ == "__main__":
    main()
