"""Every number, table and figure of the report, from a sweep directory and the ledgers.

:func:`generate` writes into ``report/generated/``:

* ``numbers.tex``: the named values the text reads as ``\\R{key}`` (:mod:`.latex`), e.g.
  ``x.zeroshot.valmae``, ``choice.grid.lr``, ``ledger.total``, ``llmtime.alpha``;
* ``table-*.tex``: the experiments, the zero-shot baselines, the FLOPS of every experiment
  (training and evaluation apart; the rows sum exactly to the ledgers), the FLOPS of one
  forward by component and the LLMTIME examples (these two from :mod:`.method`);
* ``fig-*.pdf`` / ``.png``: :mod:`.figures`.

Only recorded values are used; an experiment not run yet reads *pending* everywhere.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qwenlite.errors import QwenliteError
from qwenlite.experiments import figures
from qwenlite.experiments.collect import Sweep
from qwenlite.experiments.latex import (
    Numbers,
    fixed,
    lr_tex,
    pct,
    sci,
    tabular,
    tex_escape,
    thousands,
)

PENDING = r"\textit{pending}"
BUDGET = 1e17


def _stage_label(stage: str) -> str:
    return {"zeroshot": "zero-shot", "default": "default"}.get(stage, stage)


def experiment_numbers(n: Numbers, sweep: Sweep, flops: dict[str, tuple[int, int]]) -> None:
    """``x.<name>.<field>`` for every experiment of the plan (pending ones too)."""
    for name in sweep.names:
        p, r = sweep.planned(name), sweep.results.get(name)
        s = r["settings"] if r else p
        k = f"x.{name}."
        n[k + "steps"] = p["steps"]
        n[k + "context"] = s["context"] if s["context"] is not None else PENDING
        n[k + "lr"] = lr_tex(s["lr"]) if s["lr"] else ("---" if not p["steps"] else PENDING)
        # rank 0 (the logit bias alone) is a setting, not a missing one
        n[k + "rank"] = s["rank"] if s["rank"] is not None else (
            "---" if not p["steps"] else PENDING)
        n[k + "bias"] = ("yes" if s["logit_bias"] else "no") \
            if s["logit_bias"] is not None else PENDING
        n[k + "plannedflops"] = sci(p["train_flops"] + p["eval_flops"])
        if r is None:
            for f in ("valmae", "valmedian", "valloss", "testmae", "testmedian", "minutes",
                      "flops"):
                n[k + f] = PENDING
            continue
        n.mark_done(name)
        n[k + "valmae"] = fixed(r["val"]["mae"])
        n[k + "valmedian"] = fixed(r["val"]["median_system_mae"])
        n[k + "valloss"] = fixed(r.get("val_loss"))
        n[k + "testmae"] = fixed(r["test"]["mae"]) if "test" in r else "---"
        n[k + "testmedian"] = fixed(r["test"]["median_system_mae"]) if "test" in r else "---"
        n[k + "minutes"] = f"{sum(r['seconds'].values()) / 60:.0f}"
        n[k + "flops"] = sci(sum(flops.get(name, (0, 0))))


def results_table(sweep: Sweep) -> str:
    rows, rules = [], []
    last = None
    for name in sweep.names:
        p = sweep.planned(name)
        new_stage = p["stage"] != last and not {p["stage"], last} <= {"grid", "default"}
        if last is not None and new_stage:
            rules.append(len(rows) - 1)
        last = p["stage"]
        k = f"x.{name}."
        rows.append([tex_escape(name)] + [rf"\R{{{k}{f}}}" for f in (
            "steps", "context", "lr", "rank", "bias", "valloss", "valmae", "valmedian",
            "testmae")])
    return tabular("lrrrrlrrrr", ["experiment", "steps", "context", "lr", "rank", "bias",
                                  "val loss", "val MAE", "median", "test MAE"], rows,
                   tuple(rules))


def baseline_numbers(n: Numbers, sweep: Sweep) -> str:
    """``zs.<split>.<model>.<metric>`` of the zero-shot evaluation (the baselines with it),
    ``fin.<split>.<metric>`` of the final model's once it exists, and their table."""
    rows = []

    def add(split: str, key: str, label: str, res: dict) -> None:
        o, sy = res["original"]["metrics"]["overall"], res["original"]["systems"]
        lo, hi = sy["mae"]["mean_ci"]
        n[key + "mae"], n[key + "mse"] = fixed(o["mae"]), fixed(o["mse"])
        n[key + "mase"], n[key + "median"] = fixed(o["mase"], 2), fixed(sy["mae"]["median"])
        n[key + "maeci"] = f"[{lo:.3f}, {hi:.3f}]"
        rows.append([split, tex_escape(label), *(rf"\R{{{key}{f}}}" for f in (
            "mae", "maeci", "median", "mse", "mase"))])

    for split in ("val", "test"):
        ev = sweep.evaluation("zeroshot", split)
        if ev is None:
            continue
        for model, res in ev["results"].items():
            add(split, f"zs.{split}.{model.replace('_', '')}.",
                "Qwen2.5 zero-shot" if model == "qwen" else figures.LABEL.get(model, model), res)
            if model == "qwen":  # the final model right under zero-shot, or pending
                final = sweep.evaluation("final", split)
                if final is not None:
                    add(split, f"fin.{split}.", "Qwen2.5 + LoRA, final", final["results"]["qwen"])
                else:
                    for f in ("mae", "mse", "mase", "median", "maeci"):
                        n[f"fin.{split}.{f}"] = PENDING
        n[f"zs.{split}.systems"] = ev["systems"]
        parse = ev["results"]["qwen"].get("parse", {})
        n[f"zs.{split}.missing"] = pct(parse.get("missing_step_rate", 0.0), 1)
    if not rows:
        return "% zero-shot not evaluated yet\n"
    per_split = sum(r[0] == rows[0][0] for r in rows)  # a rule between the two splits
    return tabular("llrlrrr", ["split", "forecaster", "MAE", "95\\% CI", "median", "MSE",
                               "MASE"], rows, (per_split - 1,) if per_split < len(rows) else ())


