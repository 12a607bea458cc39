"""Itemized FLOPS counts, following the coursework's primitive table.

An (m×n)(n×p) matmul costs m·p·(2n−1); add/sub/neg/mul/div/inverse 1; exp/log 10;
sin/cos/sqrt 10. Every model module has a ``flops(...)`` method beside ``forward()`` that returns a
:class:`FlopCount`, a mapping from named parts to integer counts that can be summed, scaled and
nested under prefixes.
"""

from __future__ import annotations

EXP = LOG = 10
SQRT = SIN = COS = 10


def matmul_flops(m: int, n: int, p: int) -> int:
    """FLOPS of an (m×n)(n×p) matrix product: m·p·(2n−1)."""
    return m * p * (2 * n - 1) if m and n and p else 0


class FlopCount(dict):
    """Named FLOPS counts (``part -> int``) with ``+``, scaling and prefixing."""

    def total(self) -> int:
        return int(sum(self.values()))

    def __add__(self, other: FlopCount) -> FlopCount:
        out = FlopCount(self)
        for key, value in other.items():
            out[key] = out.get(key, 0) + value
        return out

    def scaled(self, factor: int) -> FlopCount:
        return FlopCount({k: v * factor for k, v in self.items()})

    def prefixed(self, prefix: str) -> FlopCount:
        return FlopCount({f"{prefix}.{k}": v for k, v in self.items()})

    def grouped(self, depth: int = 1) -> FlopCount:
        """Sum parts by the first ``depth`` components of their dotted names."""
        out = FlopCount()
        for key, value in self.items():
            group = ".".join(key.split(".")[:depth])
            out[group] = out.get(group, 0) + value
        return out

    def matching(self, suffixes: tuple[str, ...]) -> FlopCount:
        """The parts whose last name component is one of ``suffixes``."""
        return FlopCount({k: v for k, v in self.items() if k.rsplit(".", 1)[-1] in suffixes})


def linear_flops(module, n_tokens: int, out_features: int | None = None) -> FlopCount:
    """FLOPS of ``n_tokens`` rows through a linear layer: matmul, then bias if present.

    Modules that know their own cost (e.g. a LoRA wrapper) provide ``flops(n_tokens,
    out_features=None)``, which is used instead. ``out_features`` overrides the width (used to
    count K/V projections as full multi-head projections when GQA is read as standard multi-head
    attention); it is passed on to such modules so that their own extra terms are kept.
    """
    if hasattr(module, "flops"):
        if out_features is None:
            return module.flops(n_tokens)
        return module.flops(n_tokens, out_features=out_features)
    out_f = module.out_features if out_features is None else out_features
    count = FlopCount(matmul=matmul_flops(n_tokens, module.in_features, out_f))
    if module.bias is not None:
        count["bias"] = n_tokens * out_f
    return count
