"""Frozen weights kept in bf16 for the matmuls of an fp32 model under CPU bf16 autocast.

Training in bf16 runs the fp32 model under ``torch.autocast("cpu", dtype=torch.bfloat16)``, and
autocast casts each weight to bf16 at each use: it keeps a cast only for leaf tensors that
require grad, so a frozen base model's 494M parameters are converted again at every forward,
and the LM head's 136M at each chunk of the fused loss, forward and gradient
(:mod:`qwenlite.training.loss`). On a 2-core Xeon with AMX those conversions took 2.75 s of an
8.9 s LoRA step at 4×512 — more than a third of the time of its matmuls
(``python benchmarks/profile_train.py --dtype bf16``).

:func:`bf16_copy` gives a frozen fp32 parameter's bf16 copy, made once and kept until the
parameter changes (a LoRA merge, ``model.to``: :func:`~qwenlite.accel.emulation.kept`), so a
matmul under autocast reads the very values autocast's cast would have made: the same results,
bit for bit, for 2 bytes per parameter while training. :func:`clear` frees the copies.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from qwenlite.accel.emulation import kept

_copies = WeakTensorKeyDictionary()


def casting(t: torch.Tensor | None) -> bool:
    """Whether CPU bf16 autocast is on and would cast ``t``, a frozen fp32 parameter on the CPU,
    at each use."""
    return (isinstance(t, nn.Parameter) and not t.requires_grad and t.dtype == torch.float32
            and t.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def bf16_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as autocast would cast it — its kept bf16 copy — where :func:`casting`, else ``t``."""
    if not casting(t):
        return t
    return kept(_copies, t, lambda w: w.to(torch.bfloat16))


def is_kept(t: torch.Tensor) -> bool:
    """Whether a bf16 copy of ``t`` is kept."""
    return t in _copies


def clear() -> None:
    """Free every kept copy (they are made again at the next use under autocast)."""
    _copies.clear()