def flops_numbers(n: Numbers, sweep: Sweep) -> str:
    """The FLOPS table of every experiment (training and evaluation apart) and the totals;
    pending experiments show their planned FLOPS."""
    rows, total_train, total_eval = [], 0, 0
    ledger_rows = sweep.ledger_rows()
    for row in ledger_rows:
        total_train, total_eval = total_train + row.train, total_eval + row.eval
        rows.append([tex_escape(row.experiment), sci(row.train) if row.train else "0",
                     sci(row.eval), sci(row.total), pct(row.total / BUDGET, 3)])
    total = sweep.ledger_total()
    if total != total_train + total_eval:  # the table must be the ledger, exactly
        raise QwenliteError("FLOPS table does not sum to the ledgers (a bug)")
    rows.append([r"\textbf{total used}", sci(total_train), sci(total_eval), sci(total),
                 pct(total / BUDGET, 3)])
    done = {r.experiment for r in ledger_rows if r.source == "sweep" and r.status == "done"}
    pending = [e for e in sweep.plan["experiments"] if e["name"] not in sweep.results]
    planned = sum(e["train_flops"] + e["eval_flops"] for e in pending)
    n["ledger.total"], n["ledger.share"] = sci(total), pct(total / BUDGET, 2)
    n["ledger.train"], n["ledger.eval"] = sci(total_train), sci(total_eval)
    n["ledger.sweep"] = sci(sum(r.total for r in ledger_rows if r.source == "sweep"))
    n["ledger.other"] = sci(sum(r.total for r in ledger_rows
                                if r.source != "sweep" and r.source not in sweep.nested))
    n["ledger.pendingflops"], n["ledger.npending"] = sci(planned), len(pending)
    n["ledger.projected"] = sci(total + planned)
    n["ledger.projectedshare"] = pct((total + planned) / BUDGET, 1)
    n["ledger.nexperiments"] = len(done)
    rules = (len(rows) - 2,)
    if pending:
        rows.append([rf"\textit{{planned, not run yet ({len(pending)} experiments)}}", "", "",
                     sci(planned), pct(planned / BUDGET, 3)])
        rules = (len(rows) - 3, len(rows) - 2)
    return tabular("lrrrr", ["experiment", "training", "evaluation", "total", "of budget"],
                   rows, rules)


