"""Decode-step weights kept in oneDNN's blocked layout, which streams fastest of torch's ways.

A decode step multiplies a few rows by every weight; how fast BLAS streams a weight depends on its
layout. Where the C++ decode kernel (:mod:`qwenlite.accel.skinny`) does not serve — not built, or a
CPU that runs bf16 natively — a frozen parameter keeps a copy of its values (bf16-rounded, in
fp32, when emulating) reordered once into oneDNN's layout: 4 more bytes per parameter while
generating (2 on a CPU that runs bf16 natively, where the copy stays bf16). Projections that share
an input keep one such copy of their weights stacked (:func:`stacked_weight`) and run as one
matmul. ``QWENLITE_PACK_WEIGHTS=0`` keeps none (:mod:`qwenlite.accel.settings`);
:func:`clear_packed_weights` frees them all, :func:`is_packed` and :func:`is_stacked` say what is
kept.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from qwenlite.accel import settings
from qwenlite.accel.emulation import kept

_packed = WeakTensorKeyDictionary()
_stacked = WeakTensorKeyDictionary()


def pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` (out, in) reordered into oneDNN's blocked layout for ``rows`` input rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def packed_linear(x: torch.Tensor, packed: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """``x·Wᵀ + b`` through a weight made by :func:`pack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def onednn_linear(dtype: torch.dtype = torch.float32) -> bool:
    """Whether torch has oneDNN's prepacked linear here for ``dtype`` and it computes
    ``F.linear``, with and without a bias, for the hinted number of rows and others (bf16 needs
    a CPU that oneDNN runs bf16 on — AVX512BW/VL/DQ, AVX512-BF16, AMX or AVX-NE-CONVERT; it
    raises on others). Checked outside any dispatch mode (a FLOPS counter must not see the
    check) and without the RNG."""
    try:
        from torch.utils._python_dispatch import _disable_current_modes
    except ImportError:  # pragma: no cover - older torch
        _disable_current_modes = contextlib.nullcontext
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    try:
        with _disable_current_modes(), torch.inference_mode(False), torch.no_grad():
            w = torch.arange(24 * 16, dtype=torch.float32).reshape(24, 16).sin().to(dtype)
            b = torch.arange(24, dtype=torch.float32).cos().to(dtype)
            packed = pack(w, 8)
            for rows, bias in ((8, None), (3, b), (1, b)):  # the hinted rows and others
                x = torch.arange(rows * 16, dtype=torch.float32).reshape(rows, 16).cos().to(dtype)
                out = packed_linear(x, packed, bias)
                expected = F.linear(x.float(), w.float(), None if bias is None else bias.float())
                if out.dtype != dtype or not torch.allclose(out.float(), expected, **tol):
                    return False
            return True
    except (AttributeError, RuntimeError):
        return False


def packing_enabled(dtype: torch.dtype = torch.float32) -> bool:
    """Whether decode steps use weights prepacked in ``dtype``: ``$QWENLITE_PACK_WEIGHTS`` is not
    ``0`` and torch has oneDNN's linear for it here."""
    return settings.current().pack_weights and onednn_linear(dtype)


def clear_packed_weights() -> None:
    """Free every prepacked decode weight (they are made again on the next decode step)."""
    _packed.clear()
    _stacked.clear()


def packed_weight(weight: nn.Parameter, rows: int, bf16: bool) -> torch.Tensor:
    """``weight`` (rounded to bf16 and held in fp32 if ``bf16``, i.e. emulating; else in its own
    dtype) reordered once into oneDNN's blocked layout; refreshed when the parameter changes in
    place (e.g. by a LoRA merge)."""
    def make(w):
        w = w.to(torch.bfloat16).float() if bf16 else w
        return pack(w.contiguous(), rows)
    return kept(_packed, weight, make, tag=bf16)


def prepackable(weight: torch.Tensor, emulate: bool) -> bool:
    """Whether a decode step keeps ``weight`` prepacked: a frozen parameter, and packing on for
    the dtype the copy holds (fp32 when emulating)."""
    dtype = torch.float32 if emulate else weight.dtype
    return (isinstance(weight, nn.Parameter) and not weight.requires_grad
            and packing_enabled(dtype))



def stacked_weight(weights: Sequence[nn.Parameter], biases: Sequence[torch.Tensor | None],
                    rows: int, bf16: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weights`` stacked along their outputs (rounded to bf16 and held in fp32 if ``bf16``,
    i.e. emulating) and prepacked like :func:`packed_weight`, with their biases stacked the
    same way (a missing bias stands as zeros; None if all are missing). Kept under the first
    weight and made anew when any of the tensors changes in place; making it frees the layers'
    own prepacked copies (a decode step that once ran them one by one — under a FLOPS counter,
    say — would otherwise keep both)."""
    rest = [*weights[1:], *(b for b in biases if b is not None)]
    versions = tuple((t.data_ptr(), t._version) for t in rest)

    def make(w0):
        w = torch.cat([w0, *(w.detach() for w in weights[1:])])
        b = None
        if any(b is not None for b in biases):
            b = torch.cat([torch.zeros(w_.shape[0], dtype=w.dtype, device=w.device) if b_ is None
                           else b_.detach().to(w.dtype) for w_, b_ in zip(weights, biases)])
        if bf16:
            w = w.to(torch.bfloat16).float()
            b = None if b is None else b.to(torch.bfloat16).float()
        for weight in weights:
            _packed.pop(weight, None)
        return pack(w.contiguous(), rows), b
    return kept(_stacked, weights[0], make, tag=(bf16, versions))



def is_packed(weight: torch.Tensor) -> bool:
    """Whether ``weight`` keeps a prepacked copy of its own."""
    return weight in _packed


def is_stacked(weight: torch.Tensor) -> bool:
    """Whether ``weight`` heads a kept stack of projections (:func:`stacked_weight`)."""
    return weight in _stacked


def packed_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """The prepacked copy ``weight`` keeps, or None."""
    hit = _packed.get(weight)
    return None if hit is None else hit[1]


def stacked_copy(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(prepacked stacked weights, stacked biases) kept under ``weight``, or None."""
    hit = _stacked.get(weight)
    return None if hit is None else hit[1]
