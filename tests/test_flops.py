"""FLOPS accounting: the ``flops()`` methods against torch's operation counter, closed forms,
the training rule and the executed side figure, generation, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from qwenlite.errors import QwenliteError
from qwenlite.evaluation.generation import generate, run_flops
from qwenlite.flops import (
    MATMUL_PARTS,
    TRAIN_FACTOR,
    MatmulTrace,
    component,
    counting_model,
    executed_flops,
    forward_flops,
    generation_flops,
    main,
    meta_twin,
    summarize,
    trace_training_step,
    train_step_flops,
)
from qwenlite.model import QwenConfig, QwenForCausalLM, init_random
from qwenlite.model.counting import matmul_flops
from qwenlite.training.lora import apply_lora

ROOT = Path(__file__).resolve().parents[1]
TINY = QwenConfig.from_name("tiny")
Q05 = QwenConfig.from_name("qwen2.5-0.5b")
ATTENTION_PARTS = ("scores", "scale", "mask", "softmax", "values")
aten = torch.ops.aten


# FlopCounterMode counts 2·m·n·p per matmul; these count m·p·(2n−1), the coursework's rule.
def _mm(a, b, *args, out_shape=None, **kwargs):
    return a[0] * b[1] * (2 * a[1] - 1)


def _addmm(bias, a, b, *args, out_shape=None, **kwargs):
    return _mm(a, b)


def _bmm(a, b, *args, out_shape=None, **kwargs):
    return a[0] * a[1] * b[2] * (2 * a[2] - 1)


def _baddbmm(bias, a, b, *args, out_shape=None, **kwargs):
    return _bmm(a, b)


def _onednn_linear(x, w, *args, out_shape=None, **kwargs):
    # a decode step's linear through a prepacked weight (qwenlite.accel.packing): x (rows, in),
    # w (out, in)
    return _mm(x, (w[1], w[0]))


COURSEWORK_MATMUL = {aten.mm: _mm, aten.addmm: _addmm, aten.bmm: _bmm, aten.baddbmm: _baddbmm}
if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # torch built with oneDNN
    COURSEWORK_MATMUL[torch.ops.mkldnn._linear_pointwise] = _onednn_linear


def counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=COURSEWORK_MATMUL)


def measured(fc: FlopCounterMode) -> dict[str, int]:
    """Counter totals by module path relative to the model (``""`` is the root)."""
    return {k.removeprefix("QwenForCausalLM").lstrip("."): sum(v.values())
            for k, v in fc.get_flop_counts().items()}


def assert_matches_counter(fc: FlopCounterMode, ours) -> None:
    """Every linear layer, every decoder layer and the whole model: matmul FLOPS equal."""
    got = measured(fc)
    mm = ours.matching(MATMUL_PARTS)
    assert got["Global"] == mm.total()
    by_module: dict[str, int] = {}
    by_layer: dict[str, int] = {}
    for key, value in mm.items():
        path = key.rpartition(".")[0]
        if key.rsplit(".", 1)[-1] in ("matmul", "lora_A", "lora_B") and path != "lm_head":
            by_module[path] = by_module.get(path, 0) + value
        if key.startswith("model.layers."):
            layer = ".".join(key.split(".")[:3])
            by_layer[layer] = by_layer.get(layer, 0) + value
    assert by_module and by_layer
    for path, value in by_module.items():
        assert got.get(path) == value, path
    for path, value in by_layer.items():  # projections + scores + values
        assert got.get(path) == value, path


def real_model(config: QwenConfig) -> QwenForCausalLM:
    """Weights in memory but not initialised beyond zeros (counting needs shapes only)."""
    if config is TINY:
        model = init_random(config)
    else:
        with torch.device("meta"):
            model = QwenForCausalLM(config)
        model.to_empty(device="cpu")
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    model.set_attention_impl("eager")
    return model


def check_prefill_and_decode(model, batch: int, n: int) -> None:
    ids = torch.randint(0, model.config.vocab_size, (batch, n + 1))
    cache = model.new_cache(batch, n + 1)
    with torch.no_grad(), counter() as fc:
        model(ids[:, :n], cache=cache, logits_to_keep=1)
    assert_matches_counter(fc, forward_flops(model, n, batch, logits=1))
    with torch.no_grad(), counter() as fc:
        model(ids[:, n:], cache=cache, cache_start=n, logits_to_keep=1)
    assert_matches_counter(fc, forward_flops(model, 1, batch, n_cached=n, logits=1))


def check_training_step(model, batch: int, n: int) -> None:
    """Forward matmuls vs the counter; backward matmuls vs the executed side figure."""
    ids = torch.randint(0, model.config.vocab_size, (batch, n))
    with counter() as fc:
        logits = model(ids)
        forward = fc.get_total_flops()
        F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten()).backward()
        backward = fc.get_total_flops() - forward
    step = train_step_flops(model, n, batch)
    assert forward == step.breakdown.matching(MATMUL_PARTS).total()
    e = step.executed_breakdown
    assert backward == e["backward.input_grads"] + e["backward.weight_grads"]
    for p in model.parameters():
        p.grad = None


@pytest.mark.parametrize("lora", [None, ("q_proj", "v_proj"), ("k_proj", "down_proj")],
                         ids=["base", "lora-qv", "lora-k-down"])
def test_tiny_matmuls_match_flop_counter(lora):
    torch.manual_seed(0)
    model = real_model(TINY)
    if lora:
        apply_lora(model, 4, targets=lora)
    check_prefill_and_decode(model, batch=2, n=11)
    check_training_step(model, batch=2, n=11)


def test_tiny_untied_full_finetune_backward():
    """No LoRA, every weight trainable, untied head: weight gradients everywhere."""
    config = QwenConfig(**{**TINY.to_dict(), "tie_word_embeddings": False})
    model = init_random(config).requires_grad_(True)
    model.set_attention_impl("eager")
    check_training_step(model, batch=3, n=7)
    step = train_step_flops(model, 7, 3)
    assert step.executed_breakdown["backward.weight_grads"] > 0.9 * step.forward


def test_qwen05b_matmuls_match_flop_counter():
    """The real 0.5B shapes (k/v 896→128, tied 151936-row head), short sequences."""
    torch.manual_seed(0)
    model = real_model(Q05)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (128, 896)
    check_prefill_and_decode(model, batch=1, n=8)
    apply_lora(model, 4)
    ids = torch.randint(0, Q05.vocab_size, (1, 1))
    cache = model.new_cache(1, 9)  # a zero cache stands for 8 earlier tokens
    with torch.no_grad(), counter() as fc:
        model(ids, cache=cache, cache_start=8, logits_to_keep=1)
    assert_matches_counter(fc, forward_flops(model, 1, n_cached=8, logits=1))
    check_training_step(model, batch=1, n=8)


@pytest.mark.parametrize("n", [16, 128, 512, 768])
def test_qwen05b_total_is_two_flops_per_param_per_token_plus_attention(n):
    model = counting_model(Q05)
    total = forward_flops(model, n).total()
    attention = 4 * Q05.num_hidden_layers * Q05.num_attention_heads * Q05.head_dim * n * n
    approx = 2 * Q05.n_params * n + attention
    assert abs(total - approx) / approx < 0.01
    # and the elementwise parts are small but not zero
    matmul = forward_flops(model, n).matching(MATMUL_PARTS).total()
    assert 0 < total - matmul < 0.01 * total


def test_decode_step_grows_by_the_attention_over_one_more_cached_token():
    model = counting_model(Q05, lora_rank=4)
    h, hd, layers = Q05.num_attention_heads, Q05.head_dim, Q05.num_hidden_layers
    for c in (0, 1, 100, 700):
        step = model.flops(1, c, logits=1).total()
        nxt = model.flops(1, c + 1, logits=1).total()
        # scores h(2d_h−1) + scale h + softmax 14h + values 2h·d_h per layer
        assert nxt - step == layers * h * (4 * hd + 14)


def test_prefill_and_decode_agree_outside_attention():
    """Everything but the attention core is per token: n single steps cost what a prefill of n
    costs, outside scores/scale/mask/softmax/values."""
    model = counting_model(TINY, lora_rank=2)
    n = 9

    def outside(count):
        return sum(v for k, v in count.items() if k.rsplit(".", 1)[-1] not in ATTENTION_PARTS)

    steps = sum(outside(model.flops(1, c)) for c in range(n))
    assert outside(model.flops(n)) == steps


def test_generation_is_prefill_plus_decode_steps_in_closed_form():
    model = counting_model(Q05)
    p, s, b = 300, 40, 4
    h, hd, layers = Q05.num_attention_heads, Q05.head_dim, Q05.num_hidden_layers
    gen = generation_flops(model, p, s, b)
    prefill = model.flops(p, logits=1).total()
    decode = s * model.flops(1, p, logits=1).total() + layers * h * (4 * hd + 14) * s * (s - 1) // 2
    assert gen.total() == b * (prefill + decode)
    assert gen == run_flops(model, p, s, b)
    assert generation_flops(model, p, s, b, head_rows=12) == run_flops(
        model, p, s, b, head_rows=12)
    mha = generation_flops(model, p, s, b, gqa_as_mha=True)
    direct = model.flops(p, logits=1, gqa_as_mha=True).total() + sum(
        model.flops(1, p + i, logits=1, gqa_as_mha=True).total() for i in range(s))
    assert mha.total() == b * direct > gen.total()


def test_generate_runs_what_generation_flops_counts():
    torch.manual_seed(0)
    model = real_model(TINY)
    apply_lora(model, 2)
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]]
    with counter() as fc:
        out = generate(model, prompts, max_new_tokens=6)
    assert out.steps == 5
    assert fc.get_total_flops() == out.flops.matching(MATMUL_PARTS).total()
    assert out.flops == generation_flops(model, 5, 5, 2)


def test_gqa_as_mha_counts_kv_projections_full_width():
    n, batch = 64, 2
    base = counting_model(Q05)
    real = forward_flops(base, n, batch)
    mha = forward_flops(base, n, batch, gqa_as_mha=True)
    h, kv, hd, d = (Q05.num_attention_heads, Q05.num_key_value_heads, Q05.head_dim,
                    Q05.hidden_size)
    extra = (h - kv) * hd
    per_layer = 2 * (n * extra * (2 * d - 1) + n * extra) + n * (h - kv) * (3 * hd + hd // 2)
    assert mha.total() - real.total() == batch * Q05.num_hidden_layers * per_layer
    # The attention itself is standard multi-head attention in both readings.
    assert real.matching(("scores", "values")) == mha.matching(("scores", "values"))
    # LoRA on v_proj keeps its terms under the MHA reading (B and the add full-width too).
    lora = forward_flops(counting_model(Q05, lora_rank=4), n, batch, gqa_as_mha=True)
    assert lora.matching(("lora_A",)).total() > 0
    lora_b = lora["model.layers.0.self_attn.v_proj.lora_B"]
    assert lora_b == batch * n * Q05.q_dim * (2 * 4 - 1)


def test_train_step_rule_and_executed_side_figure():
    base = train_step_flops(counting_model(Q05), 512, 4)
    lora = train_step_flops(counting_model(Q05, lora_rank=4), 512, 4)
    for step in (base, lora):
        assert step.rule == TRAIN_FACTOR * step.forward == step.train_step
        assert step.forward == step.breakdown.total()
        assert step.breakdown["loss"] > 0  # the training forward includes the loss
        assert step.executed == step.executed_breakdown.total()
    # LoRA adds its own forward terms; the rule charges 3× them.
    assert lora.forward - base.forward == lora.breakdown.matching(
        ("lora_A", "lora_scale", "lora_B", "lora_add")).total()
    # Full fine-tuning executes about the rule; frozen base weights about two thirds of it.
    assert 0.97 < base.executed / base.rule < 1.01
    assert 0.6 < lora.executed / lora.rule < 0.72
    e = lora.executed_breakdown
    assert 0 < e["backward.weight_grads"] < 0.001 * lora.forward  # LoRA A/B only


def test_training_trace_owns_every_elementwise_part():
    """Every elementwise part ``flops()`` reports belongs to a traced module, so none is guessed;
    which modules need gradients is autograd's answer."""
    model = counting_model(TINY, lora_rank=2)
    trace = trace_training_step(model, 5)
    keys = set(forward_flops(model, 5, loss=True))
    for key in keys:
        if key.rsplit(".", 1)[-1] not in MATMUL_PARTS:
            assert any(key == g or key.startswith(g + ".") for g in trace.needs_grad), key
    # layer 0's frozen K projection sees the frozen embedding: no gradient; layer 1's does
    assert not trace.needs_grad["model.layers.0.self_attn.k_proj"]
    assert trace.needs_grad["model.layers.1.self_attn.k_proj"]
    assert trace.needs_grad["loss"]


