"""What the results show across experiments, as report numbers.

``grid.*``: the diagnosis found that a lower validation loss need not mean a better forecast;
these numbers let the report say whether the grid agrees: the validation loss before training,
each learning rate's mean final validation loss and mean validation MAE over its ranks, and the
rank correlation between a cell's loss and its MAE.

``pair.*``: each choice and the final model against what it replaces, on the same systems: the
mean per-system difference in MAE with its paired bootstrap interval, and on how many systems
the first is better, so that the report can say which differences are larger than the noise of
a few validation systems.
"""

from __future__ import annotations

import json

import numpy as np

from qwenlite.errors import QwenliteError
from qwenlite.evaluation.metrics import paired_difference, point_metrics
from qwenlite.experiments.collect import Sweep
from qwenlite.experiments.latex import Numbers, fixed, lr_tex, sci, tex_escape

PENDING = r"\textit{pending}"
NA = r"\textit{n/a}"
GRID_STAGES = ("grid", "default")
SLOTS = 3  # the coursework's learning rates: the report names grid.lr1..3 whatever the plan


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equally long sequences (ties get their mean rank)."""
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for value in np.unique(x):  # mean rank for ties
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom else float("nan")


def grid_numbers(n: Numbers, sweep: Sweep, lrs) -> None:
    """``grid.n``, ``grid.loss0``, ``grid.lr{i}``/``.n``/``.loss``/``.mae`` for the i-th learning
    rate (1-based, in the plan's order), ``grid.lossbest``/``grid.maebest`` (the rate with the
    lowest mean loss / MAE), ``grid.byloss`` and ``.mae`` (the cell with the lowest loss, and its
    MAE) and ``grid.spearman`` (pending until three cells are done)."""
    cells = [name for name in sweep.results
             if sweep.planned(name)["stage"] in GRID_STAGES and sweep.planned(name)["steps"]]
    n["grid.n"] = len(cells)
    first = next((c for c in cells if sweep.curve(c)), None)
    start = next((r["val_loss"] for r in sweep.curve(first) if "val_loss" in r), None) \
        if first else None
    n["grid.loss0"] = fixed(start) if start is not None else PENDING
    for i in range(1, max(len(lrs), SLOTS) + 1):
        if i > len(lrs):  # a plan with fewer rates than the coursework's three: none here
            for key in ("", ".n", ".loss", ".mae"):
                n[f"grid.lr{i}{key}"] = NA
            continue
        lr = lrs[i - 1]
        mine = [c for c in cells if sweep.results[c]["settings"]["lr"] == lr]
        n[f"grid.lr{i}"] = lr_tex(lr)
        n[f"grid.lr{i}.n"] = len(mine)
        for key, value in (("loss", lambda c: sweep.results[c]["val_loss"]),
                           ("mae", lambda c: sweep.results[c]["val"]["mae"])):
            n[f"grid.lr{i}.{key}"] = fixed(np.mean([value(c) for c in mine])) if mine else PENDING
    for key, field in (("lossbest", "loss"), ("maebest", "mae")):  # the rate with the lowest mean
        means = {i: float(n[f"grid.lr{i}.{field}"]) for i in range(1, len(lrs) + 1)
                 if n[f"grid.lr{i}.{field}"] not in (PENDING, NA)}
        n[f"grid.{key}"] = n[f"grid.lr{min(means, key=means.get)}"] if means else PENDING
    by_loss = min(cells, key=lambda c: sweep.results[c]["val_loss"], default=None)
    n["grid.byloss"] = tex_escape(by_loss) if by_loss else PENDING
    n["grid.byloss.mae"] = fixed(sweep.results[by_loss]["val"]["mae"]) if by_loss else PENDING
    if len(cells) >= 3:
        rho = spearman([sweep.results[c]["val_loss"] for c in cells],
                       [sweep.results[c]["val"]["mae"] for c in cells])
        n["grid.spearman"] = f"{rho:+.2f}"
    else:
        n["grid.spearman"] = PENDING


PAIR_FIELDS = ("diff", "lo", "hi", "lower", "ties", "higher", "n", "verdict", "top", "topdiff")
TOP_SHARE = 0.1  # the share of systems, hardest for both forecasters, behind .top/.topdiff
SAME_RECIPE = ("lr", "rank", "context", "batch", "logit_bias")


def signed(x: float) -> str:
    """``x`` with its sign, a real minus in LaTeX (none where it rounds to zero)."""
    text = f"{abs(x):.3f}"
    if float(text) == 0:
        return text
    return f"$-${text}" if x < 0 else f"$+${text}"


def verdict(lo: float, hi: float) -> str:
    """Words to put between two forecasters' names for a paired interval [lo, hi] of a − b:
    "lower than" where it lies below 0, "higher than" above, else "indistinguishable from"."""
    return "lower than" if hi < 0 else "higher than" if lo > 0 else "indistinguishable from"


def system_mae(sweep: Sweep, name: str, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(system ids, per-system MAE of the model's forecasts) of an evaluation, or None."""
    pred = sweep.predictions(name, split)
    if pred is None:
        return None
    mae = point_metrics(pred["pred_qwen"], pred["truth"])["per_system"]["mae"]
    return pred["systems"], np.array([np.nan if v is None else v for v in mae])


