"""The successive-halving protocol on a tiny sweep: its plan, promotion and continuation, the
ledger charging each step once, the dtype the calibration decides, the final model's steps
chosen by validation forecast error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_forecasting_setup, requires_tokenizer

from qwenlite.errors import QwenliteError
from qwenlite.experiments import halving
from qwenlite.experiments.plan import SCALES, build_plan, load_scale
from qwenlite.model.config import QwenConfig
from qwenlite.sweep import main
from qwenlite.training.ledger import Ledger

TINY = {"base": "halving", "lrs": [3e-3, 1e-3], "ranks": [2, 4], "contexts": [32, 48],
        "default": [3e-3, 2, 48], "rungs": [2, 4], "keep": 2, "branch_steps": 2,
        "checkpoints": [8, 10], "final_steps": 10, "adapter_scales": [0.5], "eval_interval": 2,
        "eval_windows": 2,
        "val_systems": 3, "test_systems": 3, "context_steps": 6, "horizon": 2, "eval_batch": 3,
        "dtype": "fp32", "shares_budget_with": []}


@pytest.fixture(scope="module")
def trajectories():
    from qwenlite.data import simulate

    return simulate(n_systems=1000, n_points=100, seed=3)[0]


def test_the_halving_plan_for_this_machine_spends_half_the_budget(trajectories):
    plan = build_plan(SCALES["halving"], QwenConfig.from_name("qwen2.5-0.5b"), trajectories)
    plan.check()
    assert 5e16 <= plan.total_flops <= 1e17
    stages = plan.stages()
    assert list(stages) == ["calibration", "zeroshot", "rung1", "rung2", "branch", "final",
                            "remedy", "test"]
    assert [e.adapter_scale for e in stages["remedy"]] == [0.5, 0.75, 1.25]
    assert all(e.parent == "@final:1" and plan.costs[e.name].train_flops == 0
               and plan.costs[e.name].eval_flops > 0 for e in stages["remedy"])
    assert stages["test"][0].parent == "@remedy:1"
    assert len(stages["rung1"]) == 9 and len(stages["rung2"]) == 3
    assert [e.parent for e in stages["rung2"]] == ["@rung1:1", "@rung1:2", "@rung1:3"]
    assert stages["final"][-1].steps == plan.scale.final_steps >= 2500
    # each experiment is charged only the steps after its parent's
    from qwenlite.flops import counting_model, forward_flops, train_step_flops

    model = counting_model(QwenConfig.from_name("qwen2.5-0.5b"), 8)
    step = train_step_flops(model, 512, 4).rule
    val = forward_flops(model, 512, loss=True).total() * plan.scale.eval_windows
    # 150 -> 600: 450 steps and the validations at 200, 250, ..., 600 (150's was the parent's)
    assert plan.costs["r2-1"].train_flops == 450 * step + 9 * val
    rows = plan.to_dict()["experiments"]
    assert {r["stage"] for r in rows} >= {"rung1", "rung2"} and all("parent" in r for r in rows)


def test_a_halving_scale_must_line_up():
    with pytest.raises(QwenliteError, match="must grow"):
        load_scale("halving", rungs=(600, 150))
    with pytest.raises(QwenliteError, match="last checkpoint"):
        load_scale("halving", final_steps=5000)
    with pytest.raises(QwenliteError, match="multiple of eval_interval"):
        load_scale("halving", rungs=(155, 600))
    for lams in ((1.0,), (0.5, 0.5), (-0.5,), (0.3, 0.3000001)):
        with pytest.raises(QwenliteError, match="adapter_scales"):
            load_scale("halving", adapter_scales=lams)


def test_a_sweep_takes_a_stage_added_after_it_started_but_no_other_plan(trajectories, tmp_path):
    from qwenlite.experiments.plan import check_same_plan, save_plan

    config = QwenConfig.from_name("qwen2.5-0.5b")
    old = build_plan(load_scale("halving", adapter_scales=()), config, trajectories)
    save_plan(old, tmp_path / "plan.json")
    raw = json.loads((tmp_path / "plan.json").read_text())
    del raw["scale"]["adapter_scales"]  # written by code that did not know the field
    (tmp_path / "plan.json").write_text(json.dumps(raw))
    (tmp_path / "r2-1").mkdir()  # a sweep part-way through
    grown = build_plan(load_scale("halving"), config, trajectories)
    check_same_plan(grown, tmp_path / "plan.json")  # the remedy stage joins: no error
    (tmp_path / "scale-0.5").mkdir()  # ... unless an added experiment already ran here
    with pytest.raises(QwenliteError, match="another plan"):
        check_same_plan(grown, tmp_path / "plan.json")
    (tmp_path / "scale-0.5").rmdir()
    (tmp_path / "final").mkdir()  # ... or an old one after them that may depend on them
    with pytest.raises(QwenliteError, match="experiments differs"):
        check_same_plan(grown, tmp_path / "plan.json")
    (tmp_path / "final").rmdir()
    for other in (load_scale("halving", keep=2), load_scale("halving", rungs=(150, 500))):
        with pytest.raises(QwenliteError, match="another plan"):
            check_same_plan(build_plan(other, config, trajectories), tmp_path / "plan.json")
    save_plan(grown, tmp_path / "plan.json")  # once saved with the field, it must match
    with pytest.raises(QwenliteError, match="another plan"):
        check_same_plan(build_plan(load_scale("halving", adapter_scales=(0.5,)), config,
                                   trajectories), tmp_path / "plan.json")


def test_promotion_ranks_by_validation_mae(trajectories):
    scale = load_scale("halving", dtype="fp32")
    plan = build_plan(scale, QwenConfig.from_name("qwen2.5-0.5b"), trajectories)
    from qwenlite.experiments.runner import _row, make_choices

    def result(e, mae, rank=None):
        return {"name": e.name, "settings": {"lr": e.lr, "rank": rank or e.rank or 8,
                                             "context": e.context, "logit_bias": False},
                "val": {"mae": mae}, "val_loss": 1.0}

    rung1 = plan.stages()["rung1"]
    maes = [0.5, 0.2, 0.9, 0.1, 0.3, 0.8, 0.7, 0.6, 0.4]
    results = {e.name: result(e, m) for e, m in zip(rung1, maes)}
    choices = make_choices(plan, results)
    order = [rung1[i].name for i in np.argsort(maes)]
    assert choices["ranking"]["rung1"] == order
    assert "rung2" not in choices["ranking"]
    assert halving.parent_of(plan.stages()["rung2"][1], choices, "fp32") == order[1]
    with pytest.raises(QwenliteError, match="not chosen yet"):
        halving.parent_of(plan.stages()["branch"][0], choices, "fp32")
    with pytest.raises(QwenliteError, match="dtype"):
        halving.parent_of(plan.stages()["zeroshot"][0], choices, None)


@requires_tokenizer
def test_tiny_halving_sweep_promotes_continues_and_charges_each_step_once(tmp_path, capsys):
    weights, data = make_forecasting_setup(tmp_path, 30, 24, seed=4)
    plan_file = tmp_path / "tiny.json"
    plan_file.write_text(json.dumps(TINY))
    out = tmp_path / "halving"
    args = ["--scale", str(plan_file), "--out", str(out), "--weights", str(weights),
            "--data", str(data)]
    assert main(["plan", *args, "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["dtype"] == "fp32"
    assert main(["run", *args, "--no-progress"]) == 0
    start = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("running ")]
    n_exp = len(planned["experiments"])
    total = sum(e["train_flops"] + e["eval_flops"] for e in planned["experiments"])
    assert len(start) == 1 and start[0].startswith(f"running {n_exp} of {n_exp} experiments: "
                                                   f"{total:.3e} FLOPS to spend")
    assert "% of the 1e+17 budget; estimated" in start[0] and "h in fp32 (an estimate" in start[0]
    names = [e["name"] for e in planned["experiments"]]
    results = {n: json.loads((out / n / "result.json").read_text()) for n in names}
    choices = json.loads((out / "choices.json").read_text())
    ranking = choices["ranking"]
    # promotion: rung 2's slots are the best half of rung 1 by validation MAE, continued
    rung1 = [n for n in names if n.startswith("r1-")]
    best = sorted(rung1, key=lambda n: (results[n]["val"]["mae"], results[n]["val_loss"]))
    assert ranking["rung1"] == best
    for j in (1, 2):
        r2 = results[f"r2-{j}"]["settings"]
        assert r2["parent"] == best[j - 1] and r2["start"] == 2 and r2["steps"] == 4
        src = results[best[j - 1]]["settings"]
        assert (r2["lr"], r2["rank"]) == (src["lr"], src["rank"])
    # the branches continue the best of rung 2; the final line continues the best branch
    top = ranking["rung2"][0]
    assert results["context-32"]["settings"]["parent"] == top
    assert json.loads((out / "context-32" / "train" / "config.json").read_text())["context"] == 32
    assert results["final-8"]["settings"]["parent"] == ranking["branch"][0]
    assert results["final-10"]["settings"]["parent"] == "final-8"
    assert "control-bias" not in ranking["branch"]
    # the final line's best is the checkpoint with the lowest validation MAE
    line = [ranking["branch"][0], "final-8", "final-10"]
    chosen = min(line, key=lambda n: (results[n]["val"]["mae"], results[n]["val_loss"]))
    assert ranking["final"][0] == chosen
    # the remedy scores that checkpoint's adapter scaled, and ranks it with the unscaled one
    remedy = results["scale-0.5"]
    assert remedy["settings"]["parent"] == chosen and remedy["adapter"] == f"{chosen}/train"
    assert remedy["settings"]["steps"] == results[chosen]["settings"]["steps"]
    assert remedy["settings"]["adapter_scale"] == 0.5 and "test" not in remedy
    assert not (out / "scale-0.5" / "train").exists()  # it trains nothing
    scored = json.loads((out / "scale-0.5" / "eval-val" / "metrics.json").read_text())
    assert scored["adapter_scale"] == 0.5 and scored["systems"] == 3
    assert sorted(ranking["remedy"]) == sorted([chosen, "scale-0.5"])
    # the final model is the best of those by validation MAE, scored on test once
    top = ranking["remedy"][0]
    assert results["final"]["settings"]["parent"] == top
    assert results["final"]["settings"]["adapter_scale"] == (0.5 if top == "scale-0.5" else 1)
    assert results["final"]["val"] == results[top]["val"]
    assert results["final"]["adapter"] == f"{chosen}/train"
    tested = json.loads((out / "final" / "eval-test" / "metrics.json").read_text())
    assert tested["adapter_scale"] == results["final"]["settings"]["adapter_scale"]
    assert [n for n in names if "test" in results[n]] == ["zeroshot", "final"]
    assert results["zeroshot"]["settings"]["parent"] == "zeroshot-fp32"
    # continuation is exact: the promoted run's curve is an uninterrupted run's
    from qwenlite.train import main as train

    src = results[ranking["rung2"][0]]["settings"]
    ref = tmp_path / "ref"
    assert train(["--weights", str(weights), "--data", str(data), "--out", str(ref),
                  "--ledger", str(tmp_path / "ref-ledger.json"), "--lr", f"{src['lr']:g}",
                  "--rank", str(src["rank"]), "--context", "48", "--batch", "4",
                  "--max-steps", "4", "--eval-interval", "2", "--eval-windows", "2",
                  "--no-progress", "--device", "auto", "--dtype", "fp32"]) == 0  # the sweep's
    capsys.readouterr()

    def curve(d):
        return [(r["step"], r.get("loss"), r.get("val_loss"))
                for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]

    assert curve(out / ranking["rung2"][0] / "train") == curve(ref)
    # once nothing is left to continue them, the rungs' runs keep their adapters but not their
    # optimizer checkpoints; the other stages keep theirs
    rungs = [n for n in names if n[0] == "r" and n[1].isdigit()]
    assert all(not (out / n / "train" / "state.pt").exists() for n in rungs)
    assert all((out / n / "train" / "adapter").is_dir() for n in rungs)
    assert (out / "final-10" / "train" / "state.pt").exists()
    # the ledger charges each step once: a line's entries sum to its steps
    entries = Ledger(out / "ledger.json").load()["entries"]
    steps = {e["experiment"]: e["steps"] for e in entries.values() if e["kind"] == "train"}
    assert steps["r2-1 (train)"] == 2 and steps["final-10 (train)"] == 2
    assert steps["final-8 (train)"] == 2 and steps["branch-base (train)"] == 2
    assert all(e["status"] == "done" for e in entries.values())
    # the grammar made every forecast parse
    metrics = json.loads((out / "final" / "eval-test" / "metrics.json").read_text())
    assert metrics["results"]["qwen"]["parse"]["grammar"] is True
    assert metrics["results"]["qwen"]["parse"]["missing_step_rate"] == 0
    # nothing machine-specific in the results
    for r in results.values():
        assert str(tmp_path) not in json.dumps(r)
    # the report's numbers and table of the sweep
    from qwenlite.experiments.decisive import halving_numbers, load_halving
    from qwenlite.experiments.latex import Numbers

    n = Numbers()
    halving = load_halving(tmp_path)
    table = halving_numbers(n, halving)
    assert n["h.done"] == n["h.n"] == str(len(names)) and n["h.dtype"] == "fp32"
    assert "pending" not in table and table.count(r"\\") == len(names) - 4 + 1  # + header
    assert n["h.dtype.diff"] == r"\textit{pending}"  # the scale set the dtype: no comparison
    # every run's numbers by name, and the final model against zero-shot on test, paired
    from qwenlite.experiments.latex import fixed

    assert n["h.run.final-8.valmae"] == fixed(results["final-8"]["val"]["mae"])
    assert n["h.run.scale-0.5.n"] == "3" and "h-scale-0.5" in n.done
    assert n["h.test.model"] == chosen and n["h.test.all.n"] == "3"  # the adapter's run
    assert n["h.choice.remedy"] == top and n["h.choice.final"] == chosen
    lam = results["final"]["settings"]["adapter_scale"]
    assert "h-final" in n.done and n["h.test.lambda"] == f"{lam:g}"
    assert n["h.margin.final.name"] == ranking["final"][1] and n["h.margin.final.n"] == "3"
    assert n["h.test.all"] == fixed(results["final"]["test"]["mae"])
    assert n["h.test.zsall"] == fixed(results["zeroshot"]["test"]["mae"])
    assert n["h.test.steps"] == str(results[chosen]["settings"]["steps"])
    assert all(n[f"h.test.{p}.diff"] != r"\textit{pending}" for p in ("all", "early", "late"))
    # continued runs against the runs they continue, and the figure of error against steps
    from qwenlite.experiments.decisive import scored_runs
    from qwenlite.experiments.figures import halving_steps

    runs, zero, plan_steps = scored_runs(halving)
    by = {r["name"]: r for r in runs}
    pairs = [(r, by[r["parent"]]) for r in runs if r["parent"] in by and r["stage"] != "remedy"]
    assert by["scale-0.5"]["steps"] == by[chosen]["steps"]  # a remedy sits at its adapter's steps
    assert len(pairs) == int(n["h.continued"]) > 0
    assert int(n["h.improved"]) == sum(c["mae"] < p["mae"] for c, p in pairs)
    assert int(n["h.lateimproved"]) == sum(c["late"] < p["late"] for c, p in pairs)
    assert by["r2-1"]["parent"] == best[0] and zero is not None
    # the final line by steps: its branch, its newest segment, its lowest late error
    assert "h-line" in n.done
    assert (n["h.line.first.steps"], n["h.line.last.steps"]) == (
        str(by[line[0]]["steps"]), str(by[line[-1]]["steps"]))
    assert n["h.line.last.late"] == fixed(by[line[-1]]["late"])
    low = min(line, key=lambda x: by[x]["late"])
    assert (n["h.line.minlate.steps"], n["h.line.minlate.late"]) == (
        str(by[low]["steps"]), fixed(by[low]["late"]))
    assert plan_steps[-1] == 10 and all(r["mae"] == results[r["name"]]["val"]["mae"] for r in runs)
    assert halving_steps(runs, zero, tmp_path / "figs", plan_steps) == "fig-halving-steps"
    assert (tmp_path / "figs" / "fig-halving-steps.pdf").stat().st_size > 0
    # the error at each forecast step: the final line's checkpoints on validation, in step
    # order after the zero-shot model; on test the zero-shot model, the final model, baselines
    from qwenlite.experiments.decisive import horizon_curves
    from qwenlite.experiments.figures import halving_horizon

    curves = horizon_curves(halving)
    assert [(label, s) for label, s, _ in curves["val"]] == [("zero-shot", None)] + [
        (f"{by[x]['steps']:,} steps", by[x]["steps"]) for x in line]

    def by_step(name, split, key="pred_qwen"):
        with np.load(out / name / f"eval-{split}" / "predictions.npz") as z:
            return np.nanmean(np.abs(z[key] - z["truth"]), axis=(0, 2))

    assert np.array_equal(curves["val"][-1][2], by_step("final-10", "val"))
    assert np.array_equal(curves["val"][0][2], by_step("zeroshot-fp32", "val"))
    labels = [label for label, _, _ in curves["test"]]
    assert labels[0] == "zero-shot" and labels[1].startswith(
        f"final model, {results[chosen]['settings']['steps']} steps")
    assert ("$\\lambda$ = 0.5" in labels[1]) == (lam == 0.5)
    assert labels[2:] == ["persistence", "linear trend", "fitted LV ODE"]
    assert np.array_equal(curves["test"][1][2], by_step("final", "test"))
    assert np.array_equal(curves["test"][0][2], by_step("zeroshot", "test"))
    assert np.array_equal(curves["test"][4][2], by_step("final", "test", "pred_lv_ode"))
    assert all(len(c) == 2 for _, _, c in curves["val"] + curves["test"])  # the tiny horizon
    assert halving_horizon(curves, tmp_path / "figs") == "fig-halving-horizon"
    assert load_halving(tmp_path / "nothing") is None  # no plan: the sweep has not started
    assert horizon_curves(None) == {"val": [], "test": []} and scored_runs(None) == ([], None, ())
    # status says what remains
    assert main(["status", *args]) == 0
    status = capsys.readouterr().out
    assert "remaining: 0 of" in status and "ranking rung1" in status


def test_slurm_script_chains_the_rungs(tmp_path):
    import subprocess

    from qwenlite.data import simulate_to

    data = simulate_to(tmp_path / "lv.h5", n_systems=1000, n_points=100, seed=0)
    out = tmp_path / "sweep"
    assert main(["plan", "--scale", "halving", "--data", str(data), "--out", str(out),
                 "--emit", "slurm"]) == 0
    script = (out / "submit_slurm.sh").read_text()
    assert subprocess.run(["bash", "-n", str(out / "submit_slurm.sh")]).returncode == 0
    by_stage = {x.split("=", 1)[0]: x for x in script.splitlines() if "sbatch" in x}
    assert list(by_stage) == ["calibration", "zeroshot", "rung1", "rung2", "branch", "final",
                              "remedy", "test"]
    assert "--dependency=afterok:${final}" in by_stage["remedy"]
    assert "--dependency=afterok:${remedy}" in by_stage["test"]
    assert "--array=0-8" in by_stage["rung1"]
    assert "--dependency=afterok:${rung1}" in by_stage["rung2"]
    assert "--array=0-2" in by_stage["rung2"]
    assert "--dependency=afterok:${branch}" in by_stage["final"]
    # the final line continues itself: one job running the stage in order, no array
    assert "--array" not in by_stage["final"] and "--index" not in by_stage["final"]
    assert "--stage final'" in by_stage["final"]


def test_only_checkpoints_that_a_pending_run_may_continue_are_kept(trajectories, tmp_path):
    plan = build_plan(load_scale("halving", dtype="fp32"), QwenConfig.from_name("qwen2.5-0.5b"),
                      trajectories)
    rung1 = [e.name for e in plan.stages()["rung1"]]
    for name in rung1:
        (tmp_path / name / "train").mkdir(parents=True)
        (tmp_path / name / "train" / "state.pt").write_text("x")
    results = {n: {} for n in rung1}
    # rung 1 done but not ranked (a stage still running): every checkpoint may be promoted
    assert halving.prune_checkpoints(tmp_path, plan, {"ranking": {}}, results) == []
    ranking = {"rung1": rung1[::-1]}
    pruned = halving.prune_checkpoints(tmp_path, plan, {"ranking": ranking}, results)
    assert sorted(pruned) == sorted(rung1[:-3])  # the best three wait for rung 2
    assert all((tmp_path / n / "train" / "state.pt").exists() for n in rung1[-3:])


def test_branches_not_taken_and_passed_segments_lose_their_checkpoints(trajectories, tmp_path):
    plan = build_plan(load_scale("halving", dtype="fp32"), QwenConfig.from_name("qwen2.5-0.5b"),
                      trajectories)
    stages = plan.stages()
    names = {stage: [e.name for e in stages[stage]] for stage in stages}
    for stage in ("rung1", "rung2", "branch", "final"):
        for name in names[stage]:
            (tmp_path / name / "train").mkdir(parents=True)
            (tmp_path / name / "train" / "state.pt").write_text("x")
            (tmp_path / name / "train" / "state.prev.pt").write_text("x")

    def kept():
        return {p.parent.parent.name for p in tmp_path.glob("*/train/state.pt")}

    done = names["rung1"] + names["rung2"] + names["branch"]
    results = {n: {} for n in done}
    ranking = {"rung1": names["rung1"], "rung2": names["rung2"],
               "branch": ["context-768", "branch-base", "control-both", "context-128"]}
    # the branch stage done but not ranked: the final line may continue any branch
    halving.prune_checkpoints(tmp_path, plan, {"ranking": {k: ranking[k] for k in
                                                           ("rung1", "rung2")}}, results)
    assert set(names["branch"]) <= kept()
    pruned = halving.prune_checkpoints(tmp_path, plan, {"ranking": ranking}, results)
    assert "context-768" not in pruned and set(names["branch"]) - {"context-768"} <= set(pruned)
    assert kept() == {"context-768"} | set(names["final"])
    assert not (tmp_path / "branch-base" / "train" / "state.prev.pt").exists()
    # two segments of the final line done: the first was passed, the second continues
    results |= {n: {} for n in names["final"][:2]}
    assert halving.prune_checkpoints(tmp_path, plan, {"ranking": ranking}, results) == \
        ["context-768", names["final"][0]]
    # the whole sweep done, the remedy and test included: the longest-trained segment stays
    results |= {e.name: {} for e in plan.experiments}
    ranking |= {"final": names["final"][::-1], "remedy": [names["final"][-1]]}
    halving.prune_checkpoints(tmp_path, plan, {"ranking": ranking}, results)
    assert kept() == {names["final"][-1]}
