"""Before and after, in one run: a benchmark of this directory run at two commits, alternately.

A speed figure from another day is not a baseline: the same code measured on this shared 2-core
VM has moved by 10-25% between sessions. So a change that must not slow anything down is
checked by running the *same* benchmark script at the commit before it and the commit after it,
in alternating rounds in one session (A B, then B A, ...: neither commit always meets the cold
caches), and comparing each timed quantity's best round. The commits are commits: uncommitted
edits are not measured. Each commit runs from its own detached worktree (``git worktree add``,
kept under ``--worktrees`` for the next call, with the project's ``shared/`` linked beside them
as it lies beside this checkout, so the benchmarks find the same data), with its own ``src``
first on ``PYTHONPATH`` and its own copy of the benchmark script; the script's ``--out`` JSON is
read back and every timing in it (a key ending in ``_s`` but not a rate ``per_s``, or named
``seconds``) is tabled, with the ratio after/before.

    QWENLITE_WEIGHTS=DIR python benchmarks/ab_commits.py 9bcb0c0 HEAD --rounds 2 \\
        -- bench_inference.py --dtypes fp32 --repeats 1
    QWENLITE_WEIGHTS=DIR python benchmarks/ab_commits.py 9bcb0c0 HEAD -- bench_train.py \\
        --dtypes fp32 --baseline-malloc keep

The benchmark's own comparison with transformers is in each JSON too (``--keep DIR`` keeps them),
so the speed-up against transformers of both commits comes out of the same session.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worktree(commit: str, root: Path) -> tuple[str, Path]:
    """(full hash, a detached worktree of it under ``root``), made once and reused."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{commit}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    path = root / sha[:12]
    root.mkdir(parents=True, exist_ok=True)
    shared, link = REPO.parent / "shared", root / "shared"
    if shared.is_dir() and not link.exists():  # the benchmarks' data beside each worktree
        link.symlink_to(shared)
    if not (path / "src" / "qwenlite").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force",
                        str(path), sha], check=True, capture_output=True)
    return sha, path


def timings(tree, prefix: str = "") -> dict[str, float]:
    """Every timing in a benchmark's JSON, by its dotted path."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            is_time = (str(key).endswith("_s") and not str(key).endswith("per_s")) \
                or key == "seconds"
            if isinstance(value, (int, float)) and not isinstance(value, bool) and is_time:
                out[path] = float(value)
            else:
                out.update(timings(value, path))
    return out


def run_round(path: Path, script: str, args: list[str], out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(path / "src"), str(path / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(path / "benchmarks" / script), *args, "--out", str(out)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=path)
    return timings(json.loads(out.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds per commit, the order swapped every round (A B, B A, ...)")
    parser.add_argument("--worktrees", type=Path,
                        default=Path(tempfile.gettempdir()) / "qwenlite-ab")
    parser.add_argument("--keep", type=Path, default=None, help="keep each round's JSON here")
    parser.usage = "%(prog)s BEFORE AFTER [--rounds N] [--keep DIR] -- SCRIPT [ARGS...]"
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    bench = argv[cut + 1:]
    if not bench:
        parser.error("name the benchmark after --, e.g. -- bench_inference.py --dtypes fp32")
    if args.keep:
        args.keep = args.keep.resolve()  # the rounds run in the worktrees
    script, extra = bench[0], bench[1:]
    trees = [worktree(c, args.worktrees) for c in (args.before, args.after)]
    best: list[dict[str, float]] = [{}, {}]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                sha, path = trees[i]
                keep = args.keep or Path(tmp)
                keep.mkdir(parents=True, exist_ok=True)
                got = run_round(path, script, extra, keep / f"{sha[:12]}-round{r + 1}.json")
                for key, value in got.items():
                    best[i][key] = min(value, best[i].get(key, value))
    (a, _), (b, _) = trees
    print(f"\n{script} {' '.join(extra)}: best of {args.rounds} alternating round(s)")
    print(f"{'timing':48s} {a[:9]:>10s} {b[:9]:>10s}  after/before")
    for key in sorted(set(best[0]) | set(best[1])):
        x, y = best[0].get(key), best[1].get(key)
        ratio = f"{y / x:.3f}" if x and y else "-"
        print(f"{key:48s} {x if x is not None else float('nan'):10.3f} "
              f"{y if y is not None else float('nan'):10.3f}  {ratio}")


if __name__ == "__main__":
    main()
