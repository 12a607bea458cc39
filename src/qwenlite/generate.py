"""``python -m qwenlite.generate``: continue a prompt (:mod:`qwenlite.evaluation.generation`)."""

from __future__ import annotations

from qwenlite.evaluation.generation import generate


def build_parser():
    """The argument parser of ``python -m qwenlite.generate``."""
    from qwenlite.cli import (
        ArgumentParser,
        add_device_args,
        add_weights_arg,
        nonempty_text,
        nonnegative_float,
        nonnegative_int,
        positive_int,
        probability,
    )

    parser = ArgumentParser(prog="python -m qwenlite.generate",
                            description="Continue a text prompt.")
    add_weights_arg(parser)
    add_device_args(parser)
    parser.add_argument("--prompt", type=nonempty_text, required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32)
    parser.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=probability, default=1.0)
    parser.add_argument("--seed", type=nonnegative_int, default=None)
    return parser


def _main(argv: list[str] | None) -> int:
    from qwenlite.accel import for_device
    from qwenlite.cli import (
        pick_dtype,
        resolve_device,
        resolve_dtype,
        resolve_weights,
        warn_if_slow_bf16,
    )
    from qwenlite.data.tokenizer import Tokenizer
    from qwenlite.model.loading import load_model

    parser = build_parser()
    args = parser.parse_args(argv)
    weights = resolve_weights(args.weights)
    device = resolve_device(args.device)
    args.dtype = pick_dtype(args.dtype, device)
    warn_if_slow_bf16(resolve_dtype(args.dtype), device)
    model = for_device(load_model(weights, dtype=args.dtype, device=device))
    tok = Tokenizer(weights)
    ids = tok.encode(args.prompt)
    if not ids:
        parser.error("--prompt is empty")
    out = generate(model, [ids], args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id or 0)
    print(tok.decode(out.tokens[0]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m qwenlite.generate --prompt TEXT``: continue a prompt with a checkpoint."""
    from qwenlite.cli import main_guard

    return main_guard(_main)(argv)


if __name__ == "__main__":
    raise SystemExit(main())
