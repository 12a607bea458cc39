"""``python -m qwenlite.budget``: the FLOPS ledger as a table or JSON (:mod:`qwenlite.training.ledger`)."""

from __future__ import annotations

import json
from pathlib import Path

from qwenlite.errors import QwenliteError

DEFAULT_BUDGET = 1e17
LEDGER_ENV = "QWENLITE_LEDGER"
DEFAULT_LEDGER = Path("runs") / "flops_ledger.json"
from qwenlite.training.ledger import Ledger


def build_parser():
    """The argument parser of ``python -m qwenlite.budget``."""
    from qwenlite.cli import ArgumentParser, existing_file

    parser = ArgumentParser(prog="python -m qwenlite.budget", description="Print the FLOPS ledger.")
    parser.add_argument("--ledger", type=existing_file, default=None,
                        help=f"ledger file (default ${LEDGER_ENV}, else {DEFAULT_LEDGER})")
    parser.add_argument("--json", action="store_true", help="print the raw ledger")
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    ledger = Ledger(args.ledger)
    if not ledger.path.exists():
        raise QwenliteError(f"no FLOPS ledger at {ledger.path} yet: run an experiment first")
    print(json.dumps(ledger.load(), indent=2) if args.json else ledger.table())
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m qwenlite.budget``: the FLOPS ledger as a table (or JSON)."""
    from qwenlite.cli import main_guard

    return main_guard(_main)(argv)


if __name__ == "__main__":
    raise SystemExit(main())
