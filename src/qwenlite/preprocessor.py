"""``python -m qwenlite.preprocessor --examples 2``: the coursework's question 2(a) examples —
series of the training split, their LLMTIME strings (:mod:`qwenlite.data.llmtime`) and their
Qwen2.5 token ids."""

from __future__ import annotations

import json

import numpy as np

from qwenlite.data.llmtime import MAX_DECIMALS, LLMTimeSettings, decode, encode, fit_alpha


def build_parser():
    """The argument parser of ``python -m qwenlite.preprocessor``."""
    from qwenlite.cli import (
        ArgumentParser,
        add_data_arg,
        add_weights_arg,
        existing_file,
        nonnegative_int,
        number_type,
        positive_int,
    )

    parser = ArgumentParser(prog="python -m qwenlite.preprocessor",
                            description="Print example series, their LLMTIME strings and their "
                            "Qwen2.5 token ids (alpha fitted on the training split).")
    parser.add_argument("--examples", type=positive_int, default=2,
                        help="number of systems to show, from the training split (default 2)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="show only the first STEPS timesteps (default: the whole series)")
    parser.add_argument("--decimals", type=number_type(int, f"an integer from 0 to {MAX_DECIMALS}",
                                                       low=0, high=MAX_DECIMALS),
                        default=LLMTimeSettings.decimals,
                        help=f"decimals per value (default {LLMTimeSettings.decimals})")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="split seed (default 0)")
    add_data_arg(parser)
    source = parser.add_mutually_exclusive_group()
    add_weights_arg(source)
    source.add_argument("--tokenizer", type=existing_file, metavar="FILE", default=None,
                        help="a tokenizer.json, instead of the one in the checkpoint directory")
    return parser


def _example_main(argv: list[str] | None = None) -> int:
    from qwenlite.cli import resolve_weights
    from qwenlite.data import load_dataset, resolve_data, split_systems
    from qwenlite.data.tokenizer import Tokenizer

    args = build_parser().parse_args(argv)
    tok = Tokenizer(args.tokenizer or resolve_weights(args.weights))
    dataset = load_dataset(resolve_data(args.data))
    split = split_systems(len(dataset.trajectories), seed=args.seed)
    settings = fit_alpha(dataset.trajectories[split.train], LLMTimeSettings(decimals=args.decimals))
    print(f"data: {dataset.path}  shape {dataset.trajectories.shape}")
    print(f"settings: {json.dumps(settings.to_dict())}")
    for system in split.train[: args.examples]:
        series = dataset.trajectories[system, : args.steps]
        text = encode(series, settings)
        ids = tok.encode(text)
        error = np.abs(decode(text, settings, series.shape[1]).values - series).max()
        print(f"\n=== system {system}: {len(series)} timesteps, {len(text)} characters, "
              f"{len(ids)} tokens, max round-trip error {error:.2g}")
        print("raw (prey, predator):")
        print(np.array2string(series, precision=4, suppress_small=True, threshold=10**6,
                              max_line_width=100))
        print("LLMTIME:")
        print(text)
        print("Qwen2.5 token ids:")
        print(ids)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m qwenlite.preprocessor``: the coursework's question 2(a) examples."""
    from qwenlite.cli import main_guard

    return main_guard(_example_main)(argv)


if __name__ == "__main__":
    raise SystemExit(main())
