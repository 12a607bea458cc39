"""Read a sweep directory (``report/results/``) into one object for the report.

Everything the report says comes from here: the plan as run (``plan.json``), each finished
experiment's ``result.json``, its training curve (``train/metrics.jsonl``), its evaluations
(``eval-*/metrics.json`` and ``predictions.npz``), the choices (``choices.json``) and the FLOPS
ledgers — the sweep's own and any other committed experiment's below it (``*/ledger.json``,
e.g. the diagnosis). Nothing is recomputed: a missing experiment is *pending*, never guessed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from qwenlite.errors import QwenliteError
from qwenlite.experiments.runner import CHOICES, read_result
from qwenlite.io import read_json_object, read_records
from qwenlite.training.ledger import Ledger

PLAN, LEDGER = "plan.json", "ledger.json"


@dataclasses.dataclass
class LedgerRow:
    """One experiment of a ledger: its training and evaluation FLOPS apart."""

    experiment: str
    source: str  # which ledger: "sweep" or the directory of another one (e.g. "diagnosis")
    train: int = 0
    eval: int = 0
    status: str = "done"

    @property
    def total(self) -> int:
        return self.train + self.eval


@dataclasses.dataclass
class Sweep:
    """A sweep directory as read from disk (see the module docstring)."""

    root: Path
    plan: dict
    results: dict[str, dict]
    choices: dict
    ledgers: dict[str, dict]  # source -> the ledger's raw JSON
    extra: dict[str, Path]  # other committed experiments with a ledger: name -> directory
    nested: set[str] = dataclasses.field(default_factory=set)  # extras that are sweeps

    @property
    def names(self) -> list[str]:
        """Every experiment of the plan, in the plan's order."""
        return [e["name"] for e in self.plan["experiments"]]

    def planned(self, name: str) -> dict:
        return next(e for e in self.plan["experiments"] if e["name"] == name)

    def done(self, name: str) -> bool:
        return name in self.results

    def best_trained(self) -> str | None:
        """The finished fine-tuned experiment with the lowest validation MAE (None yet)."""
        trained = [n for n in self.results if self.planned(n)["steps"]]
        return min(trained, key=lambda n: self.results[n]["val"]["mae"], default=None)

    def curve(self, name: str) -> list[dict]:
        """The training run's ``metrics.jsonl`` records (empty for an untrained experiment)."""
        path = self.root / name / "train" / "metrics.jsonl"
        return read_records(path) if path.is_file() else []

    def evaluation(self, name: str, split: str) -> dict | None:
        path = self.root / name / f"eval-{split}" / "metrics.json"
        return read_json_object(path, "evaluation metrics") if path.is_file() else None

    def predictions(self, name: str, split: str) -> dict[str, np.ndarray] | None:
        path = self.root / name / f"eval-{split}" / "predictions.npz"
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def ledger_rows(self) -> list[LedgerRow]:
        """One row per experiment and ledger, training and evaluation apart, in ledger order;
        the rows sum exactly to the ledgers' entries."""
        rows: dict[tuple[str, str], LedgerRow] = {}
        for source, book in self.ledgers.items():
            for key, entry in book["entries"].items():
                name = experiment_of(key, entry, source, source in self.nested)
                row = rows.setdefault((source, name), LedgerRow(name, source))
                if entry.get("kind") == "train":
                    row.train += int(entry["flops"])
                else:
                    row.eval += int(entry["flops"])
                if entry.get("status") != "done":
                    row.status = entry.get("status", "?")
        return list(rows.values())

    def ledger_total(self) -> int:
        return sum(int(e["flops"]) for book in self.ledgers.values()
                   for e in book["entries"].values())


def experiment_of(key: str, entry: dict, source: str, nested: bool = False) -> str:
    """The experiment a ledger entry belongs to: the sweep's keys are
    ``./<experiment>/<train|eval-val|eval-test>``; a sweep below it (``nested``, e.g. the
    halving sweep) names its own as ``<source>/<experiment>``; another ledger's entries all
    belong to its own directory's experiment (``source``)."""
    if source == "sweep" or nested:
        parts = [p for p in Path(key).parts if p != "."]
        name = parts[0] if parts else key
        return name if source == "sweep" else f"{source}/{name}"
    return source


def load_sweep(root: str | Path) -> Sweep:
    """Read the sweep directory ``root``; a one-line error if it holds no sweep."""
    root = Path(root)
    if not (root / PLAN).is_file():
        raise QwenliteError(f"{root} holds no sweep ({PLAN} missing): run python -m "
                            "qwenlite.sweep run first, or pass --results DIR")
    plan = read_json_object(root / PLAN, "sweep plan")
    results = {e["name"]: r for e in plan["experiments"]
               if (r := read_result(root, e["name"])) is not None}
    choices = read_json_object(root / CHOICES, "choices") if (root / CHOICES).is_file() else {}
    ledgers = {"sweep": Ledger(root / LEDGER).load()} if (root / LEDGER).is_file() else {}
    names = {e["name"] for e in plan["experiments"]}
    extra = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in names):
        if (sub / LEDGER).is_file():
            ledgers[sub.name] = Ledger(sub / LEDGER).load()
            extra[sub.name] = sub
    nested = {name for name, sub in extra.items() if (sub / PLAN).is_file()}
    return Sweep(root, plan, results, choices, ledgers, extra, nested)
