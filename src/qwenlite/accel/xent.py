"""The LM-head loss's softmax cross-entropy over bf16 logits, in one C++ kernel (``xent.cpp``,
built with the decode kernels by :mod:`~qwenlite.accel.skinny`); :mod:`qwenlite.training.loss`
uses it under bf16 on bf16 units."""

from __future__ import annotations

import torch

from qwenlite.accel import skinny


def available() -> bool:
    """Whether :func:`xent_bf16` runs here (the library built and checked on the first call).
    It serves wherever the library runs, AVX-512 CPUs included: unlike the decode kernels it
    has no oneDNN counterpart, only torch's passes over fp32 copies of the logits."""
    return skinny.library() is not None


def xent_bf16(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Softmax cross-entropy of each row of ``logits`` (rows, V) bf16, unit stride along V,
    against ``targets`` (rows,) int64, in fp32: returns the (rows,) losses and overwrites
    ``logits`` in place with ``softmax − onehot`` in bf16 (their gradient). None where it does
    not take them (and ``logits`` is untouched); :func:`available` must be true."""
    lib = skinny.library()
    return _call(lib, logits, targets)


def _call(lib, logits, targets):
    if (logits.dim() != 2 or logits.dtype != torch.bfloat16 or logits.device.type != "cpu"
            or logits.stride(-1) != 1 or targets.shape != logits.shape[:1]):
        return None
    targets = targets.to(torch.int64).contiguous()
    loss = torch.empty(logits.shape[0], dtype=torch.float32)
    rc = lib.xent(logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0),
                  targets.data_ptr(), loss.data_ptr(), torch.get_num_threads())
    return loss if rc == 0 else None


def self_check(lib) -> bool:
    """The kernel against torch in float64 (called by :mod:`skinny` before the library serves):
    rows of a few vocabulary sizes, with and without a tail of fewer than 8."""
    gen = torch.Generator().manual_seed(2)
    for rows, vocab in ((3, 37), (5, 64), (2, 1003)):
        logits = (4 * torch.randn(rows, vocab, generator=gen)).to(torch.bfloat16)
        targets = torch.randint(0, vocab, (rows,), generator=gen)
        ref_loss = torch.nn.functional.cross_entropy(logits.double(), targets, reduction="none")
        ref_grad = torch.softmax(logits.double(), -1)
        ref_grad[torch.arange(rows), targets] -= 1
        grad = logits.clone()
        loss = _call(lib, grad, targets)
        if (loss is None or not torch.allclose(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
                or not torch.allclose(grad.double(), ref_grad, rtol=1e-2, atol=1e-6)):
            return False
    return True
