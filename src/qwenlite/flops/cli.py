"""``python -m qwenlite.flops --breakdown``: the FLOPS of a forward, a training step and a generation."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable

from qwenlite.cli import (
    ArgumentParser,
    existing_dir,
    main_guard,
    name_list,
    positive_int,
    weights_dir_from,
)
from qwenlite.errors import QwenliteError
from qwenlite.flops.counts import counting_model, forward_flops, generation_flops
from qwenlite.flops.executed import train_step_flops
from qwenlite.flops.tables import breakdown_table, fmt_count, summarize, text_table
from qwenlite.model.config import PRESETS, QwenConfig
from qwenlite.model.counting import FlopCount
from qwenlite.training.lora import DEFAULT_TARGETS, PROJECTIONS


def _config_from(args) -> tuple[QwenConfig, str]:
    if args.weights is not None:
        directory = weights_dir_from(args.weights)
        if not directory.is_dir():
            raise QwenliteError(f"checkpoint directory {directory} (from --weights) does not exist")
        return QwenConfig.from_json(directory / "config.json"), str(directory)
    return QwenConfig.from_name(args.preset), args.preset


def report(config: QwenConfig, *, seq_len: int, batch: int = 1, train: bool = False,
           lora_rank: int | None = None, lora_targets: Iterable[str] = DEFAULT_TARGETS,
           generate: int | None = None, head_rows: int | None = None,
           gqa_as_mha: bool = False, name: str = "") -> tuple[dict, FlopCount]:
    """Everything the command line prints: a JSON-ready dict, and the itemized forward.

    Keys of the dict: ``model``, ``config``, ``seq_len``, ``batch``, ``lora``, ``gqa_as_mha``,
    ``mode``, ``forward`` (this mode's forward for the batch: training includes the loss),
    ``forward_includes_loss``, ``train_forward``, ``train_step`` (3 × train_forward, the budget
    figure), ``executed`` and ``executed_breakdown`` (side figure), ``breakdown`` (component ->
    FLOPS, summing to ``forward``), ``per_layer`` (one layer's components), ``layers``, and with
    ``generate`` a ``generation`` object.
    """
    lora_targets = tuple(lora_targets)
    model = counting_model(config, lora_rank, lora_targets)
    step = train_step_flops(model, seq_len, batch, gqa_as_mha=gqa_as_mha)
    fwd = step.breakdown if train else forward_flops(model, seq_len, batch,
                                                      gqa_as_mha=gqa_as_mha)
    components, per_layer, n_layers = summarize(fwd)
    out = {
        "model": name,
        "config": {"d": config.hidden_size, "d_ff": config.intermediate_size,
                   "h": config.num_attention_heads, "h_kv": config.num_key_value_heads,
                   "d_h": config.head_dim, "V": config.vocab_size,
                   "L": config.num_hidden_layers, "tied_head": config.tie_word_embeddings,
                   "params": config.n_params},
        "seq_len": seq_len,
        "batch": batch,
        "lora": None if lora_rank is None else {"rank": lora_rank, "targets": list(lora_targets)},
        "gqa_as_mha": gqa_as_mha,
        "mode": "train" if train else "inference",
        "forward": fwd.total(),
        "forward_includes_loss": train,
        "train_forward": step.forward,
        "train_step": step.rule,
        "executed": step.executed,
        "executed_breakdown": dict(step.executed_breakdown),
        "breakdown": components,
        "per_layer": per_layer,
        "layers": n_layers,
    }
    if generate is not None:
        gen = generation_flops(model, seq_len, generate - 1, batch, head_rows=head_rows,
                               gqa_as_mha=gqa_as_mha)
        prefill = sum(v for k, v in gen.items() if k.startswith("prefill."))
        out["generation"] = {"prompt_len": seq_len, "new_tokens": generate,
                             "decode_steps": generate - 1, "head_rows": head_rows,
                             "prefill": prefill,
                             "decode": gen.total() - prefill, "total": gen.total(),
                             "breakdown": summarize(gen)[0]}
    return out, fwd


def _print_report(rep: dict, fwd: FlopCount, breakdown: bool) -> None:
    c = rep["config"]
    lora = rep["lora"]
    print(f"{rep['model']}: d={c['d']} d_ff={c['d_ff']} h={c['h']} h_kv={c['h_kv']} "
          f"d_h={c['d_h']} V={c['V']} L={c['L']}; seq_len={rep['seq_len']} batch={rep['batch']}; "
          + (f"LoRA r={lora['rank']} on {','.join(lora['targets'])}" if lora else "no LoRA")
          + "; GQA " + ("K/V projections counted full-width (--gqa-as-mha)" if rep["gqa_as_mha"]
                        else "K/V projections at their real width, attention as MHA"))
    what = ("training forward: every position through the LM head, plus the loss"
            if rep["mode"] == "train" else "inference forward: every position through the LM head")
    if breakdown:
        print(f"\n{what}\n")
        print(breakdown_table(fwd))
    rows = [("forward (" + rep["mode"] + ")", fmt_count(rep["forward"]), f"{rep['forward']:.3e}")]
    rows.append(("train step = 3 × training forward (budget)", fmt_count(rep["train_step"]),
                 f"{rep['train_step']:.3e}"))
    e = rep["executed_breakdown"]
    rows.append(("executed, side figure (not the budget)", fmt_count(rep["executed"]),
                 f"{rep['executed']:.3e}"))
    for key in ("forward", "backward.input_grads", "backward.weight_grads",
                "backward.elementwise"):
        rows.append(("  " + key, fmt_count(e[key]), f"{e[key]:.3e}"))
    if "generation" in rep:
        g = rep["generation"]
        rows.append((f"generation: prefill {g['prompt_len']} + {g['decode_steps']} decode steps"
                     + (f", LM head {g['head_rows']} rows" if g["head_rows"] else ""),
                     fmt_count(g["total"]), f"{g['total']:.3e}"))
        rows.append(("  prefill", fmt_count(g["prefill"]), f"{g['prefill']:.3e}"))
        rows.append(("  decode (KV cache)", fmt_count(g["decode"]), f"{g['decode']:.3e}"))
    print()
    print(text_table(rows, ("totals for the batch", "FLOPS", "")))


def build_parser() -> ArgumentParser:
    """The argument parser of ``python -m qwenlite.flops``."""
    parser = ArgumentParser(prog="python -m qwenlite.flops",
                            description="FLOPS of a forward pass, training step or generation, "
                            "by the coursework's rules (see docs/flops.md).")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default="qwen2.5-0.5b", choices=sorted(PRESETS),
                        help="named architecture (default qwen2.5-0.5b)")
    source.add_argument("--weights", type=existing_dir, metavar="DIR", default=None,
                        help="read the architecture from DIR/config.json (no weights loaded)")
    parser.add_argument("--seq-len", type=positive_int, default=512,
                        help="tokens per sequence (the prompt length with --generate)")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--train", action="store_true",
                        help="break down the training forward (loss included)")
    parser.add_argument("--lora-rank", type=positive_int, default=None,
                        help="add LoRA of this rank (base weights frozen)")
    parser.add_argument("--lora-targets", type=name_list(PROJECTIONS),
                        default=",".join(DEFAULT_TARGETS),
                        help="comma-separated projections to adapt (default q_proj,v_proj)")
    parser.add_argument("--generate", type=positive_int, default=None, metavar="N",
                        help="also count generating N new tokens after a seq-len prompt")
    parser.add_argument("--head-rows", type=positive_int, default=None, metavar="K",
                        help="with --generate: next token restricted to K ids, so the LM "
                        "head computes K rows (default: the whole vocabulary)")
    parser.add_argument("--gqa-as-mha", action="store_true",
                        help="count K/V projections full-width (other GQA reading)")
    parser.add_argument("--breakdown", action="store_true",
                        help="print the per-component table")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


@main_guard
def main(argv: list[str] | None = None) -> int:
    """``python -m qwenlite.flops``: print the FLOPS tables (or JSON)."""
    args = build_parser().parse_args(argv)
    if args.head_rows is not None and args.generate is None:
        raise QwenliteError("--head-rows applies to --generate only")
    config, name = _config_from(args)
    rep, fwd = report(config, seq_len=args.seq_len, batch=args.batch, train=args.train,
                      lora_rank=args.lora_rank, lora_targets=args.lora_targets,
                      generate=args.generate, head_rows=args.head_rows,
                      gqa_as_mha=args.gqa_as_mha, name=name)
    try:
        if args.json:
            print(json.dumps(rep, indent=2))
        else:
            _print_report(rep, fwd, args.breakdown)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
