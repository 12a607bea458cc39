"""Runs that continue another run's checkpoint: a promoted rung equals an uninterrupted run, the
ledger charges each step once, and branches change the context or add the logit bias."""

from __future__ import annotations

import json

import pytest
from conftest import make_forecasting_setup, requires_tokenizer

from qwenlite.errors import QwenliteError
from qwenlite.train import main
from qwenlite.training.checkpoint import Origin, continue_run
from qwenlite.training.ledger import Ledger

pytestmark = requires_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_forecasting_setup(tmp_path_factory.mktemp("continue"), 24, 20, seed=1)


def _args(setup, run_dir, ledger, *extra, context="48"):
    weights, data = setup
    return ["--weights", str(weights), "--data", str(data), "--out", str(run_dir),
            "--ledger", str(ledger), "--context", context, "--batch", "2", "--device", "cpu",
            "--no-progress", "--lr", "3e-3", "--eval-interval", "4", "--save-interval", "4",
            *extra]


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _entry(ledger, run_dir):
    book = Ledger(ledger)
    return book.load()["entries"][book.key(str(run_dir.resolve()))]


def test_a_promoted_run_equals_an_uninterrupted_run_and_is_charged_once(setup, tmp_path):
    ledger = tmp_path / "ledger.json"
    ref, rung1, rung2 = tmp_path / "ref", tmp_path / "r1" / "train", tmp_path / "r2" / "train"
    assert main(_args(setup, ref, ledger, "--max-steps", "12")) == 0
    assert main(_args(setup, rung1, ledger, "--max-steps", "4")) == 0
    origin = continue_run(rung1, rung2)
    assert (origin.step, origin.evals) == (4, 2)
    assert origin.flops == _records(rung1)[-1]["flops"]
    assert main(_args(setup, rung2, ledger, "--max-steps", "12")) == 0
    a, b = _records(ref), _records(rung2)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]
    assert a[-1]["flops"] == b[-1]["flops"]  # the line's FLOPS, counted from step 0
    # the parent's record is untouched; the child's entry charges only steps 5..12
    assert [r["step"] for r in _records(rung1)][-1] == 4
    whole, first, second = (_entry(ledger, d) for d in (ref, rung1, rung2))
    assert first["flops"] + second["flops"] == whole["flops"]
    assert (first["steps"], second["steps"]) == (4, 8)
    assert second["status"] == "done"
    # continuing again is a no-op that keeps the child's progress
    assert continue_run(rung1, rung2) == Origin.load(rung2)
    assert _records(rung2)[-1]["step"] == 12


def test_a_branch_adds_the_logit_bias_or_changes_the_context(setup, tmp_path):
    ledger = tmp_path / "ledger.json"
    base = tmp_path / "base"
    assert main(_args(setup, base, ledger, "--max-steps", "4")) == 0
    bias = tmp_path / "bias"
    continue_run(base, bias, {"logit_bias": True})
    assert main(_args(setup, bias, ledger, "--max-steps", "8", "--logit-bias")) == 0
    assert (bias / "adapter" / "logit_bias.safetensors").is_file()
    assert json.loads((bias / "config.json").read_text())["logit_bias"] is True
    wide = tmp_path / "wide"
    continue_run(base, wide, {"context": 64})
    assert main(_args(setup, wide, ledger, "--max-steps", "8", context="64")) == 0
    steps = [r["step"] for r in _records(wide)]
    assert steps[:5] == [0, 1, 2, 3, 4] and steps[-1] == 8
    assert _entry(ledger, wide)["steps"] == 4
    # the child must train with the settings it was branched with
    other = tmp_path / "other"
    continue_run(base, other, {"context": 64})
    assert main(_args(setup, other, ledger, "--max-steps", "8")) == 2


def test_continuing_needs_a_trained_parent_and_changes_only_branchable_settings(setup, tmp_path):
    with pytest.raises(QwenliteError, match="no config.json"):
        continue_run(tmp_path / "nothing", tmp_path / "child")
    with pytest.raises(QwenliteError, match="cannot change lr"):
        continue_run(tmp_path / "nothing", tmp_path / "child", {"lr": 1.0})
    assert not (tmp_path / "child").exists()


def test_optimizer_state_follows_the_parameters_by_name():
    from qwenlite.training.checkpoint import _optimizer_state

    saved = {"state": {0: {"exp_avg": "a"}, 1: {"exp_avg": "b"}},
             "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    out = _optimizer_state(saved, ["a", "b"], ["a", "bias", "b"])
    assert out["state"] == {0: {"exp_avg": "a"}, 2: {"exp_avg": "b"}}
    assert out["param_groups"] == [{"lr": 0.1, "params": [0, 1, 2]}]
    with pytest.raises(KeyError):
        _optimizer_state(saved, ["a", "gone"], ["a"])


def test_a_kill_between_the_last_checkpoint_and_its_ledger_record_is_mended(setup, tmp_path):
    ledger = tmp_path / "ledger.json"
    run = tmp_path / "run"
    assert main(_args(setup, run, ledger, "--max-steps", "4")) == 0
    done = _entry(ledger, run)
    book = Ledger(ledger)
    book.record(str(run.resolve()), done["flops"] // 2, 2, status="running")  # as if killed
    assert main(_args(setup, run, ledger, "--max-steps", "4")) == 0  # already trained
    again = _entry(ledger, run)
    assert (again["status"], again["steps"], again["flops"]) == ("done", 4, done["flops"])


def test_a_run_resumes_from_another_path_to_the_same_files_but_not_from_other_data(setup,
                                                                                    tmp_path):
    import shutil

    weights, data = setup
    ledger = tmp_path / "ledger.json"
    run = tmp_path / "run"
    assert main(_args(setup, run, ledger, "--max-steps", "2")) == 0
    moved = tmp_path / "elsewhere" / "data.h5"  # another machine's checkout
    moved.parent.mkdir()
    shutil.copy(data, moved)
    assert main(_args((weights, moved), run, ledger, "--max-steps", "4")) == 0
    assert _records(run)[-1]["step"] == 4
    from conftest import make_forecasting_setup as other_setup

    _, other = other_setup(tmp_path / "other", 24, 20, seed=9)
    assert main(_args((weights, other), run, ledger, "--max-steps", "6")) == 2
