"""qwenlite: a small, exact, pure-PyTorch Qwen2.5 for LoRA time-series forecasting.

Public API::

    import qwenlite
    model = qwenlite.load_model("weights/Qwen2.5-0.5B-Instruct", dtype="bf16", device="auto")
    tok = qwenlite.load_tokenizer("weights/Qwen2.5-0.5B-Instruct")
    logits = model(torch.tensor([tok.encode("1.23,0.45;")]))   # (batch, seq, vocab)
"""

from __future__ import annotations

from pathlib import Path

import torch

__version__ = "0.1.0"

__all__ = ["load_model", "load_tokenizer", "__version__"]


def load_model(weights: str | Path | None = None, dtype: str | torch.dtype = "fp32",
               device: str | torch.device = "auto", accelerate: bool = True):
    """Load a Qwen2.5 checkpoint as a :class:`qwenlite.model.QwenForCausalLM` (eval mode).

    Args:
        weights: checkpoint directory; None resolves ``$QWENLITE_WEIGHTS``, else
            ``weights/Qwen2.5-0.5B-Instruct`` (downloaded from the hub on first use).
        dtype: ``"fp32"``/``"bf16"`` or a torch dtype.
        device: ``"auto"`` (cuda, then mps, then cpu) or a torch device.
        accelerate: on a CPU, swap in :mod:`qwenlite.accel`'s modules (same values, faster);
            False gives the plain reference model of :mod:`qwenlite.model`.
    Returns:
        A model whose call ``model(input_ids, attention_mask=None)`` returns logits
        (batch, seq, vocab).
    """
    from qwenlite import accel
    from qwenlite.cli import resolve_device, resolve_dtype, resolve_weights, warn_if_slow_bf16
    from qwenlite.model.loading import load_model as _load

    device = resolve_device(device) if isinstance(device, str) else device
    warn_if_slow_bf16(resolve_dtype(dtype), device)
    model = _load(resolve_weights(weights), dtype=dtype, device=device)
    return accel.for_device(model) if accelerate else model


def load_tokenizer(weights: str | Path | None = None):
    """The Qwen2.5 tokenizer of a checkpoint directory (or a ``tokenizer.json`` path).

    Returns:
        A :class:`qwenlite.data.tokenizer.Tokenizer` with ``encode(text) -> list[int]`` and
        ``decode(ids) -> str``.
    """
    from qwenlite.cli import resolve_weights
    from qwenlite.data.tokenizer import Tokenizer

    if weights is not None and Path(weights).is_file():
        return Tokenizer(weights)
    return Tokenizer(resolve_weights(weights))