def compare(n: Numbers, key: str, sweep: Sweep, a: str | None, b: str | None,
            split: str) -> None:
    """``<key>.diff/lo/hi`` (mean MAE of ``a`` minus ``b`` per system, paired 95% bootstrap
    interval), ``.lower``/``.ties``/``.higher``/``.n`` (systems where ``a`` is lower, where the
    two are equal — the same forecast —, where ``a`` is higher, and all systems compared),
    ``.verdict`` ("lower than" / "higher than" / "indistinguishable from": whether the interval
    excludes 0, as words to put between the two forecasters' names) and ``.top``/``.topdiff``
    (the tenth of the systems with the largest error, averaged over both forecasters, and their
    contribution to ``.diff``: their summed difference divided by all systems compared). The
    hardest systems are chosen by both errors, not by ``b``'s alone: picking the systems on
    which ``b`` erred most would favour ``a`` even between equal forecasters (regression to
    the mean)."""
    ea = system_mae(sweep, a, split) if a else None
    eb = system_mae(sweep, b, split) if b else None
    if ea is None or eb is None:
        for f in PAIR_FIELDS:
            n[f"{key}.{f}"] = PENDING
        return
    if not np.array_equal(ea[0], eb[0]):
        raise QwenliteError(f"{a} and {b} were scored on different {split} systems")
    keep = np.isfinite(ea[1]) & np.isfinite(eb[1])  # systems both scored
    a_err, b_err = ea[1][keep], eb[1][keep]
    d = paired_difference(a_err, b_err)
    if d["n"] == 0:  # no system both scored: nothing to compare
        for f in PAIR_FIELDS:
            n[f"{key}.{f}"] = NA
        return
    lo, hi = d["ci"]
    n[f"{key}.diff"], n[f"{key}.lo"], n[f"{key}.hi"] = signed(d["mean"]), signed(lo), signed(hi)
    n[f"{key}.lower"], n[f"{key}.ties"], n[f"{key}.n"] = d["lower"], d["ties"], d["n"]
    n[f"{key}.higher"] = d["n"] - d["lower"] - d["ties"]
    top = max(1, round(TOP_SHARE * d["n"]))
    hardest = np.argsort(-(a_err + b_err), kind="stable")[:top]
    n[f"{key}.top"] = top
    n[f"{key}.topdiff"] = signed(float((a_err[hardest] - b_err[hardest]).sum()) / d["n"])
    n[f"{key}.verdict"] = verdict(lo, hi)


def shorter_twin(sweep: Sweep, name: str) -> str | None:
    """A finished experiment trained with ``name``'s recipe and seed but fewer steps (the most
    steps of those), or None."""
    mine = sweep.results.get(name)
    if mine is None:
        return None

    def seed(x: str):
        path = sweep.root / x / "train" / "config.json"
        return json.loads(path.read_text()).get("seed") if path.is_file() else None

    twins = [x for x, r in sweep.results.items() if x != name
             and all(r["settings"][k] == mine["settings"][k] for k in SAME_RECIPE)
             and 0 < r["settings"]["steps"] < mine["settings"]["steps"]
             and seed(x) == seed(name)]
    return max(twins, key=lambda x: sweep.results[x]["settings"]["steps"], default=None)


