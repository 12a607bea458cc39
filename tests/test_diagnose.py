"""python -m qwenlite.diagnose: token classes, collapse detection, and a tiny run end to end."""

from __future__ import annotations

import json

import numpy as np
from conftest import make_forecasting_setup, requires_tokenizer

from qwenlite.data.llmtime import LLMTimeSettings
from qwenlite.diagnose import main
from qwenlite.evaluation.diagnosis import char_classes, collapsed


def test_every_character_gets_its_place():
    text = "12.34,0.05;3.10,11.00;"
    classes = char_classes(text, LLMTimeSettings(alpha=1.0))
    assert len(classes) == len(text)
    assert classes[:6] == ["tens", "units", "point", "dec1", "dec2", "var_sep"]
    assert classes[9:12] == ["dec2", "time_sep", "units"]
    assert [c for t, c in zip(text, classes) if t == ";"] == ["time_sep", "time_sep"]


def test_collapse_is_a_constant_value_or_a_constant_step():
    steady = np.array([[1.0, 2.0]] * 6)
    drift = np.array([[4.0 - 0.1 * i, 1.0 - 0.01 * i] for i in range(6)])
    wave = np.array([[np.sin(i), np.cos(i)] for i in range(6)])
    assert collapsed(np.round(steady, 2)) and collapsed(np.round(drift, 2))
    assert not collapsed(np.round(wave, 2))


@requires_tokenizer
def test_tiny_diagnosis_end_to_end(tmp_path):
    from qwenlite.train import main as train

    weights, data = make_forecasting_setup(tmp_path, 24, 20, seed=5)
    run = tmp_path / "run"
    assert train(["--weights", str(weights), "--data", str(data), "--out", str(run),
                  "--ledger", str(tmp_path / "l.json"), "--context", "48", "--batch", "2",
                  "--max-steps", "2", "--lr", "3e-2", "--device", "cpu", "--no-progress"]) == 0
    out = tmp_path / "diag"
    assert main(["--weights", str(weights), "--data", str(data), "--adapter", str(run),
                 "--systems", "2", "--context-steps", "6", "--horizon", "2", "--samples", "2",
                 "--out", str(out), "--ledger", str(tmp_path / "l.json"), "--no-progress"]) == 0
    result = json.loads((out / "diagnosis.json").read_text())
    for name in ("base", "adapter_model"):
        tf = result[name]["teacher_forced"]
        assert tf["nll"]["all"] > 0 and sum(tf["tokens"].values()) > 0
        assert {"greedy", "sample_median"} <= set(result[name])
        assert len(result[name]["greedy"]["mae_by_horizon"]) == 2
    # the adapter changes the measured NLL (it trained), and the ledger holds both models' FLOPS
    assert result["base"]["teacher_forced"]["nll"] != result["adapter_model"]["teacher_forced"]["nll"]
    entries = json.loads((tmp_path / "l.json").read_text())["entries"]
    diag = next(e for e in entries.values() if e["experiment"].startswith("diagnose"))
    assert diag["status"] == "done"
    assert diag["flops"] == result["base"]["flops"] + result["adapter_model"]["flops"]
