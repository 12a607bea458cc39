"""The coursework's experiment protocol as a plan whose FLOPS are counted before anything runs.

Stages (question 3 of ``../shared/spec/coursework.txt``), each selecting on the validation split:

1. ``zeroshot`` — the untrained model on the validation (and, once, the test) systems;
2. ``default`` + ``grid`` — learning rate × LoRA rank; the default run (lr 1e-5, rank 4,
   context 512, batch 4) *is* the grid's (1e-5, 4) cell, so it is trained once;
3. ``context`` — the other context lengths at the best grid point (its 512 cell is the grid's);
4. ``control`` — the logit bias alone and LoRA + bias at the best grid point (LoRA alone is the
   grid's cell): which part does the work;
5. ``final`` — settings chosen from the trends, longer, scored on validation and test.

Settings chosen at run time (``None`` here) are costed at their worst case (the largest rank, the
longest context, the bias on), so a plan that fits stays within budget whatever is chosen.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from qwenlite.errors import BudgetError, QwenliteError
from qwenlite.experiments.costs import Costs, cost, prompt_lengths

LRS = (1e-5, 5e-5, 1e-4)
RANKS = (2, 4, 8)
CONTEXTS = (128, 512, 768)
DEFAULT = {"lr": 1e-5, "rank": 4, "context": 512, "batch": 4}
#: the coursework's steps per experiment (grid, context study, final): 9 x 10k + 3 x 2k + 30k
#: steps do not fit 1e17 FLOPS, so each scale sets its own
COURSEWORK_STEPS = {"grid": 10_000, "context": 2_000, "final": 30_000}


@dataclass(frozen=True)
class Scale:
    """How big each stage is, and how fast this device is assumed to run it.

    ``train_rate``/``eval_rate`` are FLOPS per second by the ledger's own count (training by the
    3× rule, evaluation as generated); ``rate_source`` says where they come from.
    """

    name: str
    grid_steps: int
    final_steps: int
    val_systems: int
    test_systems: int
    eval_interval: int
    eval_windows: int
    train_rate: float
    eval_rate: float
    rate_source: str
    shrunk: bool = False
    samples: int = 1
    temperature: float = 0.0
    context_steps: int = 80
    horizon: int = 20
    eval_batch: int = 32
    why: str = ""
    lrs: tuple[float, ...] = LRS
    ranks: tuple[int, ...] = RANKS
    contexts: tuple[int, ...] = CONTEXTS
    default: tuple[float, int, int] = (DEFAULT["lr"], DEFAULT["rank"], DEFAULT["context"])
    #: successive halving (:mod:`qwenlite.experiments.halving`): the rungs' cumulative steps
    #: (empty: the flat protocol of the pilot), the 1/keep promoted, the branches' extra steps
    #: and the final line's checkpoints (cumulative steps)
    rungs: tuple[int, ...] = ()
    keep: int = 3
    branch_steps: int = 0
    checkpoints: tuple[int, ...] = ()
    #: the remedy stage: the final line's best checkpoint with its adapter scaled, W + λ·BA
    #: (and λ × the logit bias), scored on validation for each λ here; none: no remedy stage
    adapter_scales: tuple[float, ...] = ()
    #: the dtype every experiment runs in ("auto": the calibration's choice, else bf16 where the
    #: device has bf16 units); generation under the LLMTIME grammar
    dtype: str = "fp32"
    grammar: bool = False
    #: ledgers (relative to the sweep directory) that spent from the same budget before
    shares_budget_with: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("lrs", "ranks", "contexts", "default", "rungs", "checkpoints",
                     "adapter_scales", "shares_budget_with"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.dtype not in ("fp32", "bf16", "auto"):
            raise QwenliteError(f"a scale's dtype is fp32, bf16 or auto, got {self.dtype!r}")
        if self.rungs:
            from qwenlite.experiments.halving import check

            check(self)
        lr, rank, context = self.default
        if lr not in self.lrs or rank not in self.ranks or context not in self.contexts:
            raise QwenliteError(f"the default run (lr {lr:g}, rank {rank}, context {context}) "
                                "must be a point of the grid and of the context study")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SCALES = {
    # The coursework's protocol at the most steps that fit 1e17 FLOPS with the final run 3× a
    # grid run (the spec's 10k/2k/30k do not fit). Rates: an assumption for one GPU, not measured.
    "full": Scale("full", grid_steps=800, final_steps=2400, val_systems=100, test_systems=100,
                  eval_interval=250, eval_windows=64, train_rate=1.0e14, eval_rate=2.0e12,
                  rate_source="assumed for one A100/H100 (bf16 training at ~30% of peak, "
                  "memory-bound decoding); not measured"),
    # Shrunk for a 2-core CPU: <= ~10 h in all, no experiment over ~75 min.
    "cpu": Scale("cpu", grid_steps=60, final_steps=120, val_systems=20, test_systems=50,
                 eval_interval=30, eval_windows=16, train_rate=2.1e11, eval_rate=8.6e10,
                 rate_source="measured on a 2-core Zen 3 VM, stand-in weights, fp32: 29.7-32.2 s "
                 "per 4x512 LoRA step (benchmarks/bench_train.py), 966 s for 100 forecasts "
                 "80->20 (8.28e13 FLOPS)", shrunk=True, eval_batch=20,
                 why="60 steps of batch 4 at context 512 (~30 min here) is the most a 9-point grid "
                 "affords in ~10 h; at 60 Adam steps the three learning rates move the adapter "
                 "by lr x steps = 6e-4, 3e-3 and 6e-3, so they differ (the 50-step lr 1e-4 run "
                 "moved validation loss from 1.17 to 0.92)"),
    # Successive halving sized for this project's 2-core CPUs over many sessions
    # (:mod:`qwenlite.experiments.halving`); rates until `sweep calibrate` measures them here.
    "halving": Scale("halving", grid_steps=150, final_steps=4000, val_systems=150,
                     test_systems=150, eval_interval=50, eval_windows=32, train_rate=4.4e11,
                     eval_rate=2.0e11, rate_source="assumed (bf16 on a 2-core CPU with bf16 "
                     "units)", shrunk=True, eval_batch=30, rungs=(150, 600), keep=3,
                     branch_steps=400, checkpoints=(1600, 2200, 2800, 3400, 4000),
                     adapter_scales=(0.5, 0.75, 1.25), dtype="auto",
                     grammar=True, shares_budget_with=("../ledger.json", "../diagnosis/ledger.json"),
                     why="the coursework's protocol by successive halving: 9 cells x 150 steps, "
                     "the best 3 continued to 600, the best continued to 4,000 steps with "
                     "branches at 1,000; every step is charged once, so the budget goes to the "
                     "runs that earn it; batch 4 at context 512, as the coursework's default; "
                     "the best checkpoint's adapter scaled by 0.5, 0.75 and 1.25 as a remedy "
                     "that trains nothing"),
}


@dataclass(frozen=True)
class Experiment:
    """One experiment; ``None`` settings are chosen at run time from earlier stages."""

    name: str
    stage: str
    steps: int = 0
    context: int | None = DEFAULT["context"]
    batch: int = DEFAULT["batch"]
    lr: float | None = None
    rank: int | None = None
    logit_bias: bool | None = False
    test: bool = False
    #: the experiment whose checkpoint this one continues (``@stage:k``: the k-th best of a
    #: stage, chosen at run time), and the steps it had reached
    parent: str = ""
    start: int = 0
    dtype: str | None = None  # None: the sweep's
    #: λ of the adapter it scores, W + λ·BA and λ × the logit bias (the remedy stage's knob)
    adapter_scale: float = 1.0

    @property
    def trains(self) -> bool:
        """Whether it trains an adapter (or uses one: the ``test`` stage scores its parent's)."""
        return self.stage not in ("zeroshot", "calibration")

    @property
    def rescales(self) -> bool:
        """It trains nothing and scores its parent's adapter scaled by ``adapter_scale`` on
        validation (the remedy stage); its steps are its parent's."""
        from qwenlite.experiments.halving import REMEDY

        return self.stage == REMEDY

    @property
    def reuses_parent(self) -> bool:
        """It trains nothing and scores its parent's model (its validation score is the
        parent's): the zero-shot model after the calibration, the final model's test."""
        return bool(self.parent) and self.steps <= self.start and not self.rescales

    @property
    def new_steps(self) -> int:
        """Optimizer steps this experiment itself runs (after its parent's)."""
        return max(self.steps - self.start, 0)

    def resolved(self, choices: dict) -> Experiment:
        """This experiment with its run-time settings filled in from ``choices`` (a dict with
        ``lr``, ``rank``, ``context``, ``logit_bias`` as chosen so far)."""
        fill = {k: choices[k] for k in ("lr", "rank", "context", "logit_bias")
                if getattr(self, k) is None and k in choices}
        return dataclasses.replace(self, **fill)

    def worst_case(self, scale: Scale) -> Experiment:
        return self.resolved({"lr": max(scale.lrs), "rank": max(scale.ranks),
                              "context": max(scale.contexts), "logit_bias": True})


def experiments(scale: Scale) -> list[Experiment]:
    """The protocol's experiments in running order (the halving protocol where the scale has
    rungs: :func:`qwenlite.experiments.halving.experiments`)."""
    if scale.rungs:
        from qwenlite.experiments import halving

        return halving.experiments(scale)
    d_lr, d_rank, d_context = scale.default
    out = [Experiment("zeroshot", "zeroshot", context=d_context, test=True)]
    for lr in scale.lrs:
        for rank in scale.ranks:
            default = lr == d_lr and rank == d_rank
            out.append(Experiment("default" if default else f"grid-lr{lr:g}-r{rank}",
                                  "default" if default else "grid", scale.grid_steps,
                                  context=d_context, lr=lr, rank=rank))
    out += [Experiment(f"context-{c}", "context", scale.grid_steps, context=c)
            for c in scale.contexts if c != d_context]
    out += [Experiment("control-bias", "control", scale.grid_steps, context=d_context, rank=0,
                       logit_bias=True),
            Experiment("control-both", "control", scale.grid_steps, context=d_context,
                       logit_bias=True)]
    out.append(Experiment("final", "final", scale.final_steps, context=None, logit_bias=None,
                          test=True))
    return out


@dataclass
class Plan:
    """A scale's experiments with their costs against a budget."""

    scale: Scale
    experiments: list[Experiment]
    costs: dict[str, Costs]
    budget: float
    data: str = ""
    extra: dict = field(default_factory=dict)
    #: FLOPS already spent from the same budget (the scale's ``shares_budget_with`` ledgers)
    spent: int = 0
    #: the dtype the experiments run in, and why (a halving sweep's calibration decides ``auto``)
    dtype: str = "fp32"
    dtype_note: str = ""

    def stages(self) -> dict[str, list[Experiment]]:
        """The experiments by stage, in running order; the default run is one of the grid's
        cells, so it belongs to the ``grid`` stage."""
        out: dict[str, list[Experiment]] = {}
        for e in self.experiments:
            out.setdefault("grid" if e.stage == "default" else e.stage, []).append(e)
        return out

    @property
    def total_flops(self) -> int:
        return sum(c.train_flops + c.eval_flops for c in self.costs.values())

    @property
    def total_hours(self) -> float:
        return sum(c.hours for c in self.costs.values())

    def check(self) -> None:
        """Raise :class:`BudgetError` (one line) if the plan does not fit its budget."""
        if self.total_flops + self.spent > self.budget:
            spent = f" with {self.spent:.3e} spent before" if self.spent else ""
            raise BudgetError(f"the {self.scale.name} plan needs {self.total_flops:.3e} FLOPS"
                              f"{spent}, over the {self.budget:.3e} budget; use fewer steps")

    def to_dict(self) -> dict:
        rows = []
        for e in self.experiments:
            c = self.costs[e.name]
            rows.append({**dataclasses.asdict(e), "train_flops": c.train_flops,
                         "eval_flops": c.eval_flops, "share": (c.train_flops + c.eval_flops)
                         / self.budget, "hours": round(c.hours, 3)})
        return {"scale": self.scale.to_dict(), "shrunk": self.scale.shrunk,
                "budget": self.budget, "data": self.data, "experiments": rows,
                "total_flops": self.total_flops, "total_hours": round(self.total_hours, 2),
                "spent_before": self.spent, "dtype": self.dtype, "dtype_note": self.dtype_note}

    def table(self) -> str:
        s = self.scale

        def val(x, trains=True):
            if not trains:
                return "-"
            return "chosen" if x is None else f"{x:g}" if isinstance(x, float) else str(x)

        head = ("experiment", "stage", "steps", "continues", "context", "batch", "lr", "rank",
                "bias", "train FLOPS", "eval FLOPS", "share", "hours")
        rows = []
        for e in self.experiments:
            c = self.costs[e.name]
            parent = "-" if not e.parent else e.parent + (f" @{e.start}" if e.start else "")
            rows.append((e.name, e.stage, str(e.steps), parent, val(e.context), str(e.batch),
                         val(e.lr, e.trains), val(e.rank, e.trains), val(e.logit_bias),
                         f"{c.train_flops:.3e}", f"{c.eval_flops:.3e}",
                         f"{100 * (c.train_flops + c.eval_flops) / self.budget:.2f}%",
                         f"{c.hours:.2f}"))
        rows.append(("total", "", "", "", "", "", "", "", "", "", "",
                     f"{100 * self.total_flops / self.budget:.2f}%", f"{self.total_hours:.2f}"))
        if not s.rungs:  # the flat protocol continues nothing
            head, rows = head[:3] + head[4:], [r[:3] + r[4:] for r in rows]
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()
                 for r in (head, *rows)]
        notes = [f"total {self.total_flops:.3e} FLOPS of the {self.budget:.3e} budget; chosen "
                 f"settings costed at their worst case (rank {max(s.ranks)}, context "
                 f"{max(s.contexts)}, bias on)",
                 f"rates ({s.rate_source}): training {s.train_rate:.2e} FLOPS/s, evaluation "
                 f"{s.eval_rate:.2e} FLOPS/s",
                 f"evaluation: {s.val_systems} validation systems ({s.test_systems} test for "
                 f"zeroshot and final), {s.context_steps} -> {s.horizon} steps, "
                 + ("greedy" if s.samples == 1 else
                    f"median of {s.samples} samples at T={s.temperature:g}")]
        if s.rungs:
            notes.insert(0, f"successive halving: rungs at {', '.join(map(str, s.rungs))} "
                            f"steps, the best 1/{s.keep} of each continuing its checkpoint; "
                            f"branches +{s.branch_steps} steps; the final line scored at "
                            f"{', '.join(map(str, s.checkpoints))} steps (@stage:k = the k-th "
                            "best of a stage by validation forecast MAE)")
        notes.append(f"dtype: {self.dtype}" + (f" ({self.dtype_note})" if self.dtype_note
                                                else "")
                     + (", generation under the LLMTIME grammar" if s.grammar else ""))
        if self.spent:
            notes.append(f"spent before from the same budget: {self.spent:.3e} FLOPS "
                         f"({', '.join(s.shares_budget_with)}); plan + spent = "
                         f"{(self.total_flops + self.spent) / self.budget:.2%} of the budget")
        if s.shrunk:
            notes.append(f"SHRUNK plan for a CPU: {s.why}")
        return "\n".join(lines + [""] + notes)


