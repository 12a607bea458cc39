"""python -m qwenlite.evaluate on a tiny model: parse failures, batching, outputs, the ledger."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_forecasting_setup, requires_tokenizer

from qwenlite.data import load_dataset
from qwenlite.data.llmtime import LLMTimeSettings, encode, fit_alpha
from qwenlite.data.tokenizer import Tokenizer
from qwenlite.evaluate import main
from qwenlite.evaluation.forecasting import llm_forecast
from qwenlite.model import load_model
from qwenlite.training.ledger import Ledger

pytestmark = requires_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_forecasting_setup(tmp_path_factory.mktemp("eval"), 30, 24, seed=2)


def test_garbage_output_is_counted_not_fatal(setup):
    weights, data = setup
    model, tok = load_model(weights), Tokenizer(weights)
    traj = load_dataset(data).trajectories.astype(float)
    settings = fit_alpha(traj, LLMTimeSettings())
    fc = llm_forecast(model, tok, settings, traj[:5, :10], 4, batch=5, progress=False,
                      constrained=False)
    assert fc.values.shape == (5, 4, 2) and np.isfinite(fc.values).all()
    # a random tiny model writes digits and separators in no valid order
    assert fc.n_missing.sum() + fc.n_invalid.sum() > 0
    assert all(set(t) <= set("0123456789.,;") for t in fc.texts)
    assert fc.flops > 0
    assert not fc.n_masked.any()


def test_the_grammar_makes_every_forecast_parse_and_counts_what_it_changed(setup):
    from qwenlite.data.llmtime import decode, grammar

    weights, data = setup
    model, tok = load_model(weights), Tokenizer(weights)
    traj = load_dataset(data).trajectories.astype(float)
    settings = fit_alpha(traj, LLMTimeSettings())
    free = llm_forecast(model, tok, settings, traj[:5, :10], 4, batch=5, progress=False,
                        constrained=False)
    fc = llm_forecast(model, tok, settings, traj[:5, :10], 4, batch=5, progress=False)
    g = grammar(settings)
    assert all(g.accepts(t) for t in fc.texts)
    assert all(decode(t, settings).n_steps == 4 for t in fc.texts)
    assert not fc.n_missing.any() and not fc.n_invalid.any()
    # the systems whose free forecast left the grammar are exactly those the mask changed
    left = np.array([not g.accepts(t) for t in free.texts])
    assert left.any()
    np.testing.assert_array_equal(fc.n_masked > 0, left)
    assert (fc.n_masked <= 4).all()
    for t_free, t_fc, masked in zip(free.texts, fc.texts, fc.n_masked):
        if not masked:
            assert t_free == t_fc


def test_batched_forecasts_equal_one_by_one(setup):
    weights, data = setup
    model, tok = load_model(weights), Tokenizer(weights)
    traj = load_dataset(data).trajectories.astype(float)
    settings = fit_alpha(traj, LLMTimeSettings())
    contexts = traj[:3, :8].copy()
    contexts[1] *= 8  # two-digit scaled values: a longer prompt, so the batch is left-padded
    lengths = {len(tok.encode(encode(c, settings)))
               for c in contexts}
    assert len(lengths) > 1
    batched = llm_forecast(model, tok, settings, contexts, 3, batch=3, progress=False)
    single = llm_forecast(model, tok, settings, contexts, 3, batch=1, progress=False)
    assert batched.texts == single.texts
    np.testing.assert_array_equal(batched.values, single.values)


def test_cli_writes_metrics_predictions_figures_and_ledger(setup, tmp_path, capsys):
    weights, data = setup
    ledger = tmp_path / "ledger.json"
    out = tmp_path / "eval"
    code = main(["--weights", str(weights), "--data", str(data), "--context-steps", "12",
                 "--horizon", "4", "--systems", "4", "--out", str(out), "--ledger", str(ledger),
                 "--device", "cpu", "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["systems"] == 4
    assert set(metrics["results"]) == {"qwen", "persistence", "linear", "lv_ode"}
    assert len(metrics["results"]["qwen"]["by_horizon"]["mae"]) == 4
    for name in ("predictions.npz", "forecasts.png", "error_vs_horizon.png"):
        assert (out / name).is_file()
    preds = np.load(out / "predictions.npz")
    assert preds["truth"].shape == (4, 4, 2) and preds["pred_qwen"].shape == (4, 4, 2)
    entry = next(iter(Ledger(ledger).load()["entries"].values()))
    assert entry["kind"] == "eval" and entry["flops"] == metrics["generation_flops"] > 0
    assert entry["tokens"] > 4 * 12 * 10  # at least the prompts: 4 systems, 12 steps, ~10 each
    # the validation systems are the split's, and never the test ones unless asked
    from qwenlite.data import split_systems

    split = split_systems(30, seed=0)
    assert preds["systems"].tolist() == list(split.val[:4])
    assert "qwen" in capsys.readouterr().out


def test_samples_give_crps_and_test_split_needs_asking(setup, tmp_path):
    weights, data = setup
    out = tmp_path / "eval"
    code = main(["--weights", str(weights), "--data", str(data), "--context-steps", "10",
                 "--horizon", "3", "--systems", "3", "--samples", "3", "--split", "test",
                 "--out", str(out), "--ledger", str(tmp_path / "l.json"), "--device", "cpu",
                 "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and "crps" in metrics["results"]["qwen"]
    assert np.load(out / "predictions.npz")["samples"].shape == (3, 3, 3, 2)


@pytest.mark.parametrize("extra, message", [
    (["--context-steps", "90", "--horizon", "20"], "exceed"),
    (["--samples", "2", "--temperature", "0"], "temperature"),
    (["--adapter", "/nonexistent", "--context-steps", "10", "--horizon", "3"], "does not exist"),
    (["--adapter", "/", "--context-steps", "10", "--horizon", "3"],
     "not a training run directory"),
    (["--split", "train"], "invalid choice"),
    (["--adapter-scale", "0.5"], "pass --adapter"),
    (["--adapter-scale", "-1"], "non-negative"),
])
def test_bad_input(setup, tmp_path, capsys, extra, message):
    weights, data = setup
    code = main(["--weights", str(weights), "--data", str(data), "--out",
                 str(tmp_path / "e"), "--ledger", str(tmp_path / "l.json"), *extra])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not list(tmp_path.iterdir())  # refused before the output directory or the ledger


def test_adapter_run_uses_its_split_and_alpha(setup, tmp_path):
    from qwenlite.data import Split
    from qwenlite.train import main as train

    weights, data = setup
    run = tmp_path / "run"
    assert train(["--weights", str(weights), "--data", str(data), "--out", str(run),
                  "--ledger", str(tmp_path / "l.json"), "--context", "48", "--batch", "2",
                  "--max-steps", "2", "--seed", "5", "--lr", "1e-2", "--no-progress"]) == 0
    out = tmp_path / "eval"
    assert main(["--weights", str(weights), "--data", str(data), "--adapter", str(run),
                 "--context-steps", "10", "--horizon", "3", "--systems", "3", "--out", str(out),
                 "--ledger", str(tmp_path / "l.json"), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["alpha"] == json.loads((run / "llmtime.json").read_text())["alpha"]
    systems = np.load(out / "predictions.npz")["systems"].tolist()
    assert systems == Split.load(run / "split.json").val[:3].tolist()


def test_a_scaled_adapter_scores_between_the_base_model_and_the_adapter(setup, tmp_path):
    """--adapter-scale 0 forecasts exactly as the base model; 1 as the adapter as trained."""
    from qwenlite.train import main as train

    weights, data = setup
    run = tmp_path / "run"
    assert train(["--weights", str(weights), "--data", str(data), "--out", str(run),
                  "--ledger", str(tmp_path / "l.json"), "--context", "48", "--batch", "2",
                  "--max-steps", "3", "--seed", "5", "--lr", "3e-2", "--logit-bias",
                  "--no-progress"]) == 0

    def forecast(name, *extra):
        out = tmp_path / name
        assert main(["--weights", str(weights), "--data", str(data), "--adapter", str(run),
                     "--context-steps", "10", "--horizon", "3", "--systems", "4", "--out",
                     str(out), "--ledger", str(tmp_path / "l.json"), "--no-progress",
                     *extra]) == 0
        return np.load(out / "predictions.npz"), json.loads((out / "metrics.json").read_text())

    trained, m1 = forecast("one")
    same, _ = forecast("one-again", "--adapter-scale", "1")
    none, m0 = forecast("zero", "--adapter-scale", "0")
    assert m1["adapter_scale"] == 1 and m0["adapter_scale"] == 0
    np.testing.assert_array_equal(same["pred_qwen"], trained["pred_qwen"])
    # λ = 0 is the base model: the zero-shot forecasts of the same systems (same split, same α)
    from qwenlite.data import Split
    from qwenlite.data.llmtime import LLMTimeSettings

    model, tok = load_model(weights), Tokenizer(weights)
    traj = load_dataset(data).trajectories.astype(float)
    systems = Split.load(run / "split.json").val[:4]
    base = llm_forecast(model, tok, LLMTimeSettings.load(run / "llmtime.json"),
                        traj[systems, :10], 3, batch=32, progress=False)
    assert list(none["texts"]) == base.texts
    assert list(trained["texts"]) != base.texts  # the adapter changed something to scale
