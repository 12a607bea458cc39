"""``python -m qwenlite.download``: fetch a Qwen2.5 checkpoint from the Hugging Face hub."""

from __future__ import annotations

from qwenlite.cli import (
    DEFAULT_REPO,
    DEFAULT_WEIGHTS_DIR,
    ArgumentParser,
    creatable_dir,
    main_guard,
    repo_id,
)
from qwenlite.hub import download
from qwenlite.io import check_dir_creatable


def build_parser() -> ArgumentParser:
    """The argument parser of ``python -m qwenlite.download``."""
    parser = ArgumentParser(prog="python -m qwenlite.download", description=__doc__)
    parser.add_argument("--repo", type=repo_id, default=DEFAULT_REPO,
                        help=f"hub repository (default {DEFAULT_REPO})")
    parser.add_argument("--dir", type=creatable_dir, default=None,
                        help=f"destination (default {DEFAULT_WEIGHTS_DIR} for the default repo, "
                        "else weights/<name>)")
    return parser


@main_guard
def main(argv: list[str] | None = None) -> int:
    """Download the checkpoint; the destination is checked before anything is fetched."""
    args = build_parser().parse_args(argv)
    dest = check_dir_creatable(args.dir or ("weights/" + args.repo.split("/")[-1]),
                               "destination")
    path = download(args.repo, dest)
    print(f"downloaded {args.repo} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