def plan_numbers(n: Numbers, sweep: Sweep, full_plan) -> None:
    from qwenlite.experiments.plan import COURSEWORK_STEPS, DEFAULT

    s = sweep.plan["scale"]
    n["budget"] = sci(BUDGET, 0).replace(r"1\times", "")
    n["scale.name"] = tex_escape(s["name"])
    n["scale.shrunk"] = "shrunk" if sweep.plan["shrunk"] else "full"
    for key in ("grid_steps", "final_steps", "val_systems", "test_systems", "eval_interval",
                "eval_windows", "context_steps", "horizon"):
        n["scale." + key.replace("_", "")] = s[key]
    n["scale.why"] = tex_escape(s["why"])
    n["scale.lrs"] = ", ".join(lr_tex(x) for x in s["lrs"])
    n["scale.ranks"] = ", ".join(str(x) for x in s["ranks"])
    n["scale.contexts"] = ", ".join(str(x) for x in s["contexts"])
    n["default.lr"], n["default.rank"], n["default.context"] = (
        lr_tex(DEFAULT["lr"]), DEFAULT["rank"], DEFAULT["context"])
    n["default.batch"] = DEFAULT["batch"]
    for stage, steps in COURSEWORK_STEPS.items():
        n[f"coursework.{stage}steps"] = thousands(steps)
    n["plan.total"] = sci(sweep.plan["total_flops"])
    n["plan.share"] = pct(sweep.plan["total_flops"] / BUDGET, 1)
    n["plan.hours"] = f"{sweep.plan['total_hours']:.1f}"
    n["plan.n"], n["plan.done"] = len(sweep.names), len(sweep.results)
    n["plan.commit"] = tex_escape(str(sweep.plan.get("commit", "unknown"))[:7])
    if full_plan is not None:
        n["full.total"] = sci(full_plan.total_flops)
        n["full.share"] = pct(full_plan.total_flops / BUDGET, 1)
        n["full.gridsteps"] = full_plan.scale.grid_steps
        n["full.finalsteps"] = full_plan.scale.final_steps
    else:  # series too short for the full plan's 80 -> 20 forecasts
        for key in ("total", "share", "gridsteps", "finalsteps"):
            n[f"full.{key}"] = r"	extit{n/a}"
    weights = {w["name"] if isinstance(w := r.get("weights", ""), dict) else w
               for r in sweep.results.values()}
    n["weights"] = "stand-in" if any("standin" in w for w in weights) or not weights \
        else tex_escape(", ".join(sorted(weights)))