def test_meta_twin_mirrors_trainability_and_leaves_the_model_alone():
    model = counting_model(TINY, lora_rank=2, lora_targets=("k_proj", "down_proj"))
    model.model.norm.weight.requires_grad_(True)
    twin = meta_twin(model)
    assert twin is not model and twin.model.layers[0].self_attn.impl == "eager"
    assert model.model.layers[0].self_attn.impl == "sdpa"
    assert ({n for n, p in twin.named_parameters() if p.requires_grad}
            == {n for n, p in model.named_parameters() if p.requires_grad})


def test_matmul_trace_refuses_a_product_it_cannot_count():
    a = torch.zeros(3, 4, device="meta")
    with MatmulTrace() as trace:
        torch.mm(a, a.T)
    assert trace.flops == matmul_flops(3, 4, 3)
    with pytest.raises(QwenliteError, match="cannot count"), MatmulTrace():
        torch.mv(a, torch.zeros(4, device="meta"))


def test_frozen_model_executes_no_backward():
    model = counting_model(TINY).requires_grad_(False)
    e = executed_flops(model, 8)
    assert e.total() == e["forward"]


def test_summary_groups_components_and_sums_to_total():
    count = forward_flops(counting_model(Q05, lora_rank=4), 128, 2, loss=True)
    components, per_layer, layers = summarize(count)
    assert layers == 24 and sum(components.values()) == count.total()
    assert components["self_attn.q_proj.lora"] == 24 * per_layer["self_attn.q_proj.lora"]
    assert component("model.layers.3.self_attn.v_proj.lora_B") == ("self_attn.v_proj.lora", 3)
    assert component("model.norm.rsqrt") == ("final_norm", None)
    assert component("decode.lm_head.matmul") == ("lm_head", None)