def load_scale(name_or_file: str, **overrides) -> Scale:
    """A named scale (``full``, ``cpu``) or a JSON plan file of :class:`Scale` fields (a named
    ``"base"`` scale, then any fields to change)."""
    if name_or_file in SCALES:
        scale = SCALES[name_or_file]
    else:
        from qwenlite.io import read_json_object

        raw = read_json_object(name_or_file, "plan file")
        base = raw.pop("base", "cpu")
        if base not in SCALES:
            raise QwenliteError(f"plan file {name_or_file}: unknown base scale {base!r}")
        names = {f.name for f in dataclasses.fields(Scale)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise QwenliteError(f"plan file {name_or_file}: unknown field {unknown[0]!r}")
        raw.setdefault("why", f"the plan file {name_or_file}")
        scale = dataclasses.replace(SCALES[base], **raw)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(scale, **overrides)


def build_plan(scale: Scale, config, trajectories, budget: float = 1e17, data: str = "") -> Plan:
    """Cost every experiment of ``scale`` on this data (prompt lengths are the real ones)."""
    from qwenlite.data import split_systems
    from qwenlite.data.llmtime import LLMTimeSettings, fit_alpha

    split = split_systems(len(trajectories), seed=0)
    settings = fit_alpha(trajectories[split.train], LLMTimeSettings())
    if scale.context_steps + scale.horizon > trajectories.shape[1]:
        raise QwenliteError(f"{scale.context_steps} + {scale.horizon} forecast steps exceed the "
                            f"{trajectories.shape[1]} timesteps of the series")
    val = prompt_lengths(trajectories, split.val, settings, scale.val_systems,
                         scale.context_steps)
    test = prompt_lengths(trajectories, split.test, settings, scale.test_systems,
                          scale.context_steps)
    exps = experiments(scale)
    cache: dict = {}
    costs = {e.name: cost(e, scale, config, val, test, cache) for e in exps}
    return Plan(scale, exps, costs, budget, data)


def save_plan(plan: Plan, path: Path, commit: str = "") -> None:
    """Write the plan as run, with the commit of the code that runs it."""
    from qwenlite.io import atomic_write_text

    atomic_write_text(path, json.dumps({**plan.to_dict(), "commit": commit}, indent=2) + "\n")


def check_same_plan(plan: Plan, path: Path) -> None:
    """Refuse (one line) to run ``plan`` in a sweep directory that holds another plan's runs.

    A plan that grew is the same plan: the old experiments kept in order, the new ones inserted
    where nothing from the first of them on has started (no directory: an old experiment after
    them may depend on them), and scale fields the old plan file did not know of (code newer
    than the sweep) — how a stage is added to a sweep part-way through."""
    from qwenlite.io import read_json_object

    if not path.is_file():
        return
    old = read_json_object(path, "sweep plan")
    mine = json.loads(json.dumps(plan.to_dict()))  # tuples as the file holds them: lists
    names = [e["name"] for e in old.get("experiments", [])]
    new = [e["name"] for e in mine["experiments"]]
    rest = iter(new)
    kept = all(name in rest for name in names)  # the old names, in order, within the new
    added = [n for n in new if n not in set(names)]
    # what an added experiment precedes may depend on it (the test on a remedy): none of it
    # may have started either
    after = new[new.index(added[0]):] if added else []
    grown = kept and bool(added) and not any((path.parent / n).exists() for n in after)
    a, b = old.get("scale", {}), mine["scale"]
    diff = [] if names == new or grown else ["experiments"]
    diff += [k for k in b if k not in ("train_rate", "eval_rate", "rate_source", "why")
             and a.get(k) != b[k] and (k in a or not grown)]
    if diff:
        raise QwenliteError(f"{path.parent} holds a sweep with another plan ({diff[0]} "
                            "differs); use another --out")
