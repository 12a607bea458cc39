"""The package's layout: a plain reference model, the acceleration applied to it through one seam."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import torch
from torch import nn

from qwenlite import accel
from qwenlite.model import QwenConfig, init_random
from qwenlite.model.attention import Attention, KVCache
from qwenlite.model.mlp import SwiGLU

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "qwenlite"
MODEL_MAY_IMPORT = ("torch", "safetensors", "qwenlite.model", "qwenlite.errors", "qwenlite.io")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_the_model_imports_nothing_above_it():
    """``qwenlite.model`` imports torch, safetensors, the standard library, itself and the two
    shared helpers, and names no acceleration routine."""
    for path in sorted((PACKAGE / "model").glob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            allowed = top in sys.stdlib_module_names or top == "__future__" or any(
                name == m or name.startswith(m + ".") for m in MODEL_MAY_IMPORT)
            assert allowed, f"{path.name} imports {name}"
        text = path.read_text()
        assert "kernels." not in text and "skinny." not in text, path.name
    assert not list((PACKAGE / "model").glob("*.cpp"))


def test_apply_and_remove_swap_classes_and_keep_the_parameters():
    model = init_random(QwenConfig.from_name("tiny"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids)
    assert not accel.is_accelerated(model)
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[0].mlp) is SwiGLU

    accel.apply(model)
    accel.apply(model)  # idempotent
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, Attention) and type(attn) is not Attention
    assert isinstance(model.lm_head, accel.Linear)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), plain, rtol=1e-5, atol=1e-5)

    accel.remove(model)
    assert not accel.is_accelerated(model)
    assert type(model.lm_head) is nn.Linear and type(attn) is Attention
    assert type(model.new_cache(1, 4)) is KVCache
    with torch.no_grad():
        assert torch.equal(model(ids), plain)


def test_lora_layers_run_as_the_layer_they_wrap():
    from qwenlite.training.lora import apply_lora

    for accelerated in (False, True):
        model = init_random(QwenConfig.from_name("tiny"))
        if accelerated:
            accel.apply(model)
        apply_lora(model, 2)
        wrapped = model.model.layers[0].self_attn.q_proj
        assert type(wrapped.lora_A) is type(wrapped.base)
        assert (type(wrapped.base) is accel.Linear) == accelerated


def test_for_device_accelerates_cpu_models_only():
    model = init_random(QwenConfig.from_name("tiny"))
    assert accel.is_accelerated(accel.for_device(model))
    with torch.device("meta"):
        from qwenlite.model import QwenForCausalLM

        meta = QwenForCausalLM(QwenConfig.from_name("tiny"))
    assert not accel.is_accelerated(accel.for_device(meta))
