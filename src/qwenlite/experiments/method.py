"""The numbers of the report's method sections, which depend on the data, the tokenizer and the
architecture but on no experiment: the LLMTIME worked examples, one forward's FLOPS by
component, the trainable parameters per LoRA rank and the training windows per context
(:mod:`qwenlite.experiments.report` writes the experiments' own)."""

from __future__ import annotations

import numpy as np

from qwenlite.experiments.latex import Numbers, pct, sci, tabular, tex_escape, thousands


def llmtime_examples(n: Numbers, trajectories: np.ndarray, train_idx, settings, tokenizer,
                     steps: int = 3, count: int = 2) -> str:
    """The coursework's two worked examples: raw values, LLMTIME text, token ids."""
    from qwenlite.data.llmtime import encode

    n["llmtime.alpha"] = f"{settings.alpha:.4f}"
    n["llmtime.decimals"] = settings.decimals
    n["llmtime.steps"] = steps
    blocks = []
    for i, system in enumerate(train_idx[:count]):
        series = trajectories[system, :steps]
        text = encode(series, settings)
        ids = tokenizer.encode(text)
        n[f"llmtime.ex{'ab'[i]}.system"] = int(system)
        n[f"llmtime.ex{'ab'[i]}.ntokens"] = len(ids)
        raw = "; ".join(f"({a:.4f}, {b:.4f})" for a, b in series.tolist())
        blocks.append(rf"\textbf{{system {int(system)}}} & raw (prey, predator) & "
                      rf"\texttt{{{raw}}} \\" "\n"
                      rf" & LLMTIME text & \texttt{{{tex_escape(text)}}} \\" "\n"
                      rf" & token ids & \texttt{{{' '.join(map(str, ids))}}} \\")
    return ("\\begin{tabular}{llp{0.62\\linewidth}}\n\\toprule\n"
            + "\n\\midrule\n".join(blocks) + "\n\\bottomrule\n\\end{tabular}\n")


def flops_accounting(n: Numbers, config, context: int, batch: int, rank: int) -> str:
    """One forward's FLOPS by component (a training forward at ``context`` tokens, with LoRA
    rank ``rank``), and the numbers the FLOPS section quotes."""
    from qwenlite.flops import report

    rep, _ = report(config, seq_len=context, batch=1, train=True, lora_rank=rank)
    total = rep["forward"]
    n["flops.context"], n["flops.rank"], n["flops.batch"] = context, rank, batch
    n["flops.forward"] = sci(total)
    n["flops.pertoken"] = sci(total / context)
    n["flops.trainstep"] = sci(report(config, seq_len=context, batch=batch, train=True,
                                      lora_rank=rank)[0]["train_step"])
    n["flops.params"] = sci(config.n_params)
    n["flops.layers"] = config.num_hidden_layers
    rows = []
    groups: dict[str, int] = {}
    for name, value in rep["breakdown"].items():
        group = ("attention" if "self_attn" in name else "MLP" if "mlp" in name else
                 "norms" if "norm" in name else name)
        groups[group] = groups.get(group, 0) + value
        rows.append([tex_escape(name), sci(rep["per_layer"].get(name, 0)) if name in
                     rep["per_layer"] else "", sci(value), pct(value / total, 1)])
    for group, value in groups.items():
        n[f"flops.share.{group.replace('_', '').replace(' ', '')}"] = pct(value / total, 1)
    rows.append([r"\textbf{forward}", "", sci(total), pct(1.0, 0)])
    return tabular("lrrr", ["component", "per layer", "all layers", "share"], rows,
                   (len(rows) - 2,))


def training_numbers(n: Numbers, config, trajectories: np.ndarray, train_idx, settings,
                     tokenizer, contexts, ranks) -> None:
    """Trainable parameters per LoRA rank, and the training windows per context (cut as the
    trainer cuts them; n/a for a context longer than every series)."""
    from qwenlite.data import make_training_windows
    from qwenlite.data.llmtime import encode
    from qwenlite.flops import counting_model
    from qwenlite.training.trainer import window_stride

    n["params.total"] = thousands(config.n_params)
    for r in ranks:
        model = counting_model(config, r)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n[f"params.lora{r}"] = thousands(trainable)
        n[f"params.lora{r}.share"] = pct(trainable / config.n_params, 3)
    n["params.bias"] = thousands(config.vocab_size)
    seqs = tokenizer.encode_batch([encode(trajectories[i], settings) for i in train_idx])
    n["train.systems"] = len(train_idx)
    tokens = sum(map(len, seqs))
    n["train.tokens"] = thousands(tokens)
    n["llmtime.tokensperstep"] = f"{tokens / (len(train_idx) * trajectories.shape[1]):.1f}"
    longest = max(map(len, seqs))
    for c in contexts:
        if c > longest:
            n[f"train.windows{c}"] = r"\textit{n/a}"
            continue
        windows = make_training_windows(seqs, c, window_stride(c)).input_ids.shape[0]
        n[f"train.windows{c}"] = thousands(windows)
