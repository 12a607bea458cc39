"""``python -m qwenlite.data simulate|stats``: simulate a Lotka-Volterra dataset; summarise datasets."""

from __future__ import annotations

import json

from qwenlite.data.lotka_volterra import (
    format_statistics,
    load_dataset,
    resolve_data,
    simulate_to,
    summary_statistics,
)


def build_parser():
    """The argument parser of ``python -m qwenlite.data`` (subcommands ``simulate``, ``stats``)."""
    from qwenlite.cli import (
        ArgumentParser,
        existing_file,
        nonnegative_int,
        positive_float,
        positive_int,
        writable_file,
    )

    parser = ArgumentParser(prog="python -m qwenlite.data",
                            description="Simulate or summarise predator-prey datasets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{simulate,stats}")
    sim = sub.add_parser("simulate", help="write a simulated Lotka-Volterra dataset")
    sim.add_argument("--out", type=writable_file, required=True, metavar="PATH",
                     help="HDF5 file to write")
    sim.add_argument("--systems", type=positive_int, default=1000, help="N (default 1000)")
    sim.add_argument("--points", type=positive_int, default=100, help="T (default 100)")
    sim.add_argument("--t-max", type=positive_float, default=200.0,
                     help="last time point (default 200)")
    sim.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default 0)")
    stats = sub.add_parser("stats", help="print summary statistics of datasets")
    stats.add_argument("--data", type=existing_file, metavar="PATH", action="append",
                       default=None, help="HDF5 file; repeat to compare several (default: the "
                       "simulated default dataset)")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        path = simulate_to(args.out, args.systems, args.points, args.seed, args.t_max,
                           progress=True)
        print(f"wrote {path}: {args.systems} systems x {args.points} points")
        return 0
    paths = [resolve_data(p) for p in args.data] if args.data else [resolve_data(None)]
    results = [summary_statistics(load_dataset(p)) for p in paths]
    print(json.dumps(results, indent=2) if args.json
          else "\n\n".join(format_statistics(s) for s in results))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m qwenlite.data simulate|stats``."""
    from qwenlite.cli import main_guard

    return main_guard(_main)(argv)

