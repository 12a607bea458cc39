"""FLOPS of a forward pass and of a generation, from the modules' own ``flops()`` (see
:mod:`qwenlite.flops`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from qwenlite.errors import QwenliteError
from qwenlite.evaluation.generation import run_flops
from qwenlite.model.config import QwenConfig
from qwenlite.model.counting import FlopCount
from qwenlite.model.decoder import QwenForCausalLM
from qwenlite.training.lora import DEFAULT_TARGETS, add_logit_bias, apply_lora
from qwenlite.training.loss import loss_flops

#: Leaf names of the breakdown parts that are matrix products (the rest are elementwise).
MATMUL_PARTS = ("matmul", "lora_A", "lora_B", "scores", "values")
#: The coursework's training rule: forward + backward (= 2 × forward).
TRAIN_FACTOR = 3



def check_positive(**values: int) -> None:
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
        logit_bias: give the LM head the trainable logit bias (:func:`qwenlite.training.lora.add_logit_bias`).
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
    check_positive(seq_len=seq_len, batch=batch)
    if n_cached < 0:
        raise QwenliteError(f"n_cached must be >= 0, got {n_cached}")
    count = model.flops(seq_len, n_cached, logits=logits, gqa_as_mha=gqa_as_mha)
    if loss:
        count["loss"] = loss_flops(seq_len if logits is None else logits, model.config.vocab_size)
    return count.scaled(batch)


def generation_flops(model: QwenForCausalLM, prompt_len: int, decode_steps: int,
                     batch: int = 1, *, head_rows: int | None = None,
                     gqa_as_mha: bool = False) -> FlopCount:
    """FLOPS of a KV-cached generation, as :func:`qwenlite.evaluation.generation.generate` runs it.

    :func:`qwenlite.evaluation.generation.run_flops`, plus the other GQA reading: a prefill of
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
    check_positive(prompt_len=prompt_len, batch=batch)
    if decode_steps < 0:
        raise QwenliteError(f"decode_steps must be >= 0, got {decode_steps}")
    count = run_flops(model, prompt_len, decode_steps, batch, head_rows)
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
