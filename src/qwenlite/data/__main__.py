"""``python -m qwenlite.data``."""

from qwenlite.data.cli import main

raise SystemExit(main())
