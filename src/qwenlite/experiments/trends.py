"""What the learning-rate × rank grid shows across its cells, as report numbers (``grid.*``).

The diagnosis found that a lower validation loss need not mean a better forecast; these numbers
let the report say whether the grid agrees: the validation loss before training, each learning
rate's mean final validation loss and mean validation MAE over its ranks, and the rank
correlation between a cell's loss and its MAE.
"""

from __future__ import annotations

import numpy as np

from qwenlite.experiments.collect import Sweep
from qwenlite.experiments.latex import Numbers, fixed, lr_tex, tex_escape

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
