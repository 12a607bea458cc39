"""python -m qwenlite.sweep: plans within budget, selection by the recorded numbers, a tiny sweep
end to end (killed and resumed), concurrent ledger writers, the Slurm script."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, make_forecasting_setup, requires_tokenizer

from qwenlite.data import simulate
from qwenlite.experiments.plan import SCALES, build_plan
from qwenlite.experiments.runner import make_choices
from qwenlite.model.config import QwenConfig
from qwenlite.sweep import main
from qwenlite.training.ledger import Ledger


@pytest.fixture(scope="module")
def trajectories():
    return simulate(n_systems=200, n_points=100, seed=3)[0]


@pytest.mark.parametrize("name", ["full", "cpu"])
def test_full_and_cpu_plans_fit_the_budget(trajectories, name):
    plan = build_plan(SCALES[name], QwenConfig.from_name("qwen2.5-0.5b"), trajectories)
    plan.check()
    assert 0.5e17 < plan.total_flops <= 1e17 if name == "full" else plan.total_flops <= 1e17
    assert plan.total_flops == sum(c.train_flops + c.eval_flops for c in plan.costs.values())
    names = [e.name for e in plan.experiments]
    assert names[0] == "zeroshot" and names[-1] == "final" and "default" in names
    assert sum(e.stage == "grid" for e in plan.experiments) == 8  # + the default cell: 3 x 3
    if name == "cpu":
        assert plan.scale.shrunk and "SHRUNK" in plan.table()
        assert plan.total_hours <= 10.5
        assert max(c.hours for c in plan.costs.values()) <= 1.25 + 0.6  # final: val + test


def test_chosen_settings_are_costed_at_their_worst_case(trajectories):
    plan = build_plan(SCALES["cpu"], QwenConfig.from_name("qwen2.5-0.5b"), trajectories)
    c = plan.costs
    assert c["context-768"].train_flops > c["grid-lr0.0001-r8"].train_flops  # rank 8 at 768
    from qwenlite.flops import counting_model, forward_flops, train_step_flops

    model = counting_model(QwenConfig.from_name("qwen2.5-0.5b"), 8, logit_bias=True)
    step = train_step_flops(model, 768, 4).rule
    val = forward_flops(model, 768, loss=True).total() * plan.scale.eval_windows
    assert c["final"].train_flops == 120 * step + 5 * val  # validations at 0, 30, 60, 90, 120


def test_over_budget_plan_is_refused_in_one_line(tmp_path, capsys):
    data = tmp_path / "lv.h5"
    from qwenlite.data import simulate_to

    simulate_to(data, n_systems=60, n_points=100, seed=0)
    assert main(["plan", "--scale", "full", "--data", str(data), "--budget", "1e15"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "over the 1.000e+15 budget" in err[0]
    assert main(["plan", "--scale", "cpu", "--data", str(data), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    fields = {"name", "stage", "steps", "context", "batch", "lr", "rank", "train_flops",
              "eval_flops", "hours"}
    assert all(fields <= set(e) for e in plan["experiments"])
    assert plan["total_flops"] == sum(e["train_flops"] + e["eval_flops"]
                                      for e in plan["experiments"])
    assert plan["shrunk"] is True


def _result(name, stage, lr, rank, context, bias, mae, loss):
    return {"name": name, "stage": stage, "val_loss": loss, "val": {"mae": mae},
            "settings": {"lr": lr, "rank": rank, "context": context, "logit_bias": bias}}


def test_selection_is_the_one_the_validation_numbers_imply(trajectories):
    plan = build_plan(SCALES["cpu"], QwenConfig.from_name("qwen2.5-0.5b"), trajectories)
    rng = np.random.default_rng(0)
    results = {}
    for e in plan.experiments:
        if e.stage in ("default", "grid"):
            results[e.name] = _result(e.name, e.stage, e.lr, e.rank, 512, False,
                                      float(rng.uniform(0.2, 0.6)), float(rng.uniform(0.5, 1)))
    # a tie on MAE is broken by the validation loss
    best = min(results.values(), key=lambda r: r["val"]["mae"])
    tie = next(r for r in results.values() if r is not best)
    tie["val"]["mae"], tie["val_loss"] = best["val"]["mae"], best["val_loss"] - 0.1
    choices = make_choices(plan, results)
    assert choices["stages"]["grid"]["chosen"] == tie["name"]
    assert choices["settings"] == {"lr": tie["settings"]["lr"], "rank": tie["settings"]["rank"]}
    assert "context" not in choices["stages"]  # not run yet
    lr, rank = tie["settings"]["lr"], tie["settings"]["rank"]
    results["context-128"] = _result("context-128", "context", lr, rank, 128, False, 0.05, 1.0)
    results["context-768"] = _result("context-768", "context", lr, rank, 768, False, 0.07, 0.1)
    results["control-bias"] = _result("control-bias", "control", lr, 0, 512, True, 0.01, 1.0)
    results["control-both"] = _result("control-both", "control", lr, rank, 512, True,
                                      tie["val"]["mae"] + 0.01, 0.1)
    choices = make_choices(plan, results)
    assert choices["stages"]["context"]["chosen"] == "context-128"  # by MAE, not by loss
    # LoRA + bias is worse than LoRA alone: no bias, however good the bias alone is
    assert choices["settings"] == {"lr": lr, "rank": rank, "context": 128, "logit_bias": False}
    results["control-both"]["val"]["mae"] = tie["val"]["mae"] - 0.01
    assert make_choices(plan, results)["settings"]["logit_bias"] is True


def _write_many(path, worker, n):
    ledger = Ledger(path)
    for i in range(n):
        ledger.add(f"w{worker}-{i}", f"exp {worker} {i}", "eval", 1000 + i)


def test_concurrent_ledger_writers_lose_nothing(tmp_path):
    path = tmp_path / "ledger.json"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(path, w, 30)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = Ledger(path).load()["entries"]
    assert len(entries) == 120
    assert sum(int(e["flops"]) for e in entries.values()) == 4 * sum(1000 + i for i in range(30))


def test_slurm_script_chains_the_stages(tmp_path, capsys):
    from qwenlite.data import simulate_to

    data = simulate_to(tmp_path / "lv.h5", n_systems=60, n_points=100, seed=0)
    out = tmp_path / "sweep"
    assert main(["plan", "--scale", "full", "--data", str(data), "--out", str(out),
                 "--emit", "slurm"]) == 0
    script = (out / "submit_slurm.sh").read_text()
    assert subprocess.run(["bash", "-n", str(out / "submit_slurm.sh")]).returncode == 0
    lines = [x for x in script.splitlines() if "sbatch" in x]
    assert len(lines) == 5
    by_stage = {x.split("=", 1)[0]: x for x in lines}
    assert "--array=0-8" in by_stage["grid"] and "dependency" not in by_stage["grid"]
    assert "--dependency=afterok:${grid}" in by_stage["context"]
    assert "--dependency=afterok:${grid}" in by_stage["control"]
    assert "--dependency=afterok:${context}:${control}" in by_stage["final"]
    assert "'--index' " not in script and "--index $SLURM_ARRAY_TASK_ID" in script


# ----- a tiny sweep, end to end ---------------------------------------------------------------
TINY = {"base": "cpu", "grid_steps": 3, "final_steps": 4, "val_systems": 2, "test_systems": 2,
        "eval_interval": 2, "eval_windows": 2, "context_steps": 6, "horizon": 2, "eval_batch": 2,
        "lrs": [1e-5, 3e-2], "ranks": [4], "contexts": [24, 48], "default": [1e-5, 4, 48]}


@requires_tokenizer
def test_tiny_sweep_runs_end_to_end_survives_a_kill_and_resumes(tmp_path, capsys):
    weights, data = make_forecasting_setup(tmp_path, 24, 20, seed=4)
    plan_file = tmp_path / "tiny.json"
    plan_file.write_text(json.dumps(TINY))
    out = tmp_path / "sweep"
    args = ["--scale", str(plan_file), "--out", str(out), "--weights", str(weights),
            "--data", str(data)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "qwenlite.sweep", "run", *args,
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline and not (out / "default" / "train" / "state.pt").exists():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the experiment it runs
    proc.wait()
    assert (out / "zeroshot" / "result.json").is_file()
    assert not (out / "final" / "result.json").exists()

    assert main(["run", *args, "--no-progress"]) == 0
    capsys.readouterr()
    names = ["zeroshot", "default", "grid-lr0.03-r4", "context-24", "control-bias",
             "control-both", "final"]
    results = {n: json.loads((out / n / "result.json").read_text()) for n in names}
    assert all(r["shrunk"] and r["commit"] for r in results.values())
    assert "test" in results["zeroshot"] and "test" in results["final"]
    assert "test" not in results["default"]  # the test split is scored only twice
    choices = json.loads((out / "choices.json").read_text())
    grid = [results["default"], results["grid-lr0.03-r4"]]
    best = min(grid, key=lambda r: (r["val"]["mae"], r["val_loss"]))
    assert choices["stages"]["grid"]["chosen"] == best["name"]
    final = results["final"]["settings"]
    assert (final["lr"], final["rank"]) == (best["settings"]["lr"], best["settings"]["rank"])
    assert final["context"] == choices["settings"]["context"]
    assert final["logit_bias"] == choices["settings"]["logit_bias"]
    assert final["steps"] == 4
    # the ledger: one entry per training run and per evaluation, all done, nothing twice
    entries = Ledger(out / "ledger.json").load()["entries"]
    assert len(entries) == 6 + 7 + 2 and all(e["status"] == "done" for e in entries.values())
    steps = {e["experiment"]: e["steps"] for e in entries.values() if e["kind"] == "train"}
    assert steps["default (train)"] == 3 and steps["final (train)"] == 4
    # rerunning does nothing new; status reports every experiment done
    before = (out / "ledger.json").read_text()
    assert main(["run", *args, "--no-progress"]) == 0
    assert (out / "ledger.json").read_text() == before
    capsys.readouterr()
    assert main(["status", *args]) == 0
    status = capsys.readouterr().out
    assert sum(" done " in line for line in status.splitlines()) == 7 and "choice grid" in status and "SHRUNK" in status

    # the report is generated from these results, end to end: every table and figure, the FLOPS
    # table summing to the ledger, main.tex's every key defined
    from qwenlite.data.tokenizer import Tokenizer
    from qwenlite.experiments.collect import load_sweep
    from qwenlite.report import generate

    generated = tmp_path / "generated"
    info = generate(out, generated, data, Tokenizer(weights), ROOT / "report" / "main.tex")
    assert info["figures"] == 9 and info["words"] <= 3000
    for name in ("experiments", "baselines", "flops", "flops-components", "llmtime"):
        assert (generated / f"table-{name}.tex").stat().st_size > 0, name
    for fig in ("loss_curves", "grid_heatmap", "context", "control", "forecasts", "horizon",
                "diagnosis"):
        assert (generated / f"{fig}.pdf").is_file() and (generated / f"{fig}.png").is_file(), fig
    sweep = load_sweep(out)
    assert sum(r.total for r in sweep.ledger_rows()) == sweep.ledger_total() > 0
