"""Checkpoints of a training run, and runs that continue another run's checkpoint.

A run directory holds ``state.pt`` (step, validations done, the trained tensors by name, the
optimizer, the RNG), written atomically with the one before kept as ``state.prev.pt``.

A run may *continue* another (a promoted rung of a search, a branch with another context or
with the logit bias added): :func:`continue_run` copies the parent's run files into a new run
directory and writes ``origin.json`` — the parent, the step, the validations and the FLOPS it
had reached, and the settings the child changes. Training the child then resumes at that step
exactly as a resumed run does, so a promoted run's curve equals an uninterrupted run's, and the
child's FLOPS ledger entry charges only the steps it adds.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from qwenlite.errors import CheckpointError, QwenliteError
from qwenlite.io import atomic_path, atomic_write_text, read_json_object

STATE = "state.pt"
PREV_STATE = "state.prev.pt"
ORIGIN = "origin.json"
#: the run files a continued run starts from (the metrics are cut to the parent's step)
RUN_FILES = ("config.json", "split.json", "llmtime.json", "metrics.jsonl", STATE)
#: the settings a child may change from its parent's
BRANCHABLE = ("context", "batch", "logit_bias")


@dataclass(frozen=True)
class Origin:
    """Where a continued run starts: its parent's step, validations and FLOPS (0 for a fresh
    run), and the settings it changes."""

    parent: str = ""
    step: int = 0
    evals: int = 0
    flops: int = 0
    changes: dict | None = None

    @classmethod
    def load(cls, run_dir: Path) -> Origin:
        path = run_dir / ORIGIN
        if not path.is_file():
            return cls()
        raw = read_json_object(path, "run origin", CheckpointError)
        return cls(raw["parent"], int(raw["step"]), int(raw["evals"]), int(raw["flops"]),
                   raw.get("changes") or {})


def save_checkpoint(run_dir: Path, model, optimizer, step: int, evals: int) -> None:
    """Write ``state.pt`` atomically (the old one kept as ``state.prev.pt``)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if k in trained}
    state = {"step": step, "evals": evals, "lora": tensors, "optimizer": optimizer.state_dict(),
             "rng": torch.get_rng_state()}
    with atomic_path(run_dir / STATE, previous=run_dir / PREV_STATE) as tmp:
        torch.save(state, tmp)


def _optimizer_state(saved: dict, saved_names: list[str], names: list[str]) -> dict:
    """The saved optimizer state re-indexed onto the parameters ``names`` (the optimizer's order):
    a parameter the checkpoint did not train (a logit bias added by a branch) starts fresh."""
    where = {n: i for i, n in enumerate(saved_names)}
    if any(n not in names for n in saved_names):
        raise KeyError(next(n for n in saved_names if n not in names))
    state = {j: saved["state"][where[n]] for j, n in enumerate(names)
             if n in where and where[n] in saved["state"]}
    groups = [dict(saved["param_groups"][0], params=list(range(len(names))))]
    return {"state": state, "param_groups": groups}


def load_checkpoint(run_dir: Path, model, optimizer, device) -> tuple[int, int]:
    """Restore the newest readable checkpoint of ``run_dir`` into ``model`` and ``optimizer``
    (whose parameters are the model's trainable ones, in order); returns (step, validations)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name in (STATE, PREV_STATE):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location=device, weights_only=False)
            unexpected = model.load_state_dict(state["lora"], strict=False).unexpected_keys
            if unexpected:
                raise KeyError(unexpected[0])
            optimizer.load_state_dict(_optimizer_state(state["optimizer"], list(state["lora"]),
                                                       names))
            torch.set_rng_state(state["rng"])
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint
            print(f"warning: checkpoint {path} is unreadable ({type(exc).__name__}); "
                  "trying the previous one", file=sys.stderr)
            continue
        return int(state["step"]), int(state["evals"])
    if (run_dir / STATE).exists() or (run_dir / PREV_STATE).exists():
        raise CheckpointError(
            f"no readable checkpoint in {run_dir} ({STATE} and {PREV_STATE} are "
            "corrupt); move them aside to restart, the rest of the run directory is kept")
    if (run_dir / "adapter").is_dir():  # saved with every checkpoint: the checkpoint was deleted
        raise CheckpointError(
            f"{run_dir} has trained (its adapter is there) but has no checkpoint to go on from "
            "(a halving sweep deletes those no later run continues); its adapter is what it "
            "trained: train into a new directory to start again")
    return 0, 0


def continue_run(parent: Path, child: Path, changes: dict | None = None) -> Origin:
    """Start ``child`` from the last checkpoint of the run ``parent`` (see the module docstring).

    ``changes``: settings of :data:`BRANCHABLE` the child trains with instead of the parent's.
    A child that already exists is left as it is (it may have trained since). Returns the
    child's origin.
    """
    if (child / ORIGIN).is_file():
        return Origin.load(child)
    changes = dict(changes or {})
    bad = sorted(set(changes) - set(BRANCHABLE))
    if bad:
        raise QwenliteError(f"a continued run cannot change {bad[0]} (only "
                            f"{', '.join(BRANCHABLE)})")
    missing = [n for n in RUN_FILES if not (parent / n).is_file()]
    if missing:
        raise QwenliteError(f"cannot continue {parent}: no {missing[0]} (has it trained?)")
    state = torch.load(parent / STATE, map_location="cpu", weights_only=False)
    step, evals = int(state["step"]), int(state["evals"])
    lines = [x for x in (parent / "metrics.jsonl").read_text().splitlines()
             if x.strip() and json.loads(x)["step"] <= step]
    flops = max((json.loads(x).get("flops", 0) for x in lines), default=0)
    tmp = child.with_name(child.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in RUN_FILES:
        shutil.copy2(parent / name, tmp / name)
    atomic_write_text(tmp / "metrics.jsonl", "".join(x + "\n" for x in lines))
    config = read_json_object(parent / "config.json", "run config")
    config.update(changes)
    atomic_write_text(tmp / "config.json", json.dumps(config, indent=2))
    if (parent / "adapter").is_dir():
        shutil.copytree(parent / "adapter", tmp / "adapter")
    atomic_write_text(tmp / ORIGIN, json.dumps(
        {"parent": _relative(parent, child), "step": step, "evals": evals, "flops": int(flops),
         "changes": changes}, indent=2) + "\n")
    if child.exists():
        shutil.rmtree(child)
    tmp.rename(child)
    return Origin.load(child)


def _relative(parent: Path, child: Path) -> str:
    """``parent`` as a path relative to ``child``'s folder where they share one (portable)."""
    import os

    try:
        return Path(os.path.relpath(parent.resolve(), child.resolve().parent)).as_posix()
    except ValueError:
        return parent.as_posix()
