"""The strict loader: good checkpoints load; every kind of bad one is one clear line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, make_hf_checkpoint
from safetensors.torch import load_file, save_file

from qwenlite.errors import CheckpointError
from qwenlite.model import QwenConfig, load_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("good"), tied=True)


@pytest.fixture
def ckpt(good, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(good, directory)
    return directory


def _edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _cli_error(directory) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(
        [sys.executable, "-m", "qwenlite.generate", "--weights", str(directory), "--prompt", "1"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_loads_bf16_and_fp32(good):
    fp32 = load_model(good, dtype="fp32")
    bf16 = load_model(good, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert not any(p.requires_grad for p in fp32.parameters())
    assert not any(b.is_meta for b in fp32.buffers())
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(bf16(ids).float(), fp32(ids), atol=0.05, rtol=0.05)


def test_missing_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        load_model(ckpt)
    assert "model.layers.1.mlp.up_proj.weight" in _cli_error(ckpt)


def test_wrong_shape(ckpt):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)

    _edit_tensors(ckpt, edit)
    message = _cli_error(ckpt)
    assert "model.layers.0.self_attn.k_proj.weight" in message
    assert "[64, 64]" in message and "expected [32, 64]" in message


def test_unexpected_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.__setitem__("model.layers.7.extra", torch.zeros(2)))
    assert "unexpected tensor model.layers.7.extra" in _cli_error(ckpt)


def test_corrupt_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    assert "cannot read" in _cli_error(ckpt)
    path.write_bytes(b"this is not a safetensors file")
    assert "cannot read" in _cli_error(ckpt)


def test_other_architecture(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (ckpt / "config.json").write_text(json.dumps(config))
    assert "architecture 'llama'" in _cli_error(ckpt)


def test_no_weights_file_and_no_config(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    assert "no model.safetensors" in _cli_error(ckpt)
    assert "does not exist" in _cli_error(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in _cli_error(empty)


def test_missing_shard(tmp_path):
    directory = make_hf_checkpoint(tmp_path / "sharded", sharded=True)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (directory / victim).unlink()
    assert victim in _cli_error(directory)


def test_config_spellings(tmp_path):
    base = {"model_type": "qwen2", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**base, "rope_theta": 1234.0}))
    new = tmp_path / "new.json"
    new.write_text(json.dumps({**base, "rope_parameters": {"rope_theta": 1234.0,
                                                            "rope_type": "default"}}))
    assert QwenConfig.from_json(old).rope_theta == QwenConfig.from_json(new).rope_theta == 1234.0
    assert QwenConfig.from_name("qwen2.5-0.5b").n_params == 494_032_768


def test_tied_checkpoint_with_redundant_head_loads(ckpt):
    _edit_tensors(ckpt, lambda t: t.__setitem__("lm_head.weight",
                                                t["model.embed_tokens.weight"].clone()))
    model = load_model(ckpt)
    assert model.lm_head.weight is model.model.embed_tokens.weight
