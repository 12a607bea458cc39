"""``python -m qwenlite.flops``."""

from qwenlite.flops.cli import main

raise SystemExit(main())
