"""The FLOPS ledger: refusals, idempotent records, resumed runs, concurrent writers, the CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from qwenlite.errors import BudgetError, QwenliteError
from qwenlite.training.ledger import Ledger


def test_refuses_a_plan_over_budget(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json", budget=1000)
    ledger.add("eval-a", "zero-shot", "eval", 300)
    with pytest.raises(BudgetError) as err:
        ledger.plan("run-b", "lora", "train", 800, flops_per_step=100)
    message = str(err.value)
    assert "7.000e+02" in message and "7 steps would fit" in message
    assert "run-b" not in ledger.load()["entries"]
    ledger.plan("run-b", "lora", "train", 700, flops_per_step=100)  # exactly what is left


def test_resumed_run_is_not_double_counted(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json", budget=1000)
    ledger.plan("run", "lora", "train", 600)
    ledger.record("run", 400, steps=4)
    ledger.record("run", 400, steps=4)  # the same checkpoint recorded twice
    assert ledger.used() == 400
    # resumed: 200 more planned (what remains), already-spent 400 is not planned again
    entry = ledger.plan("run", "lora", "train", 200)
    assert entry["planned"] == 600
    ledger.record("run", 600, steps=6, status="done")
    assert ledger.used() == 600
    assert len(ledger.load()["entries"]) == 1
    with pytest.raises(BudgetError):
        ledger.plan("other", "x", "train", 401)


def _writer(path, i):
    Ledger(path).add(f"exp-{i}", f"exp-{i}", "eval", 10 + i)


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "ledger.json"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, i)) for i in range(12)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    data = json.loads(path.read_text())
    assert len(data["entries"]) == 12
    assert Ledger(path).used() == sum(10 + i for i in range(12))


def test_corrupt_ledger_is_one_clear_error(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(QwenliteError, match="corrupt"):
        Ledger(path).used()


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "qwenlite.budget", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_cli_table_and_errors(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = Ledger(path)
    ledger.add("a", "zero-shot-val", "eval", int(2e15), tokens=1000)
    ledger.plan("b", "lora-r4", "train", int(5e15))
    ledger.record("b", int(3e15), steps=30, tokens=2000)
    proc = _cli("--ledger", str(path))
    assert proc.returncode == 0
    assert "zero-shot-val" in proc.stdout and "lora-r4" in proc.stdout
    assert "5.000e+15" in proc.stdout  # the total
    assert "5.000%" in proc.stdout  # its share of 1e17
    missing = _cli("--ledger", str(tmp_path / "none.json"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_keys_inside_the_ledgers_directory_are_stored_relative(tmp_path):
    """A committed sweep directory's ledger names its runs the same way on every machine."""
    ledger = Ledger(tmp_path / "sweep" / "ledger.json")
    inside = tmp_path / "sweep" / "default" / "train"
    ledger.add(str(inside.resolve()), "default", "train", 10)
    ledger.add(str((tmp_path / "elsewhere").resolve()), "other", "eval", 5)
    keys = set(ledger.load()["entries"])
    assert "./default/train" in keys and str((tmp_path / "elsewhere").resolve()) in keys
    ledger.record(str(inside.resolve()), 20, status="done")  # the same entry, found again
    assert ledger.load()["entries"]["./default/train"]["flops"] == 20


def test_planning_nothing_more_leaves_a_finished_entry_done(tmp_path):
    """A finished run started again (e.g. by a resumed sweep) plans 0 FLOPS and stays done."""
    ledger = Ledger(tmp_path / "ledger.json")
    ledger.add("run", "a run", "train", 100)
    ledger.plan("run", "a run", "train", 0)
    assert ledger.load()["entries"]["run"]["status"] == "done"
    ledger.plan("run", "a run", "train", 5)  # more work reopens it
    assert ledger.load()["entries"]["run"]["status"] == "running"
