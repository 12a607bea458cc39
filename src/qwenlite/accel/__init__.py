"""CPU acceleration for :mod:`qwenlite.model`, applied to a model through one narrow seam.

The model is the readable reference: ``nn.Linear``, ``F.scaled_dot_product_attention``, a plain
static KV cache. This package makes it fast on a CPU without changing what it computes:

* :mod:`~qwenlite.accel.emulation` — bf16 matmuls on the fp32 units of CPUs without bf16
  arithmetic (exact bf16 semantics, ~6× torch's generic bf16 loop);
* :mod:`~qwenlite.accel.skinny` (+ ``skinny_*.cpp``) — a C++ AVX2 kernel for decode steps' few-row
  matmuls and attention, built on first use;
* :mod:`~qwenlite.accel.packing` — oneDNN-prepacked decode weights where the kernel does not serve;
* :mod:`~qwenlite.accel.kernels` — which of these each matmul and attention goes through;
* :mod:`~qwenlite.accel.modules` — the seam: subclasses of the model's modules overriding its
  hooks, swapped in by :func:`apply` and out by :func:`remove`;
* :mod:`~qwenlite.accel.memory` — glibc malloc kept from returning large blocks (command-line
  entry points only);
* :mod:`~qwenlite.accel.settings` — the environment switches, read once.

:func:`qwenlite.load_model` applies it on a CPU (``accelerate=False`` gives the plain model).
``docs/architecture.md`` describes the seam and how to add another backend.
"""

from qwenlite.accel import settings
from qwenlite.accel.emulation import bf16_matmul_mode, cpu_lacks_bf16, emulating
from qwenlite.accel.kernels import Linear, attention, linear, linears
from qwenlite.accel.memory import keep_freed_memory
from qwenlite.accel.modules import apply, for_device, is_accelerated, remove
from qwenlite.accel.packing import clear_packed_weights
from qwenlite.accel.settings import Settings
from qwenlite.accel.skinny import status as kernel_status

__all__ = [
    "Linear", "Settings", "apply", "attention", "bf16_matmul_mode", "clear_packed_weights",
    "cpu_lacks_bf16", "emulating", "for_device", "is_accelerated", "keep_freed_memory", "kernel_status",
    "linear", "linears", "remove", "settings",
]
