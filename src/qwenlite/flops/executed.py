"""The FLOPS of a training step: the coursework's 3 × forward rule (the budget figure), and apart
from it the *executed* side figure, what a frozen-base implementation's backward computes — read
from autograd itself, by running the step on a meta-device twin of the model."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from qwenlite.errors import QwenliteError
from qwenlite.flops.counts import (
    MATMUL_PARTS,
    TRAIN_FACTOR,
    check_positive,
    counting_model,
    forward_flops,
)
from qwenlite.model.counting import FlopCount, matmul_flops
from qwenlite.model.decoder import QwenForCausalLM
from qwenlite.training.lora import DEFAULT_TARGETS, logit_bias, lora_layers
from qwenlite.training.loss import linear_cross_entropy

_ATEN = torch.ops.aten
#: aten matrix products -> (index of A, index of B) among their arguments.
_PRODUCTS = {_ATEN.mm.default: (0, 1), _ATEN.bmm.default: (0, 1),
             _ATEN.addmm.default: (1, 2), _ATEN.baddbmm.default: (1, 2)}


class MatmulTrace(TorchDispatchMode):
    """Adds up, at the coursework's m·p·(2n−1), the matrix products dispatched while active.

    Only :data:`_PRODUCTS` are expected (eager attention, linear layers, the fused loss); any other
    product-like operation is refused rather than silently left out.
    """

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _PRODUCTS:
            ia, ib = _PRODUCTS[func]
            a, b = args[ia], args[ib]
            batch = a.shape[0] if a.dim() == 3 else 1
            self.flops += batch * matmul_flops(a.shape[-2], a.shape[-1], b.shape[-1])
        elif any(word in func.__name__ for word in ("mm", "mv", "dot", "matmul", "attention")):
            raise QwenliteError(f"the executed-FLOPS trace cannot count {func.__name__}")
        return func(*args, **(kwargs or {}))


def meta_twin(model: QwenForCausalLM) -> QwenForCausalLM:
    """The model's structure on the meta device: same config, LoRA (rank, targets, merged or
    not), logit bias and ``requires_grad`` per parameter; eager attention, so that every product
    is a plain matmul."""
    lora = lora_layers(model)
    ranks = {layer.r for layer in lora.values()}
    if len(ranks) > 1:
        raise QwenliteError(f"cannot trace LoRA layers of different ranks {sorted(ranks)}")
    targets = sorted({name.rpartition(".")[2] for name in lora}) or DEFAULT_TARGETS
    twin = counting_model(model.config, ranks.pop() if ranks else None, targets,
                          logit_bias=logit_bias(model) is not None)
    for name, layer in lora_layers(twin).items():
        if name not in lora:
            raise QwenliteError(f"cannot trace this model: LoRA on some {name.rpartition('.')[2]}"
                                " layers only")
        layer.merged = lora[name].merged
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    names = {name for name, _ in twin.named_parameters()}
    if not trainable <= names:
        raise QwenliteError(f"cannot trace parameter {min(trainable - names)}")
    for name, p in twin.named_parameters():
        p.requires_grad_(name in trainable)
    twin.set_attention_impl("eager")
    return twin


@dataclass(frozen=True)
class TrainingTrace:
    """What autograd computes for one training step, traced on a meta-device twin of the model.

    Attributes:
        backward_matmuls: FLOPS of the matrix products of the backward (the fused loss's
            gradient w.r.t. the hidden states included, though it computes it in the forward).
        weight_grads: the part of them that are gradients of trainable weight matrices.
        needs_grad: module name (and ``loss``) -> whether its output needs a gradient.
    """

    backward_matmuls: int
    weight_grads: int
    needs_grad: dict[str, bool]


def trace_training_step(model: QwenForCausalLM, seq_len: int, batch: int = 1) -> TrainingTrace:
    """Run a training step — forward, loss on every position, backward — on the meta device
    (shapes only: no memory, no arithmetic) and count what autograd dispatches.

    Autograd decides what the backward computes: input gradients where something trainable lies
    upstream, weight gradients for trainable matrices only. Nothing here restates the
    architecture; the modules' forwards are what is traced.
    """
    twin = meta_twin(model)
    needs_grad: dict[str, bool] = {}
    rows: dict[str, int] = {}

    def record(name: str):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):  # the rotary cos/sin pair needs none
                needs_grad[name] = output.requires_grad
            if isinstance(module, nn.Linear):
                rows[name] = inputs[0].numel() // module.in_features
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in twin.named_modules() if name]
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    try:
        with MatmulTrace() as forward:
            h = twin(ids, return_hidden=True).reshape(batch * seq_len, -1)
            loss = linear_cross_entropy(h, twin.lm_head.weight, ids.reshape(-1),
                                        bias=twin.lm_head.bias)
        with MatmulTrace() as backward:
            if loss.requires_grad:
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    # The fused loss applies the head's weight itself: the head's output is the loss's input.
    needs_grad["lm_head"] = needs_grad["loss"] = loss.requires_grad
    rows["lm_head"] = batch * seq_len
    modules = dict(twin.named_modules())
    weight_grads = sum(matmul_flops(modules[name].in_features, n, modules[name].out_features)
                       for name, n in rows.items() if modules[name].weight.requires_grad)
    counted = forward_flops(twin, seq_len, batch, loss=True).matching(MATMUL_PARTS).total()
    return TrainingTrace(forward.flops - counted + backward.flops, weight_grads, needs_grad)


def _needs_grad(key: str, grads: dict[str, bool]) -> bool:
    name = key
    while name:
        if name in grads:
            return grads[name]
        name = name.rpartition(".")[0]
    return True  # a part no traced module owns: count it (overestimate, never under)


@dataclass(frozen=True)
class TrainStepFlops:
    """FLOPS of one optimizer step on a batch (no gradient accumulation).

    Attributes:
        forward: the training forward (all positions through the LM head, plus the loss).
        rule: ``3 × forward`` — the coursework's rule and **the figure charged to the budget**.
        executed: side figure, not the budget: the forward plus the backward that a frozen-base
            implementation executes — its matmuls as autograd dispatches them (input gradients
            where needed, weight gradients for trainable matrices only, e.g. LoRA A/B), the
            elementwise backward of every module whose output needs a gradient taken as equal to
            its forward; real GQA shapes always. Traced on first use (about a second).
        breakdown: ``forward`` itemized (``part -> FLOPS``, the batch included).
        executed_breakdown: ``executed`` split into ``forward``, ``backward.input_grads``,
            ``backward.weight_grads`` and ``backward.elementwise``.
    """

    forward: int
    rule: int
    breakdown: FlopCount = field(repr=False)
    trace: Callable[[], FlopCount] = field(repr=False, compare=False)

    @functools.cached_property
    def executed_breakdown(self) -> FlopCount:
        return self.trace()

    @property
    def executed(self) -> int:
        return self.executed_breakdown.total()

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
    trace = trace_training_step(model, seq_len, batch)
    elementwise = sum(v for k, v in fwd.items() if k.rpartition(".")[2] not in MATMUL_PARTS
                      and _needs_grad(k, trace.needs_grad))
    return FlopCount({
        "forward": fwd.total(),
        "backward.input_grads": trace.backward_matmuls - trace.weight_grads,
        "backward.weight_grads": trace.weight_grads,
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
    return TrainStepFlops(forward, TRAIN_FACTOR * forward, breakdown,
                          functools.partial(executed_flops, model, seq_len, batch))
