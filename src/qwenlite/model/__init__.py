"""The Qwen2.5 model, one file per component."""

from qwenlite.model.attention import Attention, KVCache
from qwenlite.model.config import PRESETS, QwenConfig
from qwenlite.model.counting import FlopCount, matmul_flops
from qwenlite.model.decoder import DecoderLayer, QwenForCausalLM, QwenModel
from qwenlite.model.loading import init_random, load_model
from qwenlite.model.mlp import SwiGLU
from qwenlite.model.norm import RMSNorm
from qwenlite.model.rope import RotaryEmbedding

__all__ = [
    "Attention", "DecoderLayer", "FlopCount", "KVCache", "PRESETS", "QwenConfig",
    "QwenForCausalLM", "QwenModel", "RMSNorm", "RotaryEmbedding", "SwiGLU", "init_random",
    "load_model", "matmul_flops",
]
