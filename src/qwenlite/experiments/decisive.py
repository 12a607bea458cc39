"""The report's numbers and table for the halving sweep (``report/results/halving``): the
decisive experiment, told as far as it has run.

``h.*`` keys: its progress and FLOPS, the calibration (the paired fp32/bf16 zero-shot comparison
that chose the dtype, the step times measured on each CPU), what the grammar changed, and for
every experiment its validation MAE overall, over the first and last quarter of the horizon, and
paired against the zero-shot model on the same systems. ``table-halving.tex`` tables them. A
sweep directory without a halving sweep gives every key as *pending*.
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qwenlite.errors import QwenliteError
from qwenlite.experiments.halving import REMEDY
from qwenlite.experiments.latex import Numbers, fixed, pct, sci, tabular, tex_escape

if TYPE_CHECKING:
    from qwenlite.experiments.collect import Sweep

PENDING = r"\textit{pending}"
#: the fields of a paired comparison (:func:`_paired`)
PAIRED = ("diff", "lo", "hi", "lower", "n", "verdict")
SUB = "halving"
UNTRAINED = ("calibration", "zeroshot", "test")  # the stages that train nothing
KEYS = ("n", "done", "planned", "plannedshare", "spent", "spentshare", "valsystems",
        "testsystems", "rungs", "keep", "branchsteps", "finalsteps", "checkpoints", "lambdas",
        "dtype", "dtype.diff", "dtype.lo", "dtype.hi", "dtype.ties", "dtype.n", "dtype.fp32",
        "dtype.bf16", "cal.cpu", "cal.bf16step", "cal.fp32step", "zs.masked", "zs.valmae",
        "zs.valmedian", "zs.early", "zs.late", "trained", "better", "worse", "best.name",
        "best.steps", "best.valmae", "best.early", "best.late", "best.diff", "best.lo", "best.hi",
        "best.lower", "continued", "improved", "earlyimproved", "lateimproved", "best.parent",
        "best.parentsteps", "best.parentvalmae", "best.parentlate", "choice.rung1",
        "choice.rung2", "choice.branch", "choice.final", "choice.remedy",
        *(f"margin.{stage}.{f}" for stage in ("rung1", "rung2", "branch", "final", REMEDY)
          for f in ("name", *PAIRED)))


#: each run's numbers by name (``h.run.<name>.*``): validation MAE, by horizon, against zero-shot
RUN_FIELDS = ("valmae", "early", "late", *PAIRED)
#: the final model on test (:func:`_test_numbers`)
TEST_KEYS = ("model", "steps", "lambda", *(f"{pre}{part}" for pre in ("", "zs")
                                           for part in ("all", "early", "late")),
             *(f"{part}.{f}" for part in ("all", "early", "late") for f in PAIRED))


#: the final line's checkpoints (:func:`_line`): its first, its last, and the lowest late error
LINE_KEYS = tuple(f"{at}.{f}" for at in ("first", "last", "minlate")
                  for f in ("steps", "valmae", "early", "late"))


def _pending(n: Numbers) -> str:
    """Every key as pending, the per-run ones for the experiments of the default halving plan."""
    from qwenlite.experiments.halving import experiments
    from qwenlite.experiments.plan import SCALES

    for key in KEYS:
        n[f"h.{key}"] = PENDING
    for key in TEST_KEYS:
        n[f"h.test.{key}"] = PENDING
    for key in LINE_KEYS:
        n[f"h.line.{key}"] = PENDING
    for e in experiments(SCALES["halving"]):
        if e.stage in UNTRAINED:
            continue
        for field in RUN_FIELDS:
            n[f"h.run.{e.name}.{field}"] = PENDING
        if e.stage == "branch" and e.name != "branch-base" and e.parent:
            for part in ("all", "late"):
                for field in PAIRED:
                    n[f"h.vsbase.{e.name}.{part}.{field}"] = PENDING
    return "% the halving sweep has not started\n"


def _system_quarters(pred: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-system MAE over all forecast steps, the first and the last quarter of the horizon."""
    err = np.abs(pred["pred_qwen"] - pred["truth"])  # (S, h, V)
    q = max(1, err.shape[1] // 4)
    return (np.nanmean(err, axis=(1, 2)), np.nanmean(err[:, :q], axis=(1, 2)),
            np.nanmean(err[:, -q:], axis=(1, 2)))


def _quarters(pred: dict) -> tuple[float, float]:
    """MAE over the first and the last quarter of the horizon: the mean over systems of
    :func:`_system_quarters` (every system weighs the same, as in the per-system comparisons)."""
    _, early, late = _system_quarters(pred)
    return float(np.nanmean(early)), float(np.nanmean(late))


def _paired(n: Numbers, key: str, a: np.ndarray | None, b: np.ndarray | None) -> dict | None:
    """``key.diff/lo/hi/lower/n``: ``a`` − ``b`` per system, paired interval (pending
    without both); ``key.verdict``: :func:`~qwenlite.experiments.trends.verdict`'s words to put
    between the two names. Returns the comparison
    (:func:`~qwenlite.evaluation.metrics.paired_difference`), None without both."""
    from qwenlite.evaluation.metrics import paired_difference
    from qwenlite.experiments.trends import NA, signed, verdict  # signed: a real minus

    p = paired_difference(a, b) if a is not None and b is not None else None
    if p is not None and p["n"] == 0:  # no system that both scored: nothing to compare
        for field in PAIRED:
            n[f"{key}.{field}"] = NA
        return None
    for field, value in (("diff", p and signed(p["mean"])), ("lo", p and signed(p["ci"][0])),
                         ("hi", p and signed(p["ci"][1])), ("lower", p and p["lower"]),
                         ("n", p and p["n"]), ("verdict", p and verdict(*p["ci"]))):
        n[f"{key}.{field}"] = PENDING if value is None else value
    return p


def _test_numbers(n: Numbers, sweep, zs_name: str | None) -> None:
    """``h.test.*``: the final model (the test stage) against the zero-shot model on the test
    systems: MAE overall (the results' own) and over the first and last quarter of the horizon,
    each paired per system; the run whose adapter it scores (``model``), that run's steps and
    the adapter's scale. Pending until it has run, then ``\\IfDone{h-final}`` holds."""
    final = sweep.results.get("final")
    zero = sweep.results.get("zeroshot")
    pred = sweep.predictions("final", "test") if final else None
    zs = sweep.predictions("zeroshot", "test") if zs_name and zero else None
    same = pred is not None and zs is not None and np.array_equal(pred["systems"], zs["systems"])
    mine = _system_quarters(pred) if same else (None,) * 3
    base = _system_quarters(zs) if same else (None,) * 3
    for part, a, b in zip(("all", "early", "late"), mine, base):
        if part == "all":  # the overall MAE as every other table gives it
            a_mean = final["test"]["mae"] if same else None
            b_mean = zero["test"]["mae"] if same else None
        else:
            a_mean = None if a is None else float(np.nanmean(a))
            b_mean = None if b is None else float(np.nanmean(b))
        n[f"h.test.{part}"] = PENDING if a_mean is None else fixed(a_mean)
        n[f"h.test.zs{part}"] = PENDING if b_mean is None else fixed(b_mean)
        _paired(n, f"h.test.{part}", a, b)
    st = final["settings"] if final else {}
    run = (final.get("adapter") or f"{st['parent']}/train").split("/")[0] if final else None
    scored = sweep.results.get(run or "", {}).get("settings", {})
    n["h.test.model"] = tex_escape(run) if run else PENDING
    n["h.test.steps"] = f"{scored['steps']:,}" if "steps" in scored else PENDING
    n["h.test.lambda"] = f"{st.get('adapter_scale', 1.0):g}" if final else PENDING
    if same:
        n.mark_done("h-final")


def _best(n: Numbers, trained: list) -> None:
    """``h.trained``, ``h.better``/``h.worse`` (runs whose paired interval against zero-shot lies
    below/above 0)
    and ``h.best.*``: the trained run of lowest validation MAE, by horizon and paired."""
    n["h.trained"] = len(trained)
    n["h.better"] = sum(1 for *_, p in trained if p is not None and p["ci"][1] < 0)
    n["h.worse"] = sum(1 for *_, p in trained if p is not None and p["ci"][0] > 0)
    if not trained:
        for key in ("name", "steps", "valmae", "early", "late", "diff", "lo", "hi", "lower"):
            n[f"h.best.{key}"] = PENDING
        return
    mae, name, steps, early, late, _ = min(trained, key=lambda t: t[0])
    n["h.best.name"], n["h.best.steps"] = tex_escape(name), f"{steps:,}"
    n["h.best.valmae"], n["h.best.early"], n["h.best.late"] = fixed(mae), fixed(early), fixed(late)
    for key in ("diff", "lo", "hi", "lower"):  # its comparison, as its own row gives it
        n[f"h.best.{key}"] = n[f"h.run.{name}.{key}"]


def _lineage(n: Numbers, runs: list[dict]) -> None:
    """``h.continued``: scored runs that continue training a scored run; ``h.improved``,
    ``h.earlyimproved`` and ``h.lateimproved``: of those, how many lowered the validation MAE,
    overall and over the first and the last quarter of the horizon; ``h.best.parent*``: the
    best run's parent, as it scored (``runs`` as :func:`scored_runs` gives them)."""
    by_name = {r["name"]: r for r in runs}
    pairs = [(r, by_name[r["parent"]]) for r in runs
             if r["parent"] in by_name and r["stage"] != REMEDY]  # a remedy continues nothing
    n["h.continued"] = len(pairs)
    for key, part in (("improved", "mae"), ("earlyimproved", "early"), ("lateimproved", "late")):
        n[f"h.{key}"] = sum(1 for child, parent in pairs if child[part] < parent[part])
    best = min(runs, key=lambda r: r["mae"]) if runs else None
    parent = by_name.get(best["parent"]) if best else None
    if parent is None:
        for key in ("parent", "parentsteps", "parentvalmae", "parentlate"):
            n[f"h.best.{key}"] = PENDING
        return
    n["h.best.parent"], n["h.best.parentsteps"] = tex_escape(parent["name"]), f"{parent['steps']:,}"
    n["h.best.parentvalmae"], n["h.best.parentlate"] = fixed(parent["mae"]), fixed(parent["late"])


def _line_runs(runs: list[dict]) -> list[dict]:
    """The final line's scored checkpoints in step order: the branch it continues, then its
    segments (``runs`` as :func:`scored_runs` gives them); [] before a segment is scored."""
    by_name = {r["name"]: r for r in runs}
    segments = [r for r in runs if r["stage"] == "final"]
    branch = segments[0]["parent"] if segments else None  # what the line continued
    return ([by_name[branch]] if branch in by_name else []) + segments


def _line(n: Numbers, runs: list[dict], sweep) -> None:
    """``h.line.{first,last,minlate}.{steps,valmae,early,late}``: how the forecast error moves
    along the final line — the branch it continues (its first checkpoint), its newest scored
    segment, and the checkpoint with the lowest error over the last quarter of the horizon.
    ``\\IfDone{h-line}`` holds once a segment is scored."""
    line = _line_runs(runs)
    at = {"first": line[0], "last": line[-1],
          "minlate": min(line, key=lambda r: r["late"])} if len(line) > 1 else {}
    for key in LINE_KEYS:
        where, field = key.split(".")
        r = at.get(where)
        n[f"h.line.{key}"] = (PENDING if r is None else f"{r['steps']:,}" if field == "steps"
                              else fixed(r["mae" if field == "valmae" else field]))
    if at:
        n.mark_done("h-line")


def _scored(sweep, zs_name: str | None) -> tuple[list[dict], dict | None, tuple[int, ...]]:
    """:func:`scored_runs` for a loaded sweep whose zero-shot model is ``zs_name``."""
    zs_pred = sweep.predictions(zs_name, "val") if zs_name else None
    zero = None
    if zs_pred is not None:
        early, late = _quarters(zs_pred)
        zero = {"mae": float(np.nanmean(np.abs(zs_pred["pred_qwen"] - zs_pred["truth"]))),
                "early": early, "late": late}
    runs = []
    for e in sweep.plan["experiments"]:
        r = sweep.results.get(e["name"])
        if e["stage"] in UNTRAINED or r is None:
            continue
        pred = sweep.predictions(e["name"], "val")
        if pred is None:
            continue
        early, late = _quarters(pred)
        runs.append({"name": e["name"], "stage": e["stage"], "steps": r["settings"]["steps"],
                     "parent": r["settings"].get("parent") or "", "mae": r["val"]["mae"],
                     "early": early, "late": late})
    steps = tuple(sorted({e["steps"] for e in sweep.plan["experiments"]
                          if e["stage"] not in UNTRAINED}))
    return runs, zero, steps


def _choices(n: Numbers, sweep) -> None:
    """``h.choice.<stage>``: each ranked stage's choice; ``h.margin.<stage>.*``: the choice
    against the stage's runner-up on the same validation systems, paired (``.name`` is the
    runner-up's): whether the choice was distinguishable from the next best."""
    from qwenlite.experiments.trends import system_mae

    for stage in ("rung1", "rung2", "branch", "final", REMEDY):
        ranking = sweep.choices.get("ranking", {}).get(stage) or []
        n[f"h.choice.{stage}"] = tex_escape(ranking[0]) if ranking else PENDING
        n[f"h.margin.{stage}.name"] = tex_escape(ranking[1]) if len(ranking) > 1 else PENDING
        a, b = ((system_mae(sweep, x, "val") for x in ranking[:2]) if len(ranking) > 1
                else (None, None))
        same = a is not None and b is not None and np.array_equal(a[0], b[0])
        _paired(n, f"h.margin.{stage}", a[1] if same else None, b[1] if same else None)


def _against_base(n: Numbers, sweep, plan: dict) -> None:
    """``h.vsbase.<run>.{all,late}.*``: each LoRA branch against the branch that continues
    unchanged (``branch-base``), paired on the validation systems, over all forecast steps and
    the last quarter of the horizon: what a longer or shorter context, or the bias, changed."""
    base = sweep.predictions("branch-base", "val") if "branch-base" in sweep.results else None
    for e in plan["experiments"]:
        if e["stage"] != "branch" or e["name"] == "branch-base" or not e.get("parent"):
            continue
        pred = sweep.predictions(e["name"], "val") if e["name"] in sweep.results else None
        same = base is not None and pred is not None and np.array_equal(base["systems"],
                                                                         pred["systems"])
        mine, theirs = (_system_quarters(pred), _system_quarters(base)) if same else ((None,) * 3,
                                                                                    (None,) * 3)
        for part, i in (("all", 0), ("late", 2)):
            _paired(n, f"h.vsbase.{e['name']}.{part}", mine[i], theirs[i])


def _dtype_record(root: Path) -> dict:
    """The sweep's ``dtype.json`` (the dtype and the comparison that chose it), {} before it."""
    from qwenlite.experiments.halving import DTYPE_FILE
    from qwenlite.io import read_json_object

    return read_json_object(root / DTYPE_FILE, "dtype") if (root / DTYPE_FILE).is_file() else {}


def _zeroshot_name(d: dict) -> str | None:
    """The zero-shot experiment in the dtype ``d`` (:func:`_dtype_record`) records, or None."""
    return f"zeroshot-{d['dtype']}" if d else None


@dataclass(frozen=True)
class Halving:
    """The halving sweep of a results directory, loaded once for the report's numbers, table
    and figures (:func:`load_halving`)."""

    root: Path
    sweep: Sweep
    dtype: dict  # its dtype.json (:func:`_dtype_record`)

    @property
    def zs_name(self) -> str | None:
        """The zero-shot experiment in the sweep's dtype, None before the calibration chose."""
        return _zeroshot_name(self.dtype)

    @functools.cached_property
    def scored(self) -> tuple[list[dict], dict | None, tuple[int, ...]]:
        """:func:`scored_runs`' answer, computed once: it reads every run's predictions."""
        return _scored(self.sweep, self.zs_name)


def load_halving(results: Path) -> Halving | None:
    """``results/halving`` loaded, or None where the sweep has not started (no plan)."""
    from qwenlite.experiments.collect import PLAN, load_sweep

    root = results / SUB
    if not (root / PLAN).is_file():
        return None
    return Halving(root, load_sweep(root), _dtype_record(root))


def scored_runs(h: Halving | None) -> tuple[list[dict], dict | None, tuple[int, ...]]:
    """Every scored trained run of the halving sweep (name, stage, steps, parent — "" for none
    —, validation MAE overall and over the first and last quarter of the horizon), in the
    plan's order; the zero-shot model's scores; and the step counts the plan scores runs at.
    ([], None, ()) where the sweep has not started."""
    if h is None:
        return [], None, ()
    return h.scored


def _by_step(pred: dict, key: str = "pred_qwen") -> np.ndarray:
    """MAE at each forecast step, over the systems and both variables (h,)."""
    return np.nanmean(np.abs(pred[key] - pred["truth"]), axis=(0, 2))


#: the baselines the test panel draws, by their key in ``predictions.npz``
BASELINES = (("pred_persistence", "persistence"), ("pred_linear", "linear trend"),
             ("pred_lv_ode", "fitted LV ODE"))


def horizon_curves(h: Halving | None) -> dict[str, list[tuple[str, int | None, np.ndarray]]]:
    """MAE by forecast step for the report's figure (:func:`~qwenlite.experiments.figures.
    halving_horizon`), as (label, steps or None, curve) rows:

    - ``val``: the zero-shot model, then each scored checkpoint of the final line in step
      order (the branch it continues, then its segments), on the validation systems;
    - ``test``: once the test stage has run, the zero-shot model, the final model (its steps;
      its adapter's scale in the label where not 1) and the baselines, on the test systems.

    Empty lists before there is anything to draw, or where the models' systems differ."""
    curves: dict[str, list] = {"val": [], "test": []}
    if h is None:
        return curves
    sweep, zs_name = h.sweep, h.zs_name
    zs = sweep.predictions(zs_name, "val") if zs_name else None
    line = _line_runs(h.scored[0])
    if zs is not None and line:
        preds = [sweep.predictions(r["name"], "val") for r in line]
        if all(np.array_equal(p["systems"], zs["systems"]) for p in preds):
            curves["val"] = [("zero-shot", None, _by_step(zs))] + [
                (f"{r['steps']:,} steps", r["steps"], _by_step(p)) for r, p in zip(line, preds)]
    final = sweep.results.get("final")
    pred = sweep.predictions("final", "test") if final else None
    zs = sweep.predictions("zeroshot", "test") if "zeroshot" in sweep.results else None
    if pred is not None and zs is not None and np.array_equal(pred["systems"], zs["systems"]):
        run = (final.get("adapter") or f"{final['settings']['parent']}/train").split("/")[0]
        steps = sweep.results.get(run, {}).get("settings", {}).get("steps")
        lam = final["settings"].get("adapter_scale", 1.0)
        label = "final model" + (f", {steps:,} steps" if steps else "") + (
            f", $\\lambda$ = {lam:g}" if lam != 1 else "")
        curves["test"] = [("zero-shot", None, _by_step(zs)), (label, steps, _by_step(pred))] + [
            (name, None, _by_step(pred, key)) for key, name in BASELINES if key in pred]
    return curves


def halving_numbers(n: Numbers, h: Halving | None) -> str:
    """Fill ``h.*`` from the halving sweep (:func:`load_halving`) and return its table (see the
    module docstring); every key pending where it has not started (None)."""
    from qwenlite.experiments.calibration import load as load_calibration
    from qwenlite.experiments.trends import signed, system_mae

    if h is None:
        return _pending(n)
    root, sweep, d, zs_name = h.root, h.sweep, h.dtype, h.zs_name
    plan, s = sweep.plan, sweep.plan["scale"]
    n["h.n"], n["h.done"] = len(sweep.names), len(sweep.results)
    n["h.planned"] = sci(plan["total_flops"])
    n["h.plannedshare"] = pct(plan["total_flops"] / plan["budget"], 1)
    spent = sweep.ledger_total()
    n["h.spent"], n["h.spentshare"] = sci(spent), pct(spent / plan["budget"], 2)
    n["h.valsystems"], n["h.testsystems"] = s["val_systems"], s["test_systems"]
    n["h.rungs"] = ", ".join(f"{x:,}" for x in s["rungs"])
    n["h.keep"], n["h.branchsteps"] = s["keep"], f"{s['branch_steps']:,}"
    n["h.finalsteps"] = f"{s['final_steps']:,}"
    n["h.checkpoints"] = ", ".join(f"{x:,}" for x in s["checkpoints"])
    n["h.lambdas"] = ", ".join(f"{x:g}" for x in s.get("adapter_scales", ())) or "--"
    n["h.dtype"] = d.get("dtype", PENDING)
    diff = d.get("bf16_minus_fp32_mae")
    for key, value in (("diff", diff and f"{diff['mean']:+.4f}"),
                       ("lo", diff and f"{diff['ci'][0]:+.4f}"),
                       ("hi", diff and f"{diff['ci'][1]:+.4f}"),
                       ("ties", diff and diff["ties"]), ("n", diff and diff["n"]),
                       ("fp32", diff and fixed(d["fp32_mae"])),
                       ("bf16", diff and fixed(d["bf16_mae"]))):
        n[f"h.dtype.{key}"] = PENDING if value is None else value
    timings = load_calibration(root)["timings"]
    last = timings[-1] if timings else None
    n["h.cal.cpu"] = tex_escape(last["machine"]["cpu"]) if last else PENDING
    for dtype in ("bf16", "fp32"):
        t = last["train"].get(dtype) if last else None
        n[f"h.cal.{dtype}step"] = f"{statistics.median(t['step_seconds']):.1f}" if t else PENDING
    zs = sweep.evaluation(zs_name, "val") if zs_name else None
    if zs:
        parse = zs["results"]["qwen"]["parse"]
        n["h.zs.masked"] = pct(parse.get("masked_step_rate", 0.0), 2)
        n["h.zs.valmae"] = fixed(zs["results"]["qwen"]["original"]["metrics"]["overall"]["mae"])
        n["h.zs.valmedian"] = fixed(zs["results"]["qwen"]["original"]["systems"]["mae"]["median"])
    else:
        for key in ("masked", "valmae", "valmedian"):
            n[f"h.zs.{key}"] = PENDING
    base = system_mae(sweep, zs_name, "val") if zs_name else None
    runs, zero, _ = h.scored
    scored = {r["name"]: r for r in runs}
    for key in ("early", "late"):
        n[f"h.zs.{key}"] = PENDING if zero is None else fixed(zero[key])
    trained: list[tuple[float, str, int, float, float, dict | None]] = []
    rows, rules, last_stage = [], [], None
    for e in plan["experiments"]:
        name, r = e["name"], sweep.results.get(e["name"])
        if e["stage"] in UNTRAINED:
            continue
        if last_stage is not None and e["stage"] != last_stage:
            rules.append(len(rows) - 1)
        last_stage = e["stage"]
        st = r["settings"] if r else e
        parent = st.get("parent") or "--"
        # a remedy row's steps are its parent's, known once it ran
        steps = f"{st['steps']:,}" if r or e["stage"] != REMEDY else PENDING
        cells = [tex_escape(name), steps, tex_escape(parent)]
        cells += [f"{st['lr']:g}" if st.get("lr") else PENDING,
                  str(st["rank"]) if st.get("rank") is not None else PENDING,
                  str(st["context"]) if st.get("context") else PENDING]
        key = f"h.run.{name}"
        if name not in scored:
            rows.append(cells + [PENDING] * 4)
            for field in RUN_FIELDS:
                n[f"{key}.{field}"] = PENDING
            continue
        n.mark_done(f"h-{name}")
        early, late = scored[name]["early"], scored[name]["late"]
        n[f"{key}.valmae"], n[f"{key}.early"] = fixed(r["val"]["mae"]), fixed(early)
        n[f"{key}.late"] = fixed(late)
        mine = system_mae(sweep, name, "val")
        same = base is not None and np.array_equal(base[0], mine[0])
        p = _paired(n, key, mine[1] if same else None, base[1] if same else None)
        cmp = (f"{signed(p['mean'])} [{signed(p['ci'][0])}, {signed(p['ci'][1])}]" if p
               else "--")
        trained.append((r["val"]["mae"], name, st["steps"], early, late, p))
        rows.append(cells + [fixed(r["val"]["mae"]), fixed(early), fixed(late), cmp])
    _best(n, trained)
    _lineage(n, runs)
    _line(n, runs, sweep)
    _test_numbers(n, sweep, zs_name)
    _choices(n, sweep)
    _against_base(n, sweep, plan)
    if not rows:
        return "% no trained experiment in the halving sweep\n"
    return tabular("lrlrrrrrrl", ["experiment", "steps", "continues", "lr", "rank", "context",
                                  "val MAE", "early", "late", r"$-$ zero-shot [95\% CI]"],
                   rows, tuple(rules))


#: the replay that measured whether a halving run repeats (``report/results/<REPRO>/README.md``)
REPRO = Path("diagnosis") / "repro-context-768"
REPRO_KEYS = ("steps", "same", "other", "evaln", "evalsame")


def _losses(path: Path) -> dict[int, float]:
    """Training loss by step of a run's ``metrics.jsonl``."""
    from qwenlite.io import read_records

    return {r["step"]: r["loss"] for r in read_records(path) if "loss" in r}


def repro_numbers(n: Numbers, results: Path) -> None:
    """``repro.*``, from the replay of context-768's steps after its step-950 checkpoint
    (``results/diagnosis/repro-context-768``): ``steps`` replayed after the checkpoint its
    ``origin.json`` names, how many of their losses equal the committed run's bit for bit
    (``same``, the same machine), the largest relative difference from another machine's log of
    the same steps (``other``), and of the ``evaln`` validation systems rescored with the
    committed adapter, how many got the same forecast (``evalsame``). Pending while any of
    those files is missing or the logs share no step; then ``\\IfDone{repro}`` holds."""
    from qwenlite.io import read_json_object
    from qwenlite.training.checkpoint import ORIGIN

    root, committed = results / REPRO, results / SUB / "context-768"
    replay, origin = root / "train-from-950" / "metrics.jsonl", root / "train-from-950" / ORIGIN
    run_log = committed / "train" / "metrics.jsonl"
    other_log = root / "session19-steps-951-959.jsonl"  # another machine's log of those steps
    rescored = root / "eval-val-20" / "predictions.npz"
    scored = committed / "eval-val" / "predictions.npz"
    steps: list[int] = []
    if all(f.is_file() for f in (replay, origin, run_log, other_log, rescored, scored)):
        start = read_json_object(origin, "run origin")["step"]
        mine, theirs, other = _losses(replay), _losses(run_log), _losses(other_log)
        steps = sorted(s for s in set(mine) & set(other) if s > start)
    if not steps:
        for key in REPRO_KEYS:
            n[f"repro.{key}"] = PENDING
        return
    n["repro.steps"] = len(steps)
    n["repro.same"] = sum(1 for s in steps if mine[s] == theirs.get(s))
    n["repro.other"] = pct(max(abs(mine[s] - other[s]) / other[s] for s in steps), 1)
    a, b = np.load(rescored), np.load(scored)
    k = len(a["systems"])
    if not np.array_equal(a["systems"], b["systems"][:k]):
        raise QwenliteError(f"{root} rescored other systems than {committed}'s first {k}")
    n["repro.evaln"] = k
    n["repro.evalsame"] = sum(np.array_equal(x, y, equal_nan=True)
                              for x, y in zip(a["pred_qwen"], b["pred_qwen"][:k]))
    n.mark_done("repro")
