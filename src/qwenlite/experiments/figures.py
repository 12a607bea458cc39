"""The report's figures, each written as PDF (for LaTeX) and PNG, from a :class:`Sweep`.

Every figure is drawn from what is recorded; an experiment not run yet is shown as *pending*
(an empty heatmap cell, a missing point), never interpolated. Each function returns the
figure's base name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwenlite.experiments.collect import Sweep

VARIABLES = ("prey", "predator")
STYLE = {"qwen": ("tab:orange", "-"), "persistence": ("tab:gray", ":"),
         "linear": ("tab:olive", ":"), "lv_ode": ("tab:green", "--")}
LABEL = {"lv_ode": "fitted LV ODE", "persistence": "persistence", "linear": "linear trend",
         "qwen": "zero-shot"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "legend.fontsize": 7,
                         "figure.dpi": 150, "savefig.bbox": "tight"})
    return plt


def _save(fig, out: Path, name: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.pdf", metadata={"CreationDate": None})  # same input, same file
    fig.savefig(out / f"{name}.png", dpi=150)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return name


def _pending(ax, text: str = "pending: not run yet") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def loss_curves(sweep: Sweep, out: Path) -> str:
    """Training loss (a running mean of 5 steps) and validation loss of every trained
    experiment, one panel per stage."""
    plt = _plt()
    stages = [("grid", "default + grid (lr, rank)"), ("context", "context length"),
              ("control", "logit-bias control"), ("final", "final")]
    fig, axes = plt.subplots(1, len(stages), figsize=(7.2, 2.3), sharey=True)
    for ax, (stage, title) in zip(axes, stages):
        names = [n for n in sweep.names if sweep.planned(n)["stage"] in
                 ((stage, "default") if stage == "grid" else (stage,))]
        drawn = False
        for i, name in enumerate(names):
            rec = sweep.curve(name)
            steps = [r["step"] for r in rec if "loss" in r]
            if not steps or not sweep.done(name):
                continue
            loss = np.convolve([r["loss"] for r in rec if "loss" in r], np.ones(5) / 5, "valid")
            colour = plt.cm.viridis(i / max(1, len(names) - 1))
            ax.plot(steps[len(steps) - len(loss):], loss, color=colour, lw=0.9, label=name)
            val = [(r["step"], r["val_loss"]) for r in rec if "val_loss" in r]
            ax.plot(*zip(*val), "o", color=colour, ms=3)
            drawn = True
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=5, loc="upper right")
        else:
            _pending(ax)
    axes[0].set_ylabel("loss (nats/token)")
    return _save(fig, out, "loss_curves")


def grid_heatmap(sweep: Sweep, out: Path) -> str:
    """Validation MAE of the lr x rank grid (the default run is its (1e-5, 4) cell)."""
    plt = _plt()
    cells = {}
    for name in sweep.names:
        p = sweep.planned(name)
        if p["stage"] in ("grid", "default") and sweep.done(name):
            cells[(p["lr"], p["rank"])] = sweep.results[name]["val"]["mae"]
    scale = sweep.plan["scale"]
    lrs, ranks = scale["lrs"], scale["ranks"]
    grid = np.array([[cells.get((lr, r), np.nan) for r in ranks] for lr in lrs])
    fig, ax = plt.subplots(figsize=(3.4, 2.5))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis_r", aspect="auto")
    for i in range(len(lrs)):
        for j in range(len(ranks)):
            text = "pending" if np.isnan(grid[i, j]) else f"{grid[i, j]:.3f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="0.3" if np.isnan(grid[i, j]) else "w")
    ax.set_xticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("learning rate")
    zs = sweep.results.get("zeroshot")
    if zs:
        ax.set_title(f"validation MAE (zero-shot {zs['val']['mae']:.3f})")
    if cells:
        fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, out, "grid_heatmap")


def _bars(sweep: Sweep, out: Path, name: str, rows: list[tuple[str, str | None]],
          xlabel: str) -> str:
    """Validation MAE (and loss) of ``rows``: (label, experiment name or None = pending)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.4, 2.3))
    labels = [label for label, _ in rows]
    mae = [sweep.results[n]["val"]["mae"] if n and sweep.done(n) else np.nan for _, n in rows]
    loss = [sweep.results[n].get("val_loss") if n and sweep.done(n) else None for _, n in rows]
    x = np.arange(len(rows))
    ax.bar(x, np.nan_to_num(mae), color="tab:blue", width=0.6)
    for i, (m, lo) in enumerate(zip(mae, loss)):
        text = "pending" if np.isnan(m) else f"{m:.3f}" + (f"\nloss {lo:.3f}" if lo else "")
        ax.text(i, 0 if np.isnan(m) else m, text, ha="center", va="bottom", fontsize=6)
    zs = sweep.results.get("zeroshot")
    if zs:
        ax.axhline(zs["val"]["mae"], color="0.35", ls="--", lw=0.8, label="zero-shot")
        ax.legend(loc="lower right")
    ax.set_xticks(x, labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation MAE")
    finite = [m for m in mae if not np.isnan(m)] + ([zs["val"]["mae"]] if zs else [])
    ax.set_ylim(0, 1.35 * max(finite) if finite else 1)
    return _save(fig, out, name)


def context_bars(sweep: Sweep, out: Path) -> str:
    chosen = sweep.choices.get("stages", {}).get("grid", {}).get("chosen")
    rows = []
    for c in sweep.plan["scale"]["contexts"]:
        name = f"context-{c}"
        rows.append((str(c), chosen if name not in sweep.names else name))
    return _bars(sweep, out, "context", rows, "training context (tokens)")


def control_bars(sweep: Sweep, out: Path) -> str:
    chosen = sweep.choices.get("stages", {}).get("grid", {}).get("chosen")
    rows = [("bias alone", "control-bias"), ("LoRA alone", chosen),
            ("LoRA + bias", "control-both")]
    return _bars(sweep, out, "control", rows, "trainable part")


def _model_and_split(sweep: Sweep) -> tuple[str | None, str]:
    """The fine-tuned model to show against zero-shot: the final one on the test split, or
    until it exists, the best finished experiment on the validation split."""
    if sweep.done("final"):
        return "final", "test"
    return sweep.best_trained(), "val"


def shown_systems(pred: dict[str, np.ndarray], n_show: int) -> list[int]:
    """Rows of the systems whose zero-shot MAE is at the 25th, 50th, 90th... percentile: a
    typical, a median and a bad case, chosen by rule rather than by eye."""
    mae = np.nanmean(np.abs(pred["pred_qwen"] - pred["truth"]), axis=(1, 2))
    order = np.argsort(mae, kind="stable")
    qs = np.linspace(0.25, 0.9, n_show) if n_show > 1 else [0.5]
    rows = [int(order[min(len(order) - 1, int(q * len(order)))]) for q in qs]
    return list(dict.fromkeys(rows))


def forecasts(sweep: Sweep, out: Path, n_show: int = 3) -> str:
    """Forecasts of zero-shot, the fine-tuned model and the baselines on a few systems."""
    plt = _plt()
    model, split = _model_and_split(sweep)
    base = sweep.predictions("zeroshot", split)
    tuned = sweep.predictions(model, split) if model else None
    fig, axes = plt.subplots(n_show, 2, figsize=(7.2, 1.6 * n_show), squeeze=False)
    if base is None:
        _pending(axes[0, 0])
        return _save(fig, out, "forecasts")
    k, h = base["context"].shape[1], base["truth"].shape[1]
    t = np.arange(k + h)
    for i, row in enumerate(shown_systems(base, n_show)):
        for v in range(2):
            ax = axes[i, v]
            ax.plot(t, np.concatenate([base["context"][row, :, v], base["truth"][row, :, v]]),
                    "k-", lw=1.0, label="truth")
            ax.axvline(k - 0.5, color="0.6", lw=0.6)
            for key in ("persistence", "lv_ode"):
                c, ls = STYLE[key]
                ax.plot(t[k:], base[f"pred_{key}"][row, :, v], color=c, ls=ls, lw=1,
                        label=LABEL[key])
            c, ls = STYLE["qwen"]
            ax.plot(t[k:], base["pred_qwen"][row, :, v], color=c, ls=ls, lw=1.2,
                    label=LABEL["qwen"])
            if tuned is not None:
                ax.plot(t[k:], tuned["pred_qwen"][row, :, v], color="tab:blue", lw=1.2,
                        label=model)
            ax.set_xlim(k - 25, k + h)
            ax.set_title(f"{split} system {int(base['systems'][row])}: {VARIABLES[v]}")
    axes[0, 0].legend(ncol=3, loc="upper left", fontsize=5.5)
    for ax in axes[-1]:
        ax.set_xlabel("time step")
    fig.tight_layout()
    return _save(fig, out, "forecasts")


def horizon(sweep: Sweep, out: Path) -> str:
    """MAE by forecast step: zero-shot, the fine-tuned model, the baselines (same systems)."""
    plt = _plt()
    model, split = _model_and_split(sweep)
    fig, ax = plt.subplots(figsize=(3.4, 2.4))
    zs = sweep.evaluation("zeroshot", split)
    if zs is None:
        _pending(ax)
        return _save(fig, out, "horizon")
    for key, r in zs["results"].items():
        c, ls = STYLE[key]
        ax.plot(np.arange(1, len(r["by_horizon"]["mae"]) + 1), r["by_horizon"]["mae"], color=c,
                ls=ls, lw=1, label=LABEL[key])
    tuned = sweep.evaluation(model, split) if model else None
    if tuned is not None:
        mae = tuned["results"]["qwen"]["by_horizon"]["mae"]
        ax.plot(np.arange(1, len(mae) + 1), mae, color="tab:blue", lw=1.2, label=model)
    ax.set_yscale("log")
    ax.set_xlabel("forecast step")
    ax.set_ylabel(f"MAE ({split}, original units)")
    ax.legend(fontsize=5.5)
    ax.grid(alpha=0.3)
    return _save(fig, out, "horizon")


def diagnosis(diag: dict | None, out: Path) -> str:
    """The diagnosed adapter against the base model: NLL by digit place, MAE by step."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(7.2, 2.3))
    if diag is None:
        _pending(a)
        return _save(fig, out, "diagnosis")
    classes = [c for c in ("tens", "units", "dec1", "dec2") if c in diag["classes"]]
    x = np.arange(len(classes))
    for i, (key, label) in enumerate((("base", "base model"), ("adapter_model", "+ adapter"))):
        nll = [diag[key]["teacher_forced"]["nll"][c] for c in classes]
        a.bar(x + (i - 0.5) * 0.38, nll, width=0.38, label=label)
        by_h = diag[key]["greedy"]["mae_by_horizon"]
        b.plot(np.arange(1, len(by_h) + 1), by_h, marker="o", ms=2, label=label)
    names = {"tens": "tens", "units": "units", "dec1": "1st dec.", "dec2": "2nd dec."}
    a.set_xticks(x, [names[c] for c in classes])  # a label per class present, in its place
    a.set_ylabel("teacher-forced NLL (nats)")
    a.legend()
    b.set_xlabel("forecast step")
    b.set_ylabel("greedy MAE")
    b.set_yscale("log")
    b.grid(alpha=0.3)
    b.legend()
    return _save(fig, out, "diagnosis")


def halving_steps(runs: list[dict], zero: dict | None, out: Path,
                  steps: tuple[int, ...] = ()) -> str:
    """The halving sweep's validation MAE against training steps: overall, and over the first
    and the last quarter of the horizon, one point per scored run, each joined to the run it
    continues; the zero-shot model's as a dashed line (``decisive.scored_runs``). ``steps``:
    the plan's step counts: the axis spans them, run yet or not."""
    plt = _plt()
    panels = [("mae", "all forecast steps"), ("early", "first quarter of the horizon"),
              ("late", "last quarter of the horizon")]
    fig, axes = plt.subplots(1, 3, figsize=(7.2, 2.3), sharey=False)
    by_name = {r["name"]: r for r in runs}
    colours = {"rung1": "tab:blue", "rung2": "tab:orange", "branch": "tab:purple",
               "final": "tab:red", "remedy": "tab:green"}  # remedy: a scaled adapter
    for ax, (key, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("optimizer steps")
        if not runs:
            _pending(ax)
            continue
        for r in runs:
            parent = by_name.get(r["parent"] or "")
            if parent is not None:
                ax.plot([parent["steps"], r["steps"]], [parent[key], r[key]], color="0.6",
                        lw=0.8, zorder=1)
        for stage, colour in colours.items():
            pts = [r for r in runs if r["stage"] == stage]
            if pts:
                ax.scatter([r["steps"] for r in pts], [r[key] for r in pts], s=12,
                           color=colour, label=stage, zorder=2)
        if zero is not None:
            ax.axhline(zero[key], color="0.3", ls="--", lw=0.8, label="zero-shot")
        ax.set_xlim(0, max(max(steps, default=0), max(r["steps"] for r in runs)) * 1.05)
    axes[0].set_ylabel("validation MAE")
    fig.tight_layout(w_pad=0.8)
    if runs:
        axes[0].legend(loc="best", frameon=False)
    return _save(fig, out, "fig-halving-steps")


def halving_horizon(curves: dict, out: Path) -> str:
    """MAE by forecast step for the halving sweep (``decisive.horizon_curves``): on validation,
    the zero-shot model against each checkpoint of the final line, darker with more steps; on
    test, the zero-shot model against the final model and the baselines, once tested."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(6.2, 2.4), sharey=True)
    panels = (("val", "validation: the final line"),
              ("test", "test: the final model"))
    styles = {"zero-shot": dict(color="0.3", ls="--"), "persistence": dict(color="0.5", ls=":"),
              "linear trend": dict(color="tab:olive", ls=":"),
              "fitted LV ODE": dict(color="tab:green", ls="-.")}
    horizon = max((len(r[2]) for rows in curves.values() for r in rows), default=20)
    for ax, (split, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("forecast step")
        ax.set_xlim(1, horizon)
        ax.set_xticks(sorted({1, *range(5, horizon + 1, 5)}))
        rows = curves.get(split) or []
        if not rows:
            _pending(ax)
            continue
        trained = sum(r[1] is not None for r in rows)
        shades = iter(plt.get_cmap("Reds")(np.linspace(0.45, 1.0, trained) if trained > 1
                                           else [0.85]))
        for label, steps, curve in rows:  # trained models in step order, darker with more
            style = styles.get(label, {}) if steps is None else dict(color=next(shades))
            ax.plot(np.arange(1, len(curve) + 1), curve, lw=1.1, label=label, **style)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if split == "val":
            ax.legend(frameon=False, loc="lower right")
        else:  # the baselines cross the models' lines: the legend beside the panel
            ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[0].set_ylabel("MAE (original units)")
    fig.tight_layout(w_pad=0.8)
    return _save(fig, out, "fig-halving-horizon")
