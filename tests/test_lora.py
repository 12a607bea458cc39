"""LoRA: what trains, exactness at init, merging, and agreement with PEFT in both directions."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_hf, make_hf_checkpoint

from qwenlite.errors import CheckpointError, QwenliteError
from qwenlite.model import load_model
from qwenlite.training.lora import LoRALinear, apply_lora, load_adapter, lora_layers, save_adapter

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("lora"), tied=True, kv_heads=2)


def _ids(seed=0, shape=(2, 21)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def _randomize_b(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)


def test_only_lora_parameters_train(ckpt):
    model = load_model(ckpt)
    wrapped = apply_lora(model, r=4, alpha=8)
    assert sorted(wrapped) == sorted(f"model.layers.{i}.self_attn.{p}"
                                     for i in range(2) for p in ("q_proj", "v_proj"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(wrapped)
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (64, 4)
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.lora_A.weight) > 0


def test_initial_output_equals_base(ckpt):
    base = load_model(ckpt)
    adapted = load_model(ckpt)
    apply_lora(adapted, r=4)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids), base(ids), rtol=0, atol=0)


def test_merge_unmerge(ckpt):
    model = load_model(ckpt)
    apply_lora(model, r=4, alpha=16)
    _randomize_b(model)
    ids = _ids()
    with torch.no_grad():
        unmerged = model(ids)
        before = model.model.layers[0].self_attn.q_proj.base.weight.clone()
        for layer in lora_layers(model).values():
            layer.merge()
            layer.merge()  # a second merge must be a no-op
        merged = model(ids)
        for layer in lora_layers(model).values():
            layer.unmerge()
        after = model.model.layers[0].self_attn.q_proj.base.weight
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(merged, load_model(ckpt)(ids), atol=1e-3)


def _peft_model(ckpt, r, alpha):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                             lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(load_hf(ckpt), config)


def test_forward_backward_match_peft(ckpt):
    ours = load_model(ckpt)
    apply_lora(ours, r=4, alpha=8)
    _randomize_b(ours)
    theirs = _peft_model(ckpt, 4, 8)
    ours_sd = {k: v for k, v in ours.state_dict().items() if ".lora_" in k}
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".lora_" in name:
                key = name.replace("base_model.model.", "", 1).replace(".default", "")
                p.copy_(ours_sd[key])
    ids = _ids(3)
    out_ours = ours(ids)
    out_theirs = theirs(input_ids=ids).logits
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    out_ours.float().pow(2).mean().backward()
    out_theirs.float().pow(2).mean().backward()
    grads = {n.replace("base_model.model.", "", 1).replace(".default", ""): p.grad
             for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6)


def test_peft_loads_our_adapter(ckpt, tmp_path):
    ours = load_model(ckpt)
    apply_lora(ours, r=2, alpha=4)
    _randomize_b(ours)
    save_adapter(ours, tmp_path / "adapter", str(ckpt))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    theirs = peft.PeftModel.from_pretrained(load_hf(ckpt), tmp_path / "adapter").eval()
    ids = _ids(4)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=1e-5,
                                   atol=1e-5)


def test_we_load_a_peft_adapter(ckpt, tmp_path):
    theirs = _peft_model(ckpt, 4, 4)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(load_model(ckpt), tmp_path / "peft")
    ids = _ids(5)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=1e-5,
                                   atol=1e-5)


def test_bad_rank_and_bad_adapter(ckpt, tmp_path):
    with pytest.raises(QwenliteError, match="rank must be >= 1"):
        apply_lora(load_model(ckpt), r=0)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PREFIX"}')
    with pytest.raises(CheckpointError, match="not a LoRA adapter"):
        load_adapter(load_model(ckpt), tmp_path)


def test_lora_flops_add_their_parts(ckpt):
    model = load_model(ckpt)
    plain = model.flops(10).total()
    apply_lora(model, r=4)
    count = model.flops(10)
    assert all(isinstance(m, LoRALinear) for m in lora_layers(model).values())
    # x·A (r × (2·in − 1) per token), scaling (r), ·B (out × (2r − 1)), add (out): q_proj (64 out) and v_proj (32 out) in each of the 2 layers
    expected = sum(10 * 4 * (2 * 64 - 1) + 10 * 4 + 10 * out * (2 * 4 - 1) + 10 * out
                   for out in (64, 32)) * 2
    assert count.total() - plain == expected


def test_peft_users_load_the_logit_bias_beside_the_adapter(ckpt, tmp_path):
    """An adapter with a logit bias stays PEFT-loadable; the bias file is added to the PEFT
    model's LM head as the docs say, and its logits equal ours."""
    from qwenlite.training.lora import add_logit_bias, load_logit_bias_into

    ours = load_model(ckpt)
    apply_lora(ours, r=2, alpha=4)
    _randomize_b(ours)
    bias = add_logit_bias(ours)
    with torch.no_grad():
        bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(7)))
    save_adapter(ours, tmp_path / "adapter", str(ckpt))
    theirs = peft.PeftModel.from_pretrained(load_hf(ckpt), tmp_path / "adapter").eval()
    ids = _ids(5)
    with torch.no_grad():
        without = theirs(input_ids=ids).logits
        load_logit_bias_into(theirs, tmp_path / "adapter" / "logit_bias.safetensors")
        torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(without, theirs(input_ids=ids).logits)
    # and ours loads it back, bias included
    again = load_adapter(load_model(ckpt), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), rtol=1e-5, atol=1e-5)


def test_a_scaled_adapter_adds_lambda_times_its_update(ckpt):
    from qwenlite.training.lora import add_logit_bias, scale_adapter

    def adapted(lam=None):
        model = load_model(ckpt)
        torch.manual_seed(0)  # the same A in every copy
        apply_lora(model, r=4, alpha=8)
        _randomize_b(model)
        with torch.no_grad():
            add_logit_bias(model).copy_(torch.linspace(-1, 1, model.lm_head.out_features))
        return model if lam is None else scale_adapter(model, lam)

    ids = _ids()
    with torch.no_grad():
        base, full, half = load_model(ckpt)(ids), adapted()(ids), adapted(0.5)(ids)
        torch.testing.assert_close(adapted(0.0)(ids), base, rtol=0, atol=0)  # λ 0: the base
        torch.testing.assert_close(adapted(1.0)(ids), full, rtol=0, atol=0)
        assert not torch.allclose(half, full, atol=1e-4) and not torch.allclose(half, base,
                                                                                  atol=1e-4)
        # the update is linear in λ at the layer: W + λBA, and λ × the bias
        model = adapted(0.5)
        layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
        twin = lora_layers(adapted())["model.layers.0.self_attn.q_proj"]
        torch.testing.assert_close(layer.delta_weight(), 0.5 * twin.delta_weight())
        torch.testing.assert_close(model.lm_head.bias,
                                   0.5 * torch.linspace(-1, 1, model.lm_head.out_features))
    with pytest.raises(QwenliteError, match=">= 0"):
        scale_adapter(adapted(), -1.0)
    merged = adapted()
    for layer in lora_layers(merged).values():
        layer.merge()
    with pytest.raises(QwenliteError, match="before merging"):
        scale_adapter(merged, 0.5)
