"""python -m qwenlite.report: the hand-typed-number check, the word count, the FLOPS table
against the ledgers, and the whole report regenerated from the committed results."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SHARED, TOKENIZER_JSON

from qwenlite.errors import QwenliteError
from qwenlite.experiments.collect import load_sweep
from qwenlite.experiments.latex import hand_typed_numbers, word_count
from qwenlite.report import check_tex, generate

DATA = SHARED / "data" / "lotka_volterra_data.h5"
RESULTS = ROOT / "report" / "results"


def test_hand_typed_numbers_are_found_and_generated_ones_pass():
    assert hand_typed_numbers(r"MAE \R{x.zeroshot.valmae} of Qwen2.5-0.5B in fp32") == []
    assert hand_typed_numbers(r"MAE 0.323 on 20 systems") == ["0.323", "20"]
    assert hand_typed_numbers(r"costs $mp(2n-1)$, $10$ for exp") == []  # formula constants
    assert hand_typed_numbers(r"loss $0.68$ and $512$") == ["0.68", "512"]
    assert hand_typed_numbers("% a comment with 42\n\\label{sec:3} text") == []
    assert hand_typed_numbers(r"\IfDone{final}{reached 0.19}{\R{a}}") == ["0.19"]


def test_word_count_skips_floats_captions_math_and_commands():
    tex = (r"\begin{document}\section{Intro} One two \emph{three} $x^2$ \R{k}."
           r"\begin{table}ignored words here\end{table}"
           r"\begin{figure}\caption{not {counted} either}\end{figure}\end{document}")
    assert word_count(tex) == 5  # Intro, One, two, three, one macro


def test_check_tex_refuses_typed_numbers_unknown_keys_and_long_text():
    body = "\\begin{document}%s\\end{document}"
    with pytest.raises(QwenliteError, match="by hand"):
        check_tex(body % "MAE 0.31", set())
    with pytest.raises(QwenliteError, match="nothing generates: nokey"):
        check_tex(body % r"MAE \R{nokey}", {"other"})
    with pytest.raises(QwenliteError, match="over 3"):
        check_tex(body % "a b c d", set(), max_words=3)
    assert check_tex(body % r"MAE \R{k}", {"k"}) == 2


def test_flops_table_rows_sum_to_the_ledgers():
    sweep = load_sweep(RESULTS)
    rows = sweep.ledger_rows()
    assert sum(r.total for r in rows) == sweep.ledger_total() > 0
    assert {r.source for r in rows} >= {"sweep", "diagnosis"}


@pytest.mark.skipif(not (DATA.is_file() and TOKENIZER_JSON.is_file()),
                    reason="needs ../shared's dataset and tokenizer")
def test_report_regenerates_from_the_committed_results(tmp_path):
    from qwenlite.data.tokenizer import Tokenizer

    out = tmp_path / "generated"
    info = generate(RESULTS, out, DATA, Tokenizer(TOKENIZER_JSON), ROOT / "report" / "main.tex")
    assert info["words"] <= 3000 and info["figures"] == 9
    for name in ("numbers.tex", "experiments.md", "table-flops.tex", "table-experiments.tex",
                 "loss_curves.pdf", "fig-halving-steps.pdf", "fig-halving-horizon.pdf",
                 "grid_heatmap.png", "forecasts.pdf", "horizon.pdf", "diagnosis.pdf"):
        assert (out / name).is_file(), name
    numbers = (out / "numbers.tex").read_text()
    sweep = load_sweep(RESULTS)
    zs = sweep.results["zeroshot"]["val"]["mae"]
    assert rf"\qwl@def{{x.zeroshot.valmae}}{{{zs:.3f}}}" in numbers
    # the bias alone has rank 0: a setting, shown as 0, not as pending
    assert r"\qwl@def{x.control-bias.rank}{0}" in numbers
    # every key main.tex reads is generated
    used = set(re.findall(r"\\R\{([^{}]*)\}", (ROOT / "report" / "main.tex").read_text()))
    defined = set(re.findall(r"\\qwl@def\{([^{}]*)\}", numbers))
    assert used - {"key"} <= defined
    # a failed regeneration leaves the previous output as it was
    before = sorted(p.name for p in out.iterdir())
    bad = tmp_path / "bad.tex"
    bad.write_text("\\begin{document}typed 0.5\\end{document}")
    with pytest.raises(QwenliteError):
        generate(RESULTS, out, DATA, Tokenizer(TOKENIZER_JSON), bad)
    assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("generated.")]


def test_spearman_and_the_grid_trend_numbers():
    from qwenlite.experiments.latex import Numbers
    from qwenlite.experiments.trends import grid_numbers, spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486833)  # ties: mean ranks
    sweep = load_sweep(RESULTS)
    n = Numbers()
    lrs = sweep.plan["scale"]["lrs"]
    grid_numbers(n, sweep, lrs)
    cells = [c for c in sweep.results if sweep.planned(c)["stage"] in ("grid", "default")]
    assert int(n.values["grid.n"]) == len(cells) >= 3
    at_first = [sweep.results[c]["val_loss"] for c in cells
                if sweep.results[c]["settings"]["lr"] == lrs[0]]
    assert float(n.values["grid.lr1.loss"]) == pytest.approx(sum(at_first) / len(at_first),
                                                             abs=5e-4)
    assert -1 <= float(n.values["grid.spearman"]) <= 1


def test_paired_numbers_compare_the_same_systems_and_say_when_noise_covers_it():
    from qwenlite.experiments.latex import Numbers
    from qwenlite.experiments.trends import compare, paired_numbers, shorter_twin, system_mae

    sweep = load_sweep(RESULTS)
    n = Numbers()
    paired_numbers(n, sweep)
    grid = sweep.choices["stages"]["grid"]["chosen"]
    ids, ours = system_mae(sweep, grid, "val")
    _, zero = system_mae(sweep, "zeroshot", "val")
    # the per-system MAEs average to the recorded means
    assert ours.mean() == pytest.approx(sweep.results[grid]["val"]["mae"], rel=1e-9)
    assert zero.mean() == pytest.approx(sweep.results["zeroshot"]["val"]["mae"], rel=1e-9)
    assert int(n.values["pair.grid.n"]) == len(ids)
    assert int(n.values["pair.grid.lower"]) == int((ours < zero).sum())
    assert int(n.values["pair.grid.ties"]) == int((ours == zero).sum())
    assert int(n.values["pair.grid.higher"]) == int((ours > zero).sum())
    top = int(n.values["pair.grid.top"])
    hardest = np.argsort(-(ours + zero))[:top]  # hardest for both, not for zero-shot alone
    topdiff = float(n.values["pair.grid.topdiff"].replace("$-$", "-").replace("$+$", ""))
    assert topdiff == pytest.approx((ours[hardest] - zero[hardest]).sum() / len(ids), abs=6e-4)
    diff = float(n.values["pair.grid.diff"].replace("$-$", "-").replace("$+$", ""))
    assert diff == pytest.approx(ours.mean() - zero.mean(), abs=6e-4)
    lo, hi = (float(n.values[f"pair.grid.{k}"].replace("$-$", "-").replace("$+$", ""))
              for k in ("lo", "hi"))
    verdict = "lower than" if hi < 0 else "higher than" if lo > 0 else "indistinguishable from"
    assert lo <= diff <= hi and n.values["pair.grid.verdict"] == verdict
    # a shorter twin shares the recipe and has fewer steps; pending until the final exists
    twin = shorter_twin(sweep, "final")
    if "final" in sweep.results:
        assert twin is None or sweep.results[twin]["settings"]["steps"] < \
            sweep.results["final"]["settings"]["steps"]
    else:
        assert twin is None and n.values["pair.steps.diff"] == r"\textit{pending}"

    class Mismatched:  # two evaluations of different systems must not be paired
        def predictions(self, name, split):
            systems = np.arange(3) + (name == "b")
            return {"systems": systems, "pred_qwen": np.zeros((3, 2, 2)),
                    "truth": np.ones((3, 2, 2))}

    with pytest.raises(QwenliteError, match="different val systems"):
        compare(Numbers(), "pair.x", Mismatched(), "a", "b", "val")


def test_the_final_model_against_its_shorter_twin(tmp_path):
    """A final model that replays a finished run's recipe for more steps: the twin is found,
    the replayed steps, their loss difference and cost are reported, and a forecaster paired
    with itself differs by exactly nothing."""
    import json
    import shutil

    from qwenlite.experiments.latex import Numbers, sci
    from qwenlite.experiments.trends import (
        horizon_numbers,
        paired_numbers,
        replay_numbers,
        shorter_twin,
    )

    root = tmp_path / "results"
    shutil.copytree(RESULTS, root)
    shutil.rmtree(root / "final", ignore_errors=True)
    twin = load_sweep(root).choices["stages"]["context"]["chosen"]
    result = json.loads((root / twin / "result.json").read_text())
    steps = result["settings"]["steps"]
    result.update(name="final", stage="final")
    result["settings"].update(name="final", stage="final", steps=2 * steps, test=True)
    (root / "final" / "train").mkdir(parents=True)
    (root / "final" / "result.json").write_text(json.dumps(result))
    shutil.copy(root / twin / "train" / "config.json", root / "final" / "train" / "config.json")
    curve = [json.loads(x) for x in (root / twin / "train" / "metrics.jsonl").read_text()
             .splitlines()]
    more = [dict(r, step=r["step"] + steps) for r in curve if r["step"] > 0]
    curve[3] = dict(curve[3], loss=curve[3]["loss"] + 0.25)  # one replayed step differs
    (root / "final" / "train" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in curve + more))
    shutil.copytree(root / twin / "eval-val", root / "final" / "eval-val")
    shutil.copytree(root / "zeroshot" / "eval-test", root / "final" / "eval-test")
    sweep = load_sweep(root)
    assert shorter_twin(sweep, "final") == twin
    n = Numbers()
    paired_numbers(n, sweep)
    replay_numbers(n, sweep)
    assert int(n.values["replay.steps"]) == steps
    assert n.values["replay.maxdiff"] == r"\ensuremath{2.50\times10^{-1}}"
    last = curve[-1]
    assert n.values["replay.minutes"] == f"{last['seconds'] / 60:.0f}"
    assert n.values["replay.flops"] == sci(last["flops"])
    assert (n.values["pair.steps.from"], n.values["pair.steps.to"]) == (str(steps), str(2 * steps))
    for key in ("pair.steps", "pair.final"):  # the same forecasts: no difference, all tied
        assert n.values[f"{key}.diff"] == "0.000" and n.values[f"{key}.verdict"] == \
            "indistinguishable from"
        assert n.values[f"{key}.ties"] == n.values[f"{key}.n"]
    # error by horizon: the first and last quarter of the steps, the twin's under its own label
    horizon_numbers(n, sweep)
    h = sweep.plan["scale"]["horizon"]
    q = h // 4
    assert (n.values["hz.early"], n.values["hz.late"]) == (f"1--{q}", f"{h - q + 1}--{h}")
    pred = sweep.predictions("zeroshot", "val")
    err = np.abs(pred["pred_qwen"] - pred["truth"])
    assert float(n.values["hz.zeroshot.val.early"]) == pytest.approx(err[:, :q].mean(), abs=6e-4)
    assert float(n.values["hz.zeroshot.val.late"]) == pytest.approx(err[:, -q:].mean(), abs=6e-4)
    assert n.values["hz.final.val.late"] == n.values["hz.twin.val.late"]  # the same forecasts
    assert n.values[f"hz.{twin}.test.early"] == r"\textit{n/a}"  # scored on validation only
    # another seed is another recipe: no twin, and the comparison is pending
    config = json.loads((root / "final" / "train" / "config.json").read_text())
    (root / "final" / "train" / "config.json").write_text(json.dumps({**config, "seed": 1}))
    assert shorter_twin(load_sweep(root), "final") is None


def test_elapsed_training_time_counts_every_resumed_segment():
    from qwenlite.experiments.trends import elapsed

    curve = [{"step": 0, "val_loss": 1.0}, {"step": 1, "seconds": 10.0},
             {"step": 2, "seconds": 20.0}, {"step": 3, "seconds": 4.0},  # resumed after step 2
             {"step": 4, "seconds": 9.0}]
    assert elapsed(curve, 4) == pytest.approx(29.0)
    assert elapsed(curve, 2) == pytest.approx(20.0)


def test_the_report_finds_the_sweeps_data_without_flags(tmp_path, capsys, monkeypatch):
    """No --data: the report reads the dataset the sweep's plan.json records; a recorded file
    that is not here is one line naming it."""
    import json

    from qwenlite.report import main, sweep_data

    recorded = json.loads((RESULTS / "plan.json").read_text())["data"]
    assert sweep_data(RESULTS).name == Path(recorded).name
    assert main(["--results", str(RESULTS), "--out", str(tmp_path / "gen"),
                 "--tokenizer", str(TOKENIZER_JSON)]) == 0
    assert "report:" in capsys.readouterr().out
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "plan.json").write_text(json.dumps({"data": str(tmp_path / "gone.h5")}))
    assert main(["--results", str(moved), "--out", str(tmp_path / "gen2"),
                 "--tokenizer", str(TOKENIZER_JSON)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gone.h5" in err and "--data" in err
    assert not (tmp_path / "gen2").exists()


def test_every_halving_key_the_report_reads_is_defined_before_the_sweep_starts(tmp_path):
    from qwenlite.experiments.decisive import halving_numbers, load_halving
    from qwenlite.experiments.latex import Numbers

    n = Numbers()
    assert load_halving(tmp_path) is None  # no halving/plan.json here
    assert "not started" in halving_numbers(n, None)
    used = set(re.findall(r"\\R\{(h\.[^{}]*)\}", (ROOT / "report" / "main.tex").read_text()))
    assert used and used <= set(n.values)
    assert all(v == r"\textit{pending}" for v in n.values.values())


def test_the_replay_numbers_say_what_repeated_and_what_did_not(tmp_path):
    import json

    from qwenlite.experiments.decisive import REPRO, repro_numbers
    from qwenlite.experiments.latex import Numbers

    def log(path, losses):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"step": s, "loss": x}) + "\n"
                                for s, x in losses.items()))

    def preds(path, pred):
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, systems=np.arange(len(pred)), pred_qwen=pred)

    n = Numbers()
    repro_numbers(n, tmp_path)
    assert n["repro.same"] == r"\textit{pending}" and "repro" not in n.done
    run, root = tmp_path / "halving" / "context-768", tmp_path / REPRO
    before = {1: 0.9, 2: 0.8}
    log(run / "train" / "metrics.jsonl", before | {3: 0.5, 4: 0.4, 5: 0.3})
    log(root / "train-from-950" / "metrics.jsonl", before | {3: 0.5, 4: 0.41})  # step 4 differs
    log(root / "session19-steps-951-959.jsonl", {1: 0.9, 3: 0.4, 4: 0.41, 5: 0.2})
    (root / "train-from-950" / "origin.json").write_text(json.dumps({"step": 2}))
    committed = np.random.default_rng(0).random((6, 4, 2))
    rescored = committed[:4].copy()
    rescored[2, 3, 1] += 0.01  # one system's last value differs
    preds(run / "eval-val" / "predictions.npz", committed)
    n = Numbers()
    repro_numbers(n, tmp_path)  # no rescored forecasts yet
    assert n["repro.steps"] == r"\textit{pending}" and "repro" not in n.done
    preds(root / "eval-val-20" / "predictions.npz", rescored)
    n = Numbers()
    repro_numbers(n, tmp_path)
    assert (n["repro.steps"], n["repro.same"]) == ("2", "1")  # after the checkpoint only
    assert n["repro.other"] == r"25.0\%"  # step 3: |0.5 - 0.4| / 0.4
    assert (n["repro.evaln"], n["repro.evalsame"]) == ("4", "3")
    assert "repro" in n.done
    np.savez(root / "eval-val-20" / "predictions.npz", systems=np.arange(1, 5), pred_qwen=rescored)
    with pytest.raises(QwenliteError, match="other systems"):
        repro_numbers(Numbers(), tmp_path)