def paired_numbers(n: Numbers, sweep: Sweep) -> None:
    """``pair.grid`` (the grid's choice vs zero-shot, validation), ``pair.ctxshort`` and
    ``pair.ctxlong`` (the context study's shortest and longest run vs the grid's choice,
    validation; ``.context`` their context), ``pair.final`` / ``pair.finalval`` (the final
    model vs zero-shot, test / validation) and ``pair.steps`` (the final model vs its shorter
    twin, validation; ``pair.steps.name``, ``.from``, ``.to`` and ``.fromloss``, the twin's
    validation loss)."""
    n["pair.level"] = r"95\%"  # paired_difference's default level
    stages = sweep.choices.get("stages", {})
    grid = stages.get("grid", {}).get("chosen")
    compare(n, "pair.grid", sweep, grid, "zeroshot", "val")
    runs = sorted((e for e in sweep.plan["experiments"] if e["stage"] == "context"),
                  key=lambda e: e["context"] or 0)
    ends = (runs[0], runs[-1]) if runs else (None, None)
    for label, e in zip(("ctxshort", "ctxlong"), ends):
        compare(n, f"pair.{label}", sweep, e["name"] if e else None, grid, "val")
        n[f"pair.{label}.context"] = e["context"] if e and e["context"] else NA
    compare(n, "pair.final", sweep, "final", "zeroshot", "test")
    compare(n, "pair.finalval", sweep, "final", "zeroshot", "val")
    twin = shorter_twin(sweep, "final")
    compare(n, "pair.steps", sweep, "final", twin, "val")
    n["pair.steps.name"] = tex_escape(twin) if twin else PENDING
    n["pair.steps.from"] = sweep.results[twin]["settings"]["steps"] if twin else PENDING
    n["pair.steps.to"] = sweep.results["final"]["settings"]["steps"] if twin else PENDING
    n["pair.steps.fromloss"] = fixed(sweep.results[twin].get("val_loss")) if twin else PENDING


def elapsed(curve: list[dict], upto: int) -> float:
    """Seconds of training up to step ``upto`` from a run's records, across resumes: each
    process counts its ``seconds`` from its own start, so a fall marks a resumed run."""
    total = previous = 0.0
    for r in sorted((r for r in curve if "seconds" in r and r["step"] <= upto),
                    key=lambda r: r["step"]):
        total += r["seconds"] - previous if r["seconds"] >= previous else r["seconds"]
        previous = r["seconds"]
    return total


def replay_numbers(n: Numbers, sweep: Sweep) -> None:
    """``replay.*``: how the final model's first steps compare with its shorter twin's, which
    trained the same recipe from the same seed: ``replay.steps`` (the steps both ran),
    ``replay.maxdiff`` (the largest difference in training loss over them),
    ``replay.flops``/``replay.minutes`` (what the final model spent on them, its validations
    included: what continuing the twin's checkpoint would have saved) and ``replay.commits``
    (the code the two ran, in words)."""
    twin = shorter_twin(sweep, "final")
    keys = ("steps", "maxdiff", "flops", "minutes", "commits")
    if twin is None:
        for key in keys:
            n[f"replay.{key}"] = PENDING
        return
    ours = {r["step"]: r for r in sweep.curve("final") if "loss" in r}
    theirs = {r["step"]: r for r in sweep.curve(twin) if "loss" in r}
    shared = sorted(set(ours) & set(theirs))
    if not shared:
        for key in keys:
            n[f"replay.{key}"] = NA
        return
    n["replay.steps"] = len(shared)
    n["replay.maxdiff"] = sci(max(abs(ours[s]["loss"] - theirs[s]["loss"]) for s in shared))
    n["replay.flops"] = sci(ours[shared[-1]]["flops"])
    n["replay.minutes"] = f"{elapsed(sweep.curve('final'), shared[-1]) / 60:.0f}"
    commits = {sweep.results[x].get("commit", "?")[:7] for x in (twin, "final")}
    n["replay.commits"] = ("the same commit of the code" if len(commits) == 1 else
                           "commits " + " and ".join(rf"\code{{{c}}}" for c in sorted(commits)))


def horizon_numbers(n: Numbers, sweep: Sweep) -> None:
    """``hz.<name>.<split>.early``/``.late``: an experiment's MAE over the first and the last
    quarter of the forecast steps (``hz.early``/``hz.late`` name the steps), for every planned
    experiment and split (pending or n/a where not scored), and as ``hz.twin.*`` for the final
    model's shorter twin: how training trades near-term accuracy against drift further out."""
    h = int(sweep.plan["scale"]["horizon"])
    q = max(1, h // 4)
    n["hz.early"], n["hz.late"] = f"1--{q}", f"{h - q + 1}--{h}"
    twin = shorter_twin(sweep, "final")
    for name, label in [*((x, x) for x in sweep.names), (twin, "twin")]:
        for split in ("val", "test"):
            pred = sweep.predictions(name, split) if name else None
            for part in ("early", "late"):
                key = f"hz.{label}.{split}.{part}"
                if pred is None:
                    n[key] = PENDING if not name or not sweep.done(name) else NA
                    continue
                err = np.abs(pred["pred_qwen"] - pred["truth"])  # (S, h, V)
                steps = slice(0, q) if part == "early" else slice(h - q, h)
                n[key] = fixed(float(np.nanmean(err[:, steps])))
