"""The FLOPS of a training step: the coursework's 3 × forward rule (the budget figure), and apart
from it the *executed* side figure, what a frozen-base implementation's backward computes."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from qwenlite.flops.counts import TRAIN_FACTOR, check_positive, forward_flops
from qwenlite.model.counting import FlopCount, matmul_flops
from qwenlite.model.decoder import QwenForCausalLM
from qwenlite.training.lora import LoRALinear


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
    check_positive(seq_len=seq_len, batch=batch)
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
