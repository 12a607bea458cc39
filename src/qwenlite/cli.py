"""Conventions shared by every command: weights, data, device, dtype, and one-line errors.

* weights: ``--weights DIR``, else ``$QWENLITE_WEIGHTS``, else ``weights/Qwen2.5-0.5B-Instruct``
  (downloaded from the hub on first use);
* data: ``--data PATH``, else the project's simulated default dataset;
* device: ``--device auto`` picks cuda, then mps, then cpu;
* dtype: ``fp32`` or ``bf16``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from qwenlite.errors import QwenliteError

DEFAULT_REPO = "Qwen/Qwen2.5-0.5B-Instruct"
DEFAULT_WEIGHTS_DIR = Path("weights") / "Qwen2.5-0.5B-Instruct"
WEIGHTS_ENV = "QWENLITE_WEIGHTS"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what> (see --help)``, exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_weights_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        metavar="DIR",
        default=None,
        help=f"checkpoint directory (default: ${WEIGHTS_ENV}, else {DEFAULT_WEIGHTS_DIR}, "
        "downloaded from the hub on first use)",
    )


def add_data_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        metavar="PATH",
        default=None,
        help="HDF5 file with /trajectories (N, T, 2) and /time (T,) "
        "(default: the project's simulated Lotka-Volterra dataset, generated on first use)",
    )


def add_device_args(parser: argparse.ArgumentParser, dtype_default: str = "fp32") -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps"
    )
    parser.add_argument("--dtype", default=dtype_default, choices=sorted(DTYPES), help="precision")


def resolve_device(name: str = "auto") -> torch.device:
    """Return the torch device for ``name``; ``auto`` prefers cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise QwenliteError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QwenliteError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise QwenliteError(f"device {name!r} requested but MPS is not available; use --device cpu")
    return device


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map ``fp32``/``bf16`` (or a torch dtype) to a torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise QwenliteError(f"unsupported dtype {name}; use fp32 or bf16")
        return name
    aliases = {"float32": "fp32", "bfloat16": "bf16"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise QwenliteError(f"unknown dtype {name!r}; use fp32 or bf16")
    return DTYPES[key]


def warn_if_slow_bf16(dtype: torch.dtype, device: torch.device | str) -> None:
    """On a CPU without bf16 units, say how bf16 matmuls will run (see ``qwenlite.model.kernels``)."""
    from qwenlite.model import kernels

    if dtype != torch.bfloat16 or torch.device(device).type != "cpu":
        return
    try:
        mode = kernels.bf16_matmul_mode()
    except ValueError as exc:
        raise QwenliteError(str(exc)) from None
    if mode == "native" and kernels.cpu_lacks_bf16():
        print(f"note: this CPU has no bf16 instructions and ${kernels.ENV}=native: bf16 matmuls "
              "run several times slower than fp32 here", file=sys.stderr)


def weights_dir_from(arg: str | os.PathLike | None) -> Path:
    """Resolve the checkpoint directory without downloading: flag, env, then the default."""
    if arg:
        return Path(arg).expanduser()
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    return DEFAULT_WEIGHTS_DIR


def resolve_weights(arg: str | os.PathLike | None) -> Path:
    """Resolve the checkpoint directory; fetch the default from the hub if it is not there yet.

    An explicit ``--weights`` or ``$QWENLITE_WEIGHTS`` must exist (it is never downloaded to).
    """
    path = weights_dir_from(arg)
    explicit = bool(arg) or bool(os.environ.get(WEIGHTS_ENV))
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if explicit:
        source = "--weights" if arg else f"${WEIGHTS_ENV}"
        if not path.exists():
            raise QwenliteError(f"checkpoint directory {path} (from {source}) does not exist")
        raise QwenliteError(f"{path} (from {source}) is not a checkpoint directory: no config.json")
    from qwenlite.hub import download

    return download(DEFAULT_REPO, path)


def main_guard(func: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI ``main`` so that user errors print one line and exit with status 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> int:
        try:
            code = func(*args, **kwargs)
        except QwenliteError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return int(code or 0)

    return wrapper


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value
