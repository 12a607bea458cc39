"""``python -m qwenlite.download``: fetch a Qwen2.5 checkpoint from the Hugging Face hub."""

from __future__ import annotations


from qwenlite.cli import DEFAULT_REPO, DEFAULT_WEIGHTS_DIR, ArgumentParser, main_guard
from qwenlite.hub import download


@main_guard
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m qwenlite.download", description=__doc__)
    parser.add_argument("--repo", default=DEFAULT_REPO, help=f"hub repository (default {DEFAULT_REPO})")
    parser.add_argument("--dir", default=None, help=f"destination (default {DEFAULT_WEIGHTS_DIR} "
                        "for the default repo, else weights/<name>)")
    args = parser.parse_args(argv)
    dest = args.dir or ("weights/" + args.repo.split("/")[-1])
    path = download(args.repo, dest)
    print(f"downloaded {args.repo} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