def choice_numbers(n: Numbers, sweep: Sweep) -> None:
    stages = sweep.choices.get("stages", {})
    grid = stages.get("grid")
    n["choice.grid"] = tex_escape(grid["chosen"]) if grid else PENDING
    n["choice.grid.lr"] = lr_tex(grid["sets"]["lr"]) if grid else PENDING
    n["choice.grid.rank"] = grid["sets"]["rank"] if grid else PENDING
    chosen = sweep.results.get(grid["chosen"]) if grid else None
    n["choice.grid.valmae"] = fixed(chosen["val"]["mae"]) if chosen else PENDING
    n["choice.grid.valloss"] = fixed(chosen.get("val_loss")) if chosen else PENDING
    ctx, ctl = stages.get("context"), stages.get("control")
    n["choice.context"] = ctx["sets"]["context"] if ctx else PENDING
    n["choice.bias"] = ("with" if ctl["sets"]["logit_bias"] else "without") if ctl else PENDING
    for stage in ("grid", "context", "control"):
        if stage in stages:
            n.mark_done("stage-" + stage)
    trained = [x for x in sweep.results if sweep.planned(x)["steps"]]
    best = sweep.best_trained()
    if best is not None:
        n["best.name"] = tex_escape(best)
        n["best.valmae"] = fixed(sweep.results[best]["val"]["mae"])
        n["best.valmedian"] = fixed(sweep.results[best]["val"]["median_system_mae"])
        n["ntrained"] = len(trained)
        zs = sweep.results.get("zeroshot")
        for key, field in (("cmp.best", "mae"), ("cmp.bestmedian", "median_system_mae")):
            ours = sweep.results[best]["val"][field]
            n[key] = PENDING if not zs else "below" if ours < zs["val"][field] else "above"
        n["nbetter"] = sum(sweep.results[x]["val"]["mae"] < zs["val"]["mae"]
                           for x in trained) if zs else PENDING
    else:
        for key in ("best.name", "best.valmae", "best.valmedian", "ntrained", "nbetter",
                    "cmp.best", "cmp.bestmedian"):
            n[key] = 0 if key in ("ntrained", "nbetter") else PENDING


DIAG_KEYS = ("systems", "samples", "temperature", "truthcollapsed", "horizon", "betterfor",
             *(f"{m}.{f}" for m in ("base", "adapter") for f in (
                 "nll.units", "nll.dec1", "nll.dec2", "nll.all", "acc", "mae", "hone", "hlast",
                 "samplemae", "collapsed")))


def diagnosis_numbers(n: Numbers, diag: dict | None) -> None:
    """``diag.*`` from the diagnosis of the worse-than-zero-shot adapter (pending without)."""
    if diag is None:
        for key in DIAG_KEYS:
            n["diag." + key] = PENDING
        return
    n.mark_done("diagnosis")
    n["diag.systems"] = len(diag["systems"])
    n["diag.samples"] = diag["samples"]
    n["diag.temperature"] = f"{diag['temperature']:g}"
    for key, short in (("base", "base"), ("adapter_model", "adapter")):
        d = diag[key]
        tf, g, sm = d["teacher_forced"], d["greedy"], d["sample_median"]
        for c in ("units", "dec1", "dec2", "all"):
            n[f"diag.{short}.nll.{c}"] = fixed(tf["nll"][c])
        n[f"diag.{short}.acc"] = fixed(tf["argmax_acc"]["all"], 2)
        n[f"diag.{short}.mae"] = fixed(g["mae"])
        n[f"diag.{short}.hone"] = fixed(g["mae_by_horizon"][0])
        n[f"diag.{short}.hlast"] = fixed(g["mae_by_horizon"][-1])
        n[f"diag.{short}.samplemae"] = fixed(sm["mae"])
        n[f"diag.{short}.collapsed"] = g["collapsed"]
    n["diag.truthcollapsed"] = diag["base"]["greedy"]["collapsed_truth"]
    n["diag.horizon"] = diag["horizon"]
    ad, bs = diag["adapter_model"]["greedy"]["mae_by_horizon"], \
        diag["base"]["greedy"]["mae_by_horizon"]
    n["diag.betterfor"] = next((i for i, (a, b) in enumerate(zip(ad, bs)) if a >= b), len(ad))


def write_figures(sweep: Sweep, diag: dict | None, out: Path) -> list[str]:
    return [figures.loss_curves(sweep, out), figures.grid_heatmap(sweep, out),
            figures.context_bars(sweep, out), figures.control_bars(sweep, out),
            figures.forecasts(sweep, out), figures.horizon(sweep, out),
            figures.diagnosis(diag, out)]


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the freshly generated ``tmp`` in place of ``out`` (nothing stale stays)."""
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
