"""Shared fixtures: tiny HF checkpoints, the shared folder beside the checkout, real weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER_JSON = SHARED / "standin" / "tokenizer.json"
REAL_DATA = SHARED / "data" / "lotka_volterra_data.h5"


def real_weights() -> Path | None:
    """The checkpoint named by $QWENLITE_WEIGHTS, if set and present."""
    path = os.environ.get("QWENLITE_WEIGHTS")
    if path and (Path(path) / "config.json").is_file():
        return Path(path)
    return None


requires_weights = pytest.mark.skipif(
    real_weights() is None, reason="set QWENLITE_WEIGHTS to a Qwen2.5-0.5B checkpoint"
)
requires_tokenizer = pytest.mark.skipif(
    not TOKENIZER_JSON.is_file(), reason=f"no tokenizer at {TOKENIZER_JSON}"
)
requires_real_data = pytest.mark.skipif(not REAL_DATA.is_file(), reason=f"no dataset at {REAL_DATA}")


@pytest.fixture(autouse=True)
def _private_rates(tmp_path_factory, monkeypatch):
    """Runs in tests record their rates in a file of the test session, not the user's cache."""
    monkeypatch.setenv("QWENLITE_RATES", str(tmp_path_factory.getbasetemp() / "rates.json"))


def make_hf_checkpoint(directory: Path, *, tied: bool = True, kv_heads: int = 2,
                       sharded: bool = False, seed: int = 0, vocab: int = 128) -> Path:
    """Save a tiny random transformers ``Qwen2ForCausalLM`` with ``save_pretrained``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
        rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )
    model = transformers.Qwen2ForCausalLM(config).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so parity covers them too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory, max_shard_size="60KB" if sharded else "5GB")
    return directory


def make_forecasting_setup(directory: Path, n_systems: int, n_points: int, seed: int):
    """A tiny checkpoint carrying the real Qwen2.5 tokenizer (LLMTIME's digits and separators
    have ids below its 128-token vocabulary) and a small simulated dataset."""
    import shutil

    from qwenlite.data import simulate_to

    weights = make_hf_checkpoint(directory / "tiny", tied=True, kv_heads=2)
    shutil.copy(TOKENIZER_JSON, weights / "tokenizer.json")
    shutil.copy(TOKENIZER_JSON.parent / "tokenizer_config.json", weights)
    data = simulate_to(directory / "lv.h5", n_systems=n_systems, n_points=n_points, seed=seed)
    return weights, data


def load_hf(directory: Path, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    return transformers.Qwen2ForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation="eager"
    ).eval()
