"""``python -m qwenlite.report``: every table, figure and number of ``report/main.pdf``.

Reads the committed sweep (``report/results/``: results, choices, the plan) and every ledger
under it, writes ``report/generated/`` (``numbers.tex``, ``table-*.tex``, ``fig-*.pdf/png``;
:mod:`qwenlite.experiments.report`), then checks ``report/main.tex``: no number typed by hand
(each comes through ``\\R{key}``), no key that nothing generated, at most 3000 words in the
body. ``--pdf`` then builds ``report/main.pdf`` with ``latexmk -pdf``.

The LLMTIME worked examples need the dataset (``--data``) and a tokenizer (``--tokenizer``, or
the checkpoint's); nothing else here runs the model.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from qwenlite.cli import (
    ArgumentParser,
    add_data_arg,
    add_weights_arg,
    creatable_dir,
    existing_dir,
    existing_file,
    main_guard,
    resolve_weights,
)
from qwenlite.errors import QwenliteError

REPORT = Path("report")
MAX_WORDS = 3000


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m qwenlite.report",
                            description="Regenerate the report's tables, figures and numbers "
                                        "from the committed results; --pdf builds main.pdf.")
    parser.add_argument("--results", type=existing_dir, default=REPORT / "results",
                        help="sweep directory (default report/results)")
    parser.add_argument("--out", type=creatable_dir, default=REPORT / "generated",
                        help="where the generated files go (default report/generated)")
    parser.add_argument("--tex", type=existing_file, default=None,
                        help="the report's source to check (default report/main.tex, if any)")
    add_weights_arg(parser)
    add_data_arg(parser, help="HDF5 dataset of the LLMTIME examples (default: the one "
                              "RESULTS/plan.json records, the sweep's)")
    parser.add_argument("--tokenizer", type=existing_file, default=None,
                        help="tokenizer.json for the LLMTIME examples (default: the weights')")
    parser.add_argument("--pdf", action="store_true", help="then build main.pdf with latexmk")
    return parser


def check_tex(tex: str, defined: set[str], max_words: int = MAX_WORDS) -> int:
    """Raise (one line) if ``tex`` types a number by hand, reads a key nothing defines, or is
    over ``max_words``; return its word count."""
    from qwenlite.experiments.latex import body_of, hand_typed_numbers, strip_comments, word_count

    typed = hand_typed_numbers(body_of(tex))
    if typed:
        shown = ", ".join(typed[:5]) + (", ..." if len(typed) > 5 else "")
        raise QwenliteError(f"the report types {len(typed)} number(s) by hand ({shown}): "
                            f"generate them and use \\R{{key}}")
    missing = sorted(set(re.findall(r"\\R\{([^{}]*)\}", strip_comments(tex))) - defined)
    if missing:
        raise QwenliteError(f"the report reads {len(missing)} number(s) nothing generates: "
                            f"{', '.join(missing[:5])}")
    words = word_count(tex)
    if words > max_words:
        raise QwenliteError(f"the report's body has {words} words, over {max_words}")
    return words


def _diagnosis(sweep) -> dict | None:
    for directory in sweep.extra.values():
        for path in sorted(directory.glob("*/diagnosis.json")):
            return json.loads(path.read_text())
    return None


def generate(results: Path, out: Path, data: Path, tokenizer, tex: Path | None) -> dict:
    """Write every generated file into ``out`` (replacing it whole) and check ``tex``."""
    from qwenlite.data import load_dataset, split_systems
    from qwenlite.data.llmtime import LLMTimeSettings, fit_alpha
    from qwenlite.experiments import figures, method
    from qwenlite.experiments import report as R
    from qwenlite.experiments.collect import load_sweep
    from qwenlite.experiments.decisive import (
        halving_numbers,
        horizon_curves,
        load_halving,
        repro_numbers,
        scored_runs,
    )
    from qwenlite.experiments.latex import Numbers
    from qwenlite.experiments.markdown import results_markdown
    from qwenlite.experiments.plan import CONTEXTS, RANKS, SCALES, build_plan
    from qwenlite.experiments.trends import (
        grid_numbers,
        horizon_numbers,
        paired_numbers,
        replay_numbers,
    )
    from qwenlite.model.config import QwenConfig

    sweep, halving = load_sweep(results), load_halving(Path(results))
    dataset = load_dataset(data)
    split = split_systems(len(dataset.trajectories), seed=0)
    settings = fit_alpha(dataset.trajectories[split.train], LLMTimeSettings())
    recorded = sweep.evaluation("zeroshot", "val")
    if recorded and abs(recorded["alpha"] - settings.alpha) > 1e-9 * settings.alpha:
        raise QwenliteError(f"{data} is not the sweep's dataset: its alpha is "
                            f"{settings.alpha:.6g}, the sweep's {recorded['alpha']:.6g}")
    config = QwenConfig.from_name("qwen2.5-0.5b")
    diag = _diagnosis(sweep)
    n = Numbers()
    flops = {r.experiment: (r.train, r.eval) for r in sweep.ledger_rows() if r.source == "sweep"}
    R.experiment_numbers(n, sweep, flops)
    try:  # the coursework's full plan, costed on this dataset (too short a series: none)
        full_plan = build_plan(SCALES["full"], config, dataset.trajectories)
    except QwenliteError:
        full_plan = None
    R.plan_numbers(n, sweep, full_plan)
    R.choice_numbers(n, sweep)
    grid_numbers(n, sweep, sweep.plan["scale"]["lrs"])
    paired_numbers(n, sweep)
    replay_numbers(n, sweep)
    horizon_numbers(n, sweep)
    R.diagnosis_numbers(n, diag)
    repro_numbers(n, Path(results))
    scale = sweep.plan["scale"]  # the coursework's contexts and ranks, and the sweep's own
    method.training_numbers(n, config, dataset.trajectories, split.train, settings, tokenizer,
                            sorted({*CONTEXTS, *scale["contexts"]}),
                            sorted({*RANKS, *scale["ranks"]}))
    tables = {"experiments": R.results_table(sweep), "baselines": R.baseline_numbers(n, sweep),
              "halving": halving_numbers(n, halving),
              "flops": R.flops_numbers(n, sweep),
              "flops-components": method.flops_accounting(n, config, 512, 4, 4),
              "llmtime": method.llmtime_examples(n, dataset.trajectories, split.train, settings,
                                                 tokenizer)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        for name, body in tables.items():
            (tmp / f"table-{name}.tex").write_text(body)
        (tmp / "numbers.tex").write_text(n.tex())
        (tmp / "experiments.md").write_text(results_markdown(sweep))
        figs = R.write_figures(sweep, diag, tmp)
        runs, zero, steps = scored_runs(halving)
        figs.append(figures.halving_steps(runs, zero, tmp, steps))
        figs.append(figures.halving_horizon(horizon_curves(halving), tmp))
        words = check_tex(tex.read_text(), set(n.values)) if tex else None
        R.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"numbers": len(n.values), "tables": len(tables), "figures": len(figs),
            "words": words, "done": len(sweep.results), "planned": len(sweep.names)}


def build_pdf(tex: Path) -> Path:
    """``latexmk -pdf`` in the report's directory; the auxiliary files are cleaned after."""
    if shutil.which("latexmk") is None:
        raise QwenliteError("latexmk is not installed (Debian: apt-get install latexmk "
                            "texlive-latex-recommended texlive-latex-extra "
                            "texlive-fonts-recommended)")
    cmd = ["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", tex.name]
    proc = subprocess.run(cmd, cwd=tex.parent, capture_output=True, text=True)
    if proc.returncode:
        errors = [line for line in proc.stdout.splitlines() if line.startswith("!")]
        where = errors[0] if errors else f"see {tex.stem}.log"
        raise QwenliteError(f"latexmk failed: {where}")
    subprocess.run(["latexmk", "-c", tex.name], cwd=tex.parent, capture_output=True)
    return tex.with_suffix(".pdf")


