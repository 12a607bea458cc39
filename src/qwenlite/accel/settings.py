"""The acceleration's switches, read from the environment once into one :class:`Settings`.

============================  =========================================================  =======
variable                      what it chooses                                            default
============================  =========================================================  =======
``QWENLITE_BF16_MATMUL``      ``auto`` (emulate bf16 on the fp32 units where the CPU     auto
                              lacks bf16), ``native`` (torch's bf16 kernels), ``emulate``
``QWENLITE_PACK_WEIGHTS``     ``0``: no oneDNN-prepacked decode weights                  1
``QWENLITE_DECODE_KERNEL``    ``auto`` (the C++ decode kernel where it beats oneDNN:      auto
                              AVX2 CPUs without AVX-512), ``1`` (wherever it runs), ``0``
``QWENLITE_MALLOC``           ``system``: leave glibc's malloc as it is (``keep``: keep  keep
                              freed memory; applied by the command-line entry points)
``QWENLITE_TRAIN_ATTENTION``  ``auto`` (bf16 training's causal attention through the C++  auto
                              kernel on AVX512-BF16 CPUs without AMX,
                              :mod:`~qwenlite.accel.flash`), ``1`` (wherever it runs), ``0``
============================  =========================================================  =======

:func:`current` reads them on its first call (a bad value is a one-line
:class:`~qwenlite.errors.QwenliteError` there, not at import) and returns the same object after;
code may change its fields (tests do, with ``monkeypatch.setattr(settings.current(), ...)``), and
:func:`reload` reads the environment again.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

from qwenlite.errors import QwenliteError

BF16_ENV = "QWENLITE_BF16_MATMUL"
PACK_ENV = "QWENLITE_PACK_WEIGHTS"
KERNEL_ENV = "QWENLITE_DECODE_KERNEL"
MALLOC_ENV = "QWENLITE_MALLOC"
ATTENTION_ENV = "QWENLITE_TRAIN_ATTENTION"
BF16_MODES = ("auto", "native", "emulate")
KERNEL_MODES = ("auto", "on", "off")
_KERNEL_WORDS = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}
MALLOC_MODES = ("keep", "system")


@dataclass
class Settings:
    """How the acceleration runs; see the module doc for each field's variable."""

    bf16_matmul: str = "auto"
    pack_weights: bool = True
    decode_kernel: str = "auto"
    malloc: str = "keep"
    train_attention: str = "auto"

    def __post_init__(self) -> None:
        if self.bf16_matmul not in BF16_MODES:
            raise QwenliteError(f"${BF16_ENV} must be one of {', '.join(BF16_MODES)}, "
                                f"got {self.bf16_matmul!r}")
        self.decode_kernel = _KERNEL_WORDS.get(self.decode_kernel, self.decode_kernel)
        if self.decode_kernel not in KERNEL_MODES:
            raise QwenliteError(f"${KERNEL_ENV} must be auto, 1 or 0, got {self.decode_kernel!r}")
        self.train_attention = {"on": "1", "true": "1", "yes": "1", "off": "0", "false": "0",
                                "no": "0"}.get(self.train_attention, self.train_attention)
        if self.train_attention not in ("auto", "1", "0"):
            raise QwenliteError(f"${ATTENTION_ENV} must be auto, 1 or 0, "
                                f"got {self.train_attention!r}")
        if self.malloc not in MALLOC_MODES:
            raise QwenliteError(f"${MALLOC_ENV} must be one of {', '.join(MALLOC_MODES)}, "
                                f"got {self.malloc!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        def text(name: str, default: str) -> str:
            return environ.get(name, default).strip().lower() or default

        return cls(bf16_matmul=text(BF16_ENV, "auto"), pack_weights=text(PACK_ENV, "1") != "0",
                   decode_kernel=text(KERNEL_ENV, "auto"), malloc=text(MALLOC_ENV, "keep"),
                   train_attention=text(ATTENTION_ENV, "auto"))


@functools.cache
def current() -> Settings:
    """The process's settings, read from the environment on the first call."""
    return Settings.from_env()


def reload() -> None:
    """Forget the settings read: the next :func:`current` reads the environment again."""
    current.cache_clear()
