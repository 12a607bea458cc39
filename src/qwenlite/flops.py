"""FLOPS of a forward pass, a training step and a generation, by the coursework's rules.

The counts come from the ``flops()`` methods beside every module's ``forward()``
(:mod:`qwenlite.model`, :mod:`qwenlite.lora`), so they follow the model's real shapes; this module
adds up a batch, applies the training rule and renders tables. ``docs/flops.md`` explains the
accounting operation by operation.

Rules (coursework section 1 and question 2c): an (m×n)(n×p) matmul costs m·p·(2n−1);
add/sub/neg/mul/div/inverse 1; exp/log and sin/cos/sqrt 10; tokenization and the computation of
the rotary cos/sin tables are free, applying the rotation is counted; GQA's attention is counted
as standard multi-head attention; a training step costs **3 × forward** (backward = 2 × forward).
That rule is the budget figure. :func:`train_step_flops` also gives, clearly apart, the FLOPS an
implementation with frozen base weights actually executes (the *executed* side figure).

Command line::

    python -m qwenlite.flops --breakdown [--preset qwen2.5-0.5b | --weights DIR] [--seq-len 512]
        [--batch 1] [--train] [--lora-rank R] [--generate N [--head-rows K]] [--gqa-as-mha]
        [--json]
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from qwenlite.cli import (ArgumentParser, existing_dir, main_guard, name_list, positive_int,
                          weights_dir_from)
from qwenlite.errors import QwenliteError
from qwenlite.generate import generation_flops as _generation_flops
from qwenlite.loss import loss_flops
from qwenlite.lora import DEFAULT_TARGETS, PROJECTIONS, LoRALinear, add_logit_bias, apply_lora
from qwenlite.model.config import PRESETS, QwenConfig
from qwenlite.model.counting import FlopCount, matmul_flops
from qwenlite.model.decoder import QwenForCausalLM

#: Leaf names of the breakdown parts that are matrix products (the rest are elementwise).
MATMUL_PARTS = ("matmul", "lora_A", "lora_B", "scores", "values")
#: The coursework's training rule: forward + backward (= 2 × forward).
TRAIN_FACTOR = 3

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_LORA_PARTS = ("lora_A", "lora_scale", "lora_B", "lora_add")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise QwenliteError(f"{name} must be a positive integer, got {value!r}")


def counting_model(config: QwenConfig, lora_rank: int | None = None,
                   lora_targets: Iterable[str] = DEFAULT_TARGETS,
                   logit_bias: bool = False) -> QwenForCausalLM:
    """A model on the meta device (shapes only, no memory) for counting FLOPS.

    Args:
        config: the architecture.
        lora_rank: if given, wrap ``lora_targets`` with LoRA of this rank (base weights frozen,
            as in training).
        lora_targets: projection names to adapt.
        logit_bias: give the LM head the trainable logit bias (:func:`qwenlite.lora.add_logit_bias`).
    Returns:
        A :class:`QwenForCausalLM` whose ``flops()`` and the functions here can be called.
    """
    with torch.device("meta"):
        model = QwenForCausalLM(config)
        if lora_rank is not None:
            apply_lora(model, lora_rank, targets=lora_targets)
        if logit_bias:
            if lora_rank is None:
                model.requires_grad_(False)  # the bias alone trains
            add_logit_bias(model)
    return model


def forward_flops(model: QwenForCausalLM, seq_len: int, batch: int = 1, *, n_cached: int = 0,
                  logits: int | None = None, loss: bool = False,
                  gqa_as_mha: bool = False) -> FlopCount:
    """FLOPS of one forward call over a batch of equal-length sequences.

    Args:
        model: the model (any device, meta included; only shapes are read).
        seq_len: new tokens per sequence computed in this call.
        batch: sequences in the batch.
        n_cached: tokens per sequence already in the KV cache that the new ones attend to.
        logits: positions per sequence that go through the LM head (default: all ``seq_len``).
        loss: add the cross-entropy loss over those positions (training).
        gqa_as_mha: also count K/V projections full-width (the other reading of GQA).
    Returns:
        The itemized count (``part -> FLOPS``) for the whole batch; ``.total()`` sums it.
    """
    _check_positive(seq_len=seq_len, batch=batch)
    if n_cached < 0:
        raise QwenliteError(f"n_cached must be >= 0, got {n_cached}")
    count = model.flops(seq_len, n_cached, logits=logits, gqa_as_mha=gqa_as_mha)
    if loss:
        count["loss"] = loss_flops(seq_len if logits is None else logits, model.config.vocab_size)
    return count.scaled(batch)


def generation_flops(model: QwenForCausalLM, prompt_len: int, decode_steps: int,
                     batch: int = 1, *, head_rows: int | None = None,
                     gqa_as_mha: bool = False) -> FlopCount:
    """FLOPS of a KV-cached generation, as :func:`qwenlite.generate.generate` runs it.

    :func:`qwenlite.generate.generation_flops`, plus the other GQA reading: a prefill of
    ``prompt_len`` tokens (LM head on the last position only), then ``decode_steps``
    single-token steps, step ``i`` attending to ``prompt_len + i`` cached tokens.
    ``generate`` with ``max_new_tokens=N`` runs ``N − 1`` decode steps when no sequence stops
    early (the prefill yields the first new token). Parts are prefixed ``prefill.`` and
    ``decode.``.

    Args:
        model: the model.
        prompt_len: padded prompt length.
        decode_steps: decode steps after the prefill (>= 0).
        batch: sequences generated together.
        head_rows: LM-head rows computed per position when the next token is restricted to a
            few ids (default: the whole vocabulary).
        gqa_as_mha: count K/V projections full-width.
    """
    _check_positive(prompt_len=prompt_len, batch=batch)
    if decode_steps < 0:
        raise QwenliteError(f"decode_steps must be >= 0, got {decode_steps}")
    count = _generation_flops(model, prompt_len, decode_steps, batch, head_rows)
    if gqa_as_mha:
        # The reading changes only the K/V projections and key rotation, which are per token
        # and independent of the cache: add its difference for the prompt and for each step.
        def extra(n: int) -> FlopCount:
            mha, real = model.flops(n, gqa_as_mha=True), model.flops(n)
            return FlopCount({k: v - real.get(k, 0) for k, v in mha.items()
                              if v != real.get(k, 0)})

        count += extra(prompt_len).prefixed("prefill").scaled(batch)
        if decode_steps:
            count += extra(1).prefixed("decode").scaled(batch * decode_steps)
    return count


# --------------------------------------------------------------------------------------------
# The executed side figure: what a frozen-base implementation's backward actually computes.


@dataclass(frozen=True)
class MatMul:
    """``count`` independent (m×k)(k×p) products ``C = A·B`` of a forward pass.

    Attributes:
        grad_a, grad_b: whether backpropagation needs the gradient of A (dC·Bᵀ, (m×p)(p×k)) and
            of B (Aᵀ·dC, (k×m)(m×p)). For ``x·Wᵀ`` A is the activation and B the weight.
        weight: B is a parameter (a linear layer), not an activation (attention's K and V).
    """

    count: int
    m: int
    k: int
    p: int
    grad_a: bool
    grad_b: bool
    weight: bool = True

    def forward(self) -> int:
        return self.count * matmul_flops(self.m, self.k, self.p)

    def grad_a_flops(self) -> int:
        return self.count * matmul_flops(self.m, self.p, self.k) if self.grad_a else 0

    def grad_b_flops(self) -> int:
        return self.count * matmul_flops(self.k, self.m, self.p) if self.grad_b else 0


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def training_graph(model: QwenForCausalLM, seq_len: int,
                   batch: int = 1) -> tuple[dict[str, MatMul], dict[str, bool]]:
    """The matmuls of a training forward and which parts backpropagation goes through.

    Follows ``requires_grad`` through the network as autograd does: a tensor needs a gradient
    when it depends on a trainable parameter. So frozen weights get no weight gradient, input
    gradients flow through every layer after the first trainable one, and the first layer's
    frozen projections (whose input, the embedding, is frozen) get no input gradient either.

    Args:
        model: the model; trainability is read from its parameters' ``requires_grad``.
        seq_len: tokens per sequence (all through the LM head).
        batch: sequences; linear layers see ``batch·seq_len`` rows, attention ``batch·h`` heads.
    Returns:
        ``(matmuls, needs_grad)``: matmuls keyed by the breakdown's names (real shapes, GQA
        K/V projections narrow), and for each elementwise part's prefix whether its output needs
        a gradient.
    """
    n, rows = seq_len, batch * seq_len
    mats: dict[str, MatMul] = {}
    grads: dict[str, bool] = {}

    def linear(name: str, module: nn.Module, x_rg: bool) -> bool:
        base = module.base if isinstance(module, LoRALinear) else module
        mats[f"{name}.matmul"] = MatMul(1, rows, base.in_features, base.out_features, x_rg,
                                        base.weight.requires_grad)
        out_rg = x_rg or _trainable(base)
        if isinstance(module, LoRALinear) and not module.merged:
            a_rg, b_rg = module.lora_A.weight.requires_grad, module.lora_B.weight.requires_grad
            mats[f"{name}.lora_A"] = MatMul(1, rows, module.in_features, module.r, x_rg, a_rg)
            mats[f"{name}.lora_B"] = MatMul(1, rows, module.r, module.out_features,
                                            x_rg or a_rg, b_rg)
            out_rg = out_rg or a_rg or b_rg
        grads[name] = out_rg
        return out_rg

    x_rg = model.model.embed_tokens.weight.requires_grad
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        h_rg = grads[f"{p}.input_layernorm"] = x_rg or _trainable(layer.input_layernorm)
        q_rg = linear(f"{p}.self_attn.q_proj", attn.q_proj, h_rg)
        k_rg = linear(f"{p}.self_attn.k_proj", attn.k_proj, h_rg)
        v_rg = linear(f"{p}.self_attn.v_proj", attn.v_proj, h_rg)
        grads[f"{p}.self_attn.rope"] = q_rg or k_rg
        heads, hd = batch * attn.n_heads, attn.head_dim
        mats[f"{p}.self_attn.scores"] = MatMul(heads, n, hd, n, q_rg, k_rg, False)
        s_rg = q_rg or k_rg
        for part in ("scale", "mask", "softmax"):
            grads[f"{p}.self_attn.{part}"] = s_rg
        mats[f"{p}.self_attn.values"] = MatMul(heads, n, n, hd, s_rg, v_rg, False)
        o_rg = linear(f"{p}.self_attn.o_proj", attn.o_proj, s_rg or v_rg)
        x_rg = x_rg or o_rg
        h2_rg = grads[f"{p}.post_attention_layernorm"] = (
            x_rg or _trainable(layer.post_attention_layernorm))
        g_rg = linear(f"{p}.mlp.gate_proj", mlp.gate_proj, h2_rg)
        u_rg = linear(f"{p}.mlp.up_proj", mlp.up_proj, h2_rg)
        grads[f"{p}.mlp.silu"] = g_rg
        grads[f"{p}.mlp.gating"] = g_rg or u_rg
        d_rg = linear(f"{p}.mlp.down_proj", mlp.down_proj, g_rg or u_rg)
        x_rg = grads[f"{p}.residual"] = x_rg or d_rg
    hf_rg = grads["model.norm"] = x_rg or _trainable(model.model.norm)
    grads["loss"] = linear("lm_head", model.lm_head, hf_rg)
    return mats, grads


def _needs_grad(key: str, grads: dict[str, bool]) -> bool:
    name = key
    while name:
        if name in grads:
            return grads[name]
        name = name.rpartition(".")[0]
    return True  # a part this walk does not know: count it (overestimate, never under)


@dataclass(frozen=True)
class TrainStepFlops:
    """FLOPS of one optimizer step on a batch (no gradient accumulation).

    Attributes:
        forward: the training forward (all positions through the LM head, plus the loss).
        rule: ``3 × forward`` — the coursework's rule and **the figure charged to the budget**.
        executed: side figure, not the budget: the forward plus the backward that a frozen-base
            implementation executes — matmul gradients counted exactly (input gradients where
            autograd needs them, weight gradients for trainable matrices only, e.g. LoRA A/B),
            elementwise backward taken as equal to its forward; real GQA shapes always.
        breakdown: ``forward`` itemized (``part -> FLOPS``, the batch included).
        executed_breakdown: ``executed`` split into ``forward``, ``backward.input_grads``,
            ``backward.weight_grads`` and ``backward.elementwise``.
    """

    forward: int
    rule: int
    executed: int
    breakdown: FlopCount = field(repr=False)
    executed_breakdown: FlopCount = field(repr=False)

    @property
    def train_step(self) -> int:
        """Alias of :attr:`rule`, the budget figure."""
        return self.rule

    def as_dict(self) -> dict[str, int]:
        return {"forward": self.forward, "train_step": self.rule, "executed": self.executed}


def executed_flops(model: QwenForCausalLM, seq_len: int, batch: int = 1) -> FlopCount:
    """The executed side figure of a training step (see :class:`TrainStepFlops`), itemized.

    Returns:
        ``forward``, ``backward.input_grads``, ``backward.weight_grads``,
        ``backward.elementwise``.
    """
    _check_positive(seq_len=seq_len, batch=batch)
    fwd = forward_flops(model, seq_len, batch, loss=True)
    mats, grads = training_graph(model, seq_len, batch)
    elementwise = sum(v for k, v in fwd.items()
                      if k not in mats and _needs_grad(k, grads))
    if not any(p.requires_grad for p in model.parameters()):
        elementwise = 0  # nothing to train, no backward
    return FlopCount({
        "forward": fwd.total(),
        "backward.input_grads": sum(m.grad_a_flops() + (0 if m.weight else m.grad_b_flops())
                                    for m in mats.values()),
        "backward.weight_grads": sum(m.grad_b_flops() for m in mats.values() if m.weight),
        "backward.elementwise": elementwise,
    })


def train_step_flops(model: QwenForCausalLM, seq_len: int, batch: int = 1, *,
                     gqa_as_mha: bool = False) -> TrainStepFlops:
    """FLOPS of one training step on ``batch`` sequences of ``seq_len`` tokens.

    LoRA is whatever the model carries (see :func:`counting_model`); the forward includes the
    LoRA terms, the LM head on every position and the cross-entropy loss.

    Args:
        model: the model to train.
        seq_len: tokens per sequence.
        batch: sequences per step.
        gqa_as_mha: count K/V projections full-width in ``forward``/``rule`` (``executed``
            always uses the real shapes).
    Returns:
        A :class:`TrainStepFlops`; charge ``.rule`` to the budget.
    """
    breakdown = forward_flops(model, seq_len, batch, loss=True, gqa_as_mha=gqa_as_mha)
    forward = breakdown.total()
    executed = executed_flops(model, seq_len, batch)
    return TrainStepFlops(forward, TRAIN_FACTOR * forward, executed.total(), breakdown, executed)


# --------------------------------------------------------------------------------------------
# Tables.


def _strip_phase(key: str) -> str:
    for phase in ("prefill.", "decode."):
        if key.startswith(phase):
            return key[len(phase):]
    return key


def component(key: str) -> tuple[str, int | None]:
    """Map a breakdown key to ``(component, layer index or None)``.

    ``model.layers.3.self_attn.q_proj.matmul`` -> ``("self_attn.q_proj", 3)``; a projection's
    LoRA parts go to ``<projection>.lora``, a norm's parts to the norm; ``model.norm.*`` ->
    ``final_norm``; ``lm_head.matmul`` -> ``lm_head``. A ``prefill.``/``decode.`` prefix is
    dropped.
    """
    key = _strip_phase(key)
    match = _LAYER_KEY.match(key)
    rest = match.group(2) if match else key
    path, _, leaf = rest.rpartition(".")
    if path == "model.norm":
        name = "final_norm"
    elif leaf in ("matmul", "bias"):
        name = path
    elif leaf in _LORA_PARTS:
        name = f"{path}.lora"
    elif path.endswith("layernorm"):
        name = path
    else:
        name = rest
    return name, int(match.group(1)) if match else None


def summarize(count: FlopCount) -> tuple[dict[str, int], dict[str, int], int]:
    """Group an itemized count by component.

    Returns:
        ``(components, per_layer, n_layers)``: every component's total (decoder-layer
        components summed over layers, in first-seen order), the first layer's share of each
        per-layer component (all layers cost the same in a forward), and the number of layers.
    """
    components: dict[str, int] = {}
    per_layer: dict[str, int] = {}
    layers = set()
    for key, value in count.items():
        name, layer = component(key)
        components[name] = components.get(name, 0) + int(value)
        if layer is not None:
            layers.add(layer)
            if layer == 0:
                per_layer[name] = per_layer.get(name, 0) + int(value)
    return components, per_layer, len(layers)


def _fmt(n: int) -> str:
    return f"{n:,}"


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def breakdown_table(count: FlopCount) -> str:
    """A readable per-component table: one layer, all layers, share of the total."""
    components, per_layer, n_layers = summarize(count)
    total = count.total() or 1
    rows = []
    for name, value in components.items():
        one = _fmt(per_layer[name]) if name in per_layer else ""
        rows.append((name, one, _fmt(value), f"{100 * value / total:.2f}%"))
    layer_sum = sum(per_layer.values())
    rows.append((f"one decoder layer (× {n_layers})", _fmt(layer_sum),
                 _fmt(sum(components[k] for k in per_layer)),
                 f"{100 * sum(components[k] for k in per_layer) / total:.2f}%"))
    rows.append(("total", "", _fmt(count.total()), "100.00%"))
    return _table(rows, ("component", "per layer", "all layers", "share"))


# --------------------------------------------------------------------------------------------
# Command line.


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
    rows = [("forward (" + rep["mode"] + ")", _fmt(rep["forward"]), f"{rep['forward']:.3e}")]
    rows.append(("train step = 3 × training forward (budget)", _fmt(rep["train_step"]),
                 f"{rep['train_step']:.3e}"))
    e = rep["executed_breakdown"]
    rows.append(("executed, side figure (not the budget)", _fmt(rep["executed"]),
                 f"{rep['executed']:.3e}"))
    for key in ("forward", "backward.input_grads", "backward.weight_grads",
                "backward.elementwise"):
        rows.append(("  " + key, _fmt(e[key]), f"{e[key]:.3e}"))
    if "generation" in rep:
        g = rep["generation"]
        rows.append((f"generation: prefill {g['prompt_len']} + {g['decode_steps']} decode steps"
                     + (f", LM head {g['head_rows']} rows" if g["head_rows"] else ""),
                     _fmt(g["total"]), f"{g['total']:.3e}"))
        rows.append(("  prefill", _fmt(g["prefill"]), f"{g['prefill']:.3e}"))
        rows.append(("  decode (KV cache)", _fmt(g["decode"]), f"{g['decode']:.3e}"))
    print()
    print(_table(rows, ("totals for the batch", "FLOPS", "")))


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


if __name__ == "__main__":
    raise SystemExit(main())
