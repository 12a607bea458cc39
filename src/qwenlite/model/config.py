"""Model hyperparameters: one dataclass, named presets, and a reader for HF ``config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from qwenlite.errors import CheckpointError, QwenliteError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map ``fp32``/``bf16`` (or ``float32``/``bfloat16``, or a torch dtype) to a torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise QwenliteError(f"unsupported dtype {name}; use fp32 or bf16")
        return name
    aliases = {"float32": "fp32", "bfloat16": "bf16"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise QwenliteError(f"unknown dtype {name!r}; use fp32 or bf16")
    return DTYPES[key]


@dataclass(frozen=True)
class QwenConfig:
    """Hyperparameters of a Qwen2.5 decoder (names follow HF ``Qwen2Config``)."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    head_dim: int | None = None  # derived as hidden_size // num_attention_heads when None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise QwenliteError(
                    f"hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise QwenliteError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise QwenliteError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def n_params(self) -> int:
        """Number of distinct parameters (a tied head counts once)."""
        d, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * self.q_dim + self.q_dim + 2 * (d * self.kv_dim + self.kv_dim) + self.q_dim * d
        layer = attn + 3 * d * i + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_hidden_layers * layer + d + head

    @classmethod
    def from_name(cls, name: str) -> QwenConfig:
        """A named preset: see :data:`PRESETS`."""
        try:
            return PRESETS[name]
        except KeyError:
            raise QwenliteError(
                f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}"
            ) from None

    @classmethod
    def from_dict(cls, raw: dict) -> QwenConfig:
        """Build from the fields of an HF ``Qwen2Config`` dict (unknown fields are ignored)."""
        model_type = raw.get("model_type")
        archs = raw.get("architectures") or []
        if model_type not in (None, "qwen2") or (archs and "Qwen2ForCausalLM" not in archs):
            found = model_type or ",".join(archs)
            raise CheckpointError(
                f"config describes architecture {found!r}; qwenlite loads Qwen2/Qwen2.5 "
                "(model_type 'qwen2', Qwen2ForCausalLM) only"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in fields}
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if "rope_theta" not in kwargs and isinstance(rope, dict) and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        if isinstance(rope, dict) and rope.get("rope_type", "default") not in ("default", None):
            raise CheckpointError(f"unsupported rope scaling {rope.get('rope_type')!r}")
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if k not in kwargs]
        if missing:
            raise CheckpointError(f"config is missing {', '.join(missing)}")
        kwargs.setdefault("num_key_value_heads", kwargs["num_attention_heads"])
        kwargs.setdefault("tie_word_embeddings", False)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> QwenConfig:
        """Read an HF ``config.json`` (``rope_theta`` or ``rope_parameters.rope_theta``)."""
        from qwenlite.io import read_json_object

        return cls.from_dict(read_json_object(path, "model config", CheckpointError))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, QwenConfig] = {
    "qwen2.5-0.5b": QwenConfig(),
    "qwen2.5-1.5b": QwenConfig(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                               num_attention_heads=12, num_key_value_heads=2,
                               max_position_embeddings=32768),
    "tiny": QwenConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rope_theta=10000.0, bos_token_id=None, eos_token_id=None),
}