@pytest.mark.parametrize("bad", [dict(seq_len=0), dict(batch=-1)])
def test_functions_reject_bad_sizes(bad):
    from qwenlite.errors import QwenliteError

    args = dict(seq_len=8, batch=1) | bad
    with pytest.raises(QwenliteError):
        forward_flops(counting_model(TINY), args["seq_len"], args["batch"])


# ----------------------------------------------------------------------------------------------
# Command line: all subprocesses start together (each pays for importing torch).

CLI_CASES = {
    "json": ["--json", "--seq-len", "128", "--batch", "2", "--train", "--lora-rank", "4",
             "--generate", "10"],
    "seq0": ["--seq-len", "0"],
    "seq_negative": ["--seq-len", "-3"],
    "preset": ["--preset", "qwen9-100b"],
    "weights": ["--weights", "/no/such/checkpoint/dir"],
}


@pytest.fixture(scope="module")
def cli_runs():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    procs = {name: subprocess.Popen([sys.executable, "-m", "qwenlite.flops", *args], env=env,
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for name, args in CLI_CASES.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        out[name] = (proc.returncode, stdout, stderr)
    return out


def test_cli_json(cli_runs):
    code, stdout, stderr = cli_runs["json"]
    assert code == 0, stderr
    rep = json.loads(stdout)
    assert rep["seq_len"] == 128 and rep["batch"] == 2 and rep["mode"] == "train"
    step = train_step_flops(counting_model(Q05, lora_rank=4), 128, 2)
    assert rep["forward"] == step.forward == sum(rep["breakdown"].values())
    assert rep["train_step"] == 3 * rep["forward"] == step.rule
    assert rep["executed"] == step.executed
    assert isinstance(rep["forward"], int) and rep["breakdown"]["self_attn.v_proj.lora"] > 0
    gen = rep["generation"]
    assert gen["decode_steps"] == 9
    assert gen["total"] == generation_flops(counting_model(Q05, lora_rank=4), 128, 9, 2).total()


@pytest.mark.parametrize("case", ["seq0", "seq_negative", "preset", "weights"])
def test_cli_bad_input_is_one_line(cli_runs, case):
    code, stdout, stderr = cli_runs[case]
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr


def test_cli_table_and_weights_dir(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **TINY.to_dict()}))
    assert main(["--breakdown", "--weights", str(tmp_path), "--seq-len", "16", "--train"]) == 0
    text = capsys.readouterr().out
    assert "self_attn.scores" in text and "100.00%" in text and "side figure" in text
    assert main(["--weights", str(tmp_path), "--json", "--seq-len", "16"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["config"]["d"] == TINY.hidden_size
    assert rep["forward"] == forward_flops(counting_model(TINY), 16).total()
    assert main(["--weights", str(tmp_path), "--json", "--generate", "4", "--head-rows", "3"]) == 0
    gen = json.loads(capsys.readouterr().out)["generation"]
    assert gen["total"] == generation_flops(counting_model(TINY), 512, 3, head_rows=3).total()
    for bad in (["--weights", str(tmp_path / "missing")], ["--head-rows", "3"]):
        assert main(bad) == 2
        assert capsys.readouterr().err.startswith("error: ")