def sweep_data(results: Path) -> Path | None:
    """The dataset the sweep in ``results`` ran on, as its ``plan.json`` records it (a path
    relative to the checkout, or absolute); None where no plan records one."""
    from qwenlite.io import read_json_object

    plan = results / "plan.json"
    recorded = read_json_object(plan, "sweep plan").get("data") if plan.is_file() else None
    if not recorded:
        return None
    for path in (Path(recorded), REPORT.parent / recorded):
        if path.is_file():
            return path
    raise QwenliteError(f"the sweep's dataset {recorded} (from {plan}) is not here: "
                        "pass --data PATH")


@main_guard
def main(argv: list[str] | None = None) -> int:
    from qwenlite.data import resolve_data
    from qwenlite.data.tokenizer import Tokenizer

    args = build_parser().parse_args(argv)
    tex = args.tex or (REPORT / "main.tex" if (REPORT / "main.tex").is_file() else None)
    if args.pdf and tex is None:
        raise QwenliteError("--pdf needs the report's source: report/main.tex or --tex FILE")
    data = Path(args.data) if args.data else sweep_data(Path(args.results))
    tokenizer = Tokenizer(args.tokenizer or resolve_weights(args.weights))
    info = generate(Path(args.results), Path(args.out), resolve_data(data), tokenizer, tex)
    print(f"report: {info['numbers']} numbers, {info['tables']} tables, {info['figures']} "
          f"figures from {info['done']} of {info['planned']} experiments -> {args.out}")
    if info["words"] is not None:
        print(f"{tex}: {info['words']} words in the body (at most {MAX_WORDS}); no number "
              "typed by hand")
    if args.pdf:
        print(f"built {build_pdf(tex)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
