"""python -m qwenlite.train on a tiny model: learning, exact resumption, the ledger, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, make_forecasting_setup, requires_tokenizer

from qwenlite.flops import forward_flops, train_step_flops
from qwenlite.model import load_model
from qwenlite.train import main
from qwenlite.training.ledger import Ledger
from qwenlite.training.lora import apply_lora

pytestmark = requires_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_forecasting_setup(tmp_path_factory.mktemp("train"), 24, 20, seed=1)


def _args(setup, run_dir, ledger, *extra):
    weights, data = setup
    return ["--weights", str(weights), "--data", str(data), "--out", str(run_dir),
            "--ledger", str(ledger), "--context", "48", "--batch", "2", "--device", "cpu",
            "--no-progress", *extra]


def _losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_the_run(setup, tmp_path):
    run = tmp_path / "run"
    ledger = tmp_path / "ledger.json"
    assert main(_args(setup, run, ledger, "--lr", "3e-3", "--max-steps", "12",
                      "--eval-interval", "6", "--save-interval", "4")) == 0
    records = _losses(run)
    assert [r["step"] for r in records] == list(range(0, 13))
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 3 and vals[2] < vals[1] < vals[0]  # untrained, step 6, step 12
    steps = [r for r in records if "loss" in r]
    assert sum(r["loss"] for r in steps[-3:]) < sum(r["loss"] for r in steps[:3])
    for name in ("config.json", "llmtime.json", "split.json", "state.pt",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    settings = json.loads((run / "llmtime.json").read_text())
    assert settings["alpha"] > 0
    # the ledger holds exactly this run's FLOPS: 12 steps by the 3x rule plus 3 validations
    weights, _ = setup
    model = load_model(weights)
    apply_lora(model, 4)
    step = train_step_flops(model, 48, 2).rule
    entry = next(iter(Ledger(ledger).load()["entries"].values()))
    assert entry["status"] == "done" and entry["steps"] == 12
    assert entry["flops"] == records[-1]["flops"]
    val = forward_flops(model, 48, loss=True).total()
    assert 12 * step < entry["flops"] <= 12 * step + 3 * 64 * val


def _run_cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen([sys.executable, "-m", "qwenlite.train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_kill_9_and_resume_gives_the_identical_loss_curve(setup, tmp_path):
    ledger = tmp_path / "ledger.json"
    common = ("--lr", "3e-3", "--max-steps", "10", "--eval-interval", "5", "--save-interval", "2")
    ref = tmp_path / "ref"
    assert main(_args(setup, ref, ledger, *common)) == 0

    run = tmp_path / "killed"
    proc = _run_cli(_args(setup, run, ledger, *common))
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len(_losses_safe(run)) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(_losses_safe(run))
    assert 5 <= done_before < 10, "the run should have been killed mid-way"
    assert main(_args(setup, run, ledger, *common)) == 0
    assert [r.get("loss") for r in _losses(run)] == [r.get("loss") for r in _losses(ref)]
    assert [r.get("val_loss") for r in _losses(run)] == [r.get("val_loss") for r in _losses(ref)]
    entries = Ledger(ledger).load()["entries"]
    assert len(entries) == 2  # the resumed run updated its own entry
    flops = sorted(e["flops"] for e in entries.values())
    assert flops[0] == flops[1]  # ...and is charged exactly what the uninterrupted run was


def _losses_safe(run_dir):
    try:
        return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (json.JSONDecodeError, FileNotFoundError):
        return []


def test_ledger_refuses_an_over_budget_run(setup, tmp_path, capsys):
    code = main(_args(setup, tmp_path / "run", tmp_path / "ledger.json", "--max-steps", "100",
                      "--budget", "1e9"))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "budget" in err[0] and "steps would fit" in err[0]
    assert not list(tmp_path.iterdir())  # no run directory, no ledger, no lock file


@pytest.mark.parametrize("extra, message", [
    (("--rank", "0"), "trains nothing"),
    (("--rank", "-1"), "non-negative integer"),
    (("--context", "100000"), "larger than every series"),
    (("--lr", "abc"), "positive number"),
    (("--dtype", "fp16"), "invalid choice"),
])
def test_bad_input_is_one_line(setup, tmp_path, extra, message):
    proc = _run_cli(_args(setup, tmp_path / "run", tmp_path / "l.json", "--max-steps", "2",
                          *extra))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert message in err
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_missing_weights_and_corrupt_checkpoint(setup, tmp_path, capsys):
    weights, data = setup
    assert main(["--weights", str(tmp_path / "nope"), "--data", str(data),
                 "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    run, ledger = tmp_path / "run", tmp_path / "ledger.json"
    args = _args(setup, run, ledger, "--max-steps", "4", "--save-interval", "2")
    assert main(args) == 0
    saved = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    # a corrupt newest checkpoint: the previous one is used, nothing is lost
    (run / "state.pt").write_bytes(b"garbage")
    args6 = _args(setup, run, ledger, "--max-steps", "6", "--save-interval", "2")
    assert main(args6) == 0
    assert "unreadable" in capsys.readouterr().err
    assert [r["step"] for r in _losses(run)] == list(range(0, 7))
    # both corrupt: one clear line, and the run directory is left as it was
    (run / "state.pt").write_bytes(b"garbage")
    (run / "state.prev.pt").write_bytes(b"garbage")
    before = sorted(p.name for p in run.rglob("*"))
    assert main(_args(setup, run, ledger, "--max-steps", "8")) == 2
    assert "no readable checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in run.rglob("*")) == before
    assert saved  # the earlier adapter export existed
    # no checkpoint at all beside the adapter (deleted by a sweep): refused, not trained afresh
    (run / "state.pt").unlink()
    (run / "state.prev.pt").unlink()
    assert main(_args(setup, run, ledger, "--max-steps", "8")) == 2
    assert "no checkpoint to go on from" in capsys.readouterr().err
    assert sorted(p.name for p in run.rglob("*")) == sorted(set(before) - {"state.pt",
                                                                         "state.prev.pt"})


def test_changed_settings_are_refused(setup, tmp_path, capsys):
    run, ledger = tmp_path / "run", tmp_path / "ledger.json"
    assert main(_args(setup, run, ledger, "--max-steps", "2")) == 0
    assert main(_args(setup, run, ledger, "--max-steps", "2", "--rank", "8")) == 2
    assert "rank=4" in capsys.readouterr().err


@pytest.mark.parametrize("rank", ["0", "2"])
def test_logit_bias_trains_saves_loads_and_resumes(setup, tmp_path, rank):
    """--logit-bias alone (rank 0) and beside LoRA: the bias trains, is saved with the adapter,
    is counted in the FLOPS, loads back through load_adapter, and resumes exactly."""
    from safetensors.torch import load_file

    from qwenlite.flops import counting_model
    from qwenlite.model.config import QwenConfig
    from qwenlite.training.lora import load_adapter, lora_layers

    ledger = tmp_path / "ledger.json"
    common = ("--lr", "3e-2", "--rank", rank, "--logit-bias", "--max-steps", "6",
              "--eval-interval", "3", "--save-interval", "2")
    ref = tmp_path / "ref"
    assert main(_args(setup, ref, ledger, *common)) == 0
    bias = load_file(str(ref / "adapter" / "logit_bias.safetensors"))["lm_head.bias"]
    assert bias.abs().max() > 0  # it trained
    assert (ref / "adapter" / "adapter_config.json").is_file() == (rank != "0")
    vals = [r["val_loss"] for r in _losses(ref) if "val_loss" in r]
    assert vals[-1] < vals[0]
    # the FLOPS of a step count the bias: one add per logit
    weights, _ = setup
    config = QwenConfig.from_json(weights / "config.json")
    lora = None if rank == "0" else int(rank)
    with_bias = train_step_flops(counting_model(config, lora, logit_bias=True), 48, 2).rule
    without = train_step_flops(counting_model(config, lora), 48, 2).rule
    assert with_bias - without == 3 * 2 * 48 * config.vocab_size
    assert _losses(ref)[1]["flops"] - _losses(ref)[0]["flops"] == with_bias
    # loads back: the model's logits carry the bias
    model = load_model(weights)
    load_adapter(model, ref / "adapter")
    assert model.lm_head.bias is not None and bool((lora_layers(model) != {}) == (rank != "0"))
    import torch
    torch.testing.assert_close(model.lm_head.bias.detach(), bias)
    # resumes: a run stopped at step 4 and rerun to 6 equals the uninterrupted one
    run = tmp_path / "resumed"
    stop = [c if c != "6" else "4" for c in common]
    assert main(_args(setup, run, ledger, *stop)) == 0
    assert main(_args(setup, run, ledger, *common)) == 0
    assert [r.get("loss") for r in _losses(run)] == [r.get("loss") for r in _losses(ref)]
    resumed = load_file(str(run / "adapter" / "logit_bias.safetensors"))["lm_head.bias"]
    assert torch.equal(resumed, bias)


@pytest.mark.parametrize("flags, device, expected", [
    ({"avx2", "fma"}, "cpu", "fp32"),             # bf16 would be emulated
    ({"avx2", "avx512f", "avx512_bf16"}, "cpu", "bf16"),
    ({"avx2", "amx_bf16", "amx_tile"}, "cpu", "bf16"),
    (set(), "cpu", "fp32"),                       # no /proc/cpuinfo: the safe choice
    ({"avx2"}, "cuda", "bf16"),
    ({"avx2"}, "mps", "bf16"),
])
def test_dtype_auto_resolves_per_device(monkeypatch, flags, device, expected):
    from qwenlite.accel import emulation
    from qwenlite.cli import pick_dtype

    monkeypatch.setattr(emulation, "cpu_flags", lambda: set(flags))
    assert pick_dtype("auto", device) == expected
    assert pick_dtype("fp32", device) == "fp32" and pick_dtype("bf16", device) == "bf16"


def test_dtype_auto_is_recorded_and_a_resume_keeps_it(setup, tmp_path, monkeypatch):
    """A run started with --dtype auto records the dtype it resolved to; resumed with auto on a
    machine that would pick the other, it goes on in the recorded one."""
    from qwenlite.accel import emulation

    run, ledger = tmp_path / "run", tmp_path / "ledger.json"
    monkeypatch.setattr(emulation, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert main(_args(setup, run, ledger, "--max-steps", "2", "--save-interval", "1")) == 0
    assert json.loads((run / "config.json").read_text())["dtype"] == "bf16"
    monkeypatch.setattr(emulation, "cpu_flags", lambda: {"avx2"})
    assert main(_args(setup, run, ledger, "--max-steps", "3", "--dtype", "auto")) == 0
    assert json.loads((run / "config.json").read_text())["dtype"] == "bf16"
    assert [r["step"] for r in _losses(run)][-1] == 3
    fresh = tmp_path / "fresh"  # a new run on that machine resolves to fp32
    assert main(_args(setup, fresh, ledger, "--max-steps", "1")) == 0
    assert json.loads((fresh / "config.json").read_text())["dtype"] == "fp32"


def test_the_start_line_estimates_from_the_last_run_here(setup, tmp_path, capsys, monkeypatch):
    """Before a step runs, train prints its FLOPS, their share of the budget and an estimated
    time; the first run here estimates from a matmul probe, the next from the rate it reached."""
    from qwenlite import rates

    monkeypatch.setenv("QWENLITE_RATES", str(tmp_path / "rates.json"))
    run, ledger = tmp_path / "run", tmp_path / "ledger.json"
    assert main(_args(setup, run, ledger, "--max-steps", "30", "--dtype", "fp32")) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if "estimated" in x)
    assert "of the 1e+17 budget" in line and "fp32" in line and "matmul probe" in line
    weights, _ = setup
    model = load_model(weights)
    rate = rates.recorded("train", "fp32", "cpu", model)
    assert rate and rate > 0
    assert main(_args(setup, tmp_path / "next", ledger, "--max-steps", "30",
                      "--dtype", "fp32")) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if "estimated" in x)
    assert "the last such run on this machine" in line
    second = rates.recorded("train", "fp32", "cpu", model)
    assert second != rate  # the second run's rate replaced the first's, and estimates from now on
    assert rates.estimate("train", 1e12, "fp32", "cpu", model)[0] == pytest.approx(1e12 / second)
    assert rates.recorded("train", "bf16", "cpu", model) is None  # another dtype: not timed yet


def test_metrics_gap_finds_steps_the_log_lost_but_the_checkpoint_holds(tmp_path):
    from qwenlite.training.metrics_log import gap as metrics_gap

    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "val_loss": 1.0}] + [{"step": s, "loss": 0.5} for s in range(1, 11)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert metrics_gap(path, 10) is None
    assert metrics_gap(path, 0) is None
    assert metrics_gap(path, 14) == (11, 14)          # the log stops before the checkpoint
    holed = [x for x in lines if not 4 <= x["step"] <= 6] + [{"step": 6, "val_loss": 0.9}]
    path.write_text("".join(json.dumps(x) + "\n" for x in holed))
    assert metrics_gap(path, 10) == (4, 6)            # a validation line is not a step line
    assert metrics_gap(tmp_path / "absent.jsonl", 10) is None
