"""Conventions shared by every command: weights, data, device, dtype, checked values, errors.

* weights: ``--weights DIR``, else ``$QWENLITE_WEIGHTS``, else ``weights/Qwen2.5-0.5B-Instruct``
  (downloaded from the hub on first use);
* data: ``--data PATH``, else the project's simulated default dataset;
* device: ``--device auto`` picks cuda, then mps, then cpu;
* dtype: ``auto`` (the default: bf16 where the device has bf16 units, see :func:`pick_dtype`),
  ``fp32`` or ``bf16``; a run records the dtype it resolved to;
* values: every option is checked where it is parsed, by one of the argparse types of
  :mod:`qwenlite.argtypes`, re-exported here
  (:func:`number_type` for counts, seeds and rates: finite, in range; :func:`path_type` for
  files to read, directories to use or create, files to write; text, names, devices). Each type
  carries ``kind`` and ``bad_values`` (what it refuses), which ``tests/test_cli_errors.py``
  feeds to every option of every command in :data:`COMMANDS`;
* errors: one line, ``error: ...``, exit status 2, no traceback, for the user's mistakes
  (:class:`~qwenlite.errors.QwenliteError`) and the outside world's failures (``OSError``: an
  unreadable file, a full disk, a denied permission); a command checks all its inputs before it
  writes anything, so a refused command leaves the file system as it found it. Other exceptions
  are bugs and keep their traceback; set ``QWENLITE_DEBUG=1`` to see the traceback of every error.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from qwenlite.argtypes import (  # noqa: F401 - re-exported for the commands
    INT_MAX,
    PATH_PLACEHOLDERS,
    argument_type,
    creatable_dir,
    existing_dir,
    existing_file,
    name_list,
    nonempty_text,
    nonnegative_float,
    nonnegative_int,
    number_type,
    one_line_text,
    path_type,
    positive_float,
    positive_int,
    probability,
    repo_id,
    text_type,
    writable_file,
)
from qwenlite.errors import QwenliteError
from qwenlite.model.config import DTYPES, resolve_dtype  # noqa: F401 - re-exported for commands

#: The ``python -m qwenlite.<name>`` commands and what each does; every one has ``main(argv)``
#: and ``build_parser()``. A new command needs only a line here to be listed and to have all its
#: options tried with bad values by the tests.
COMMANDS = {
    "train": "LoRA fine-tuning with a FLOPS ledger",
    "evaluate": "forecast metrics vs baselines",
    "flops": "FLOPS accounting (--breakdown)",
    "budget": "the FLOPS ledger",
    "preprocessor": "LLMTIME examples",
    "data": "simulate / summarise datasets",
    "generate": "generate text from a prompt",
    "download": "fetch a checkpoint from the hub",
    "diagnose": "why a model forecasts as it does (NLL by digit, greedy vs sampled)",
    "sweep": "the coursework's experiments: plan | run | status",
    "report": "regenerate the report's tables, figures and numbers (--pdf: main.pdf)",
}

DEFAULT_REPO = "Qwen/Qwen2.5-0.5B-Instruct"
DEFAULT_WEIGHTS_DIR = Path("weights") / "Qwen2.5-0.5B-Instruct"
WEIGHTS_ENV = "QWENLITE_WEIGHTS"



class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that names every option's default (unless its help already says it)."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        return (bool(action.option_strings) and "default" not in (action.help or "")
                and action.default not in (None, False, argparse.SUPPRESS)
                and action.nargs != 0)  # flags: present or not

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):  # argparse skips help-less options
            import copy

            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not self._shows_default(action) or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what> (see --help)``, exit status 2, and every
    option's default in its help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_weights_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        metavar="DIR",
        type=existing_dir,
        default=None,
        help=f"checkpoint directory (default: ${WEIGHTS_ENV}, else {DEFAULT_WEIGHTS_DIR}, "
        "downloaded from the hub on first use)",
    )


DATA_HELP = ("HDF5 file with /trajectories (N, T, 2) and /time (T,) "
             "(default: the project's simulated Lotka-Volterra dataset, generated on first use)")


def add_data_arg(parser: argparse.ArgumentParser, help: str = DATA_HELP) -> None:
    parser.add_argument("--data", metavar="PATH", type=existing_file, default=None, help=help)


#: ``--dtype`` choices: ``auto`` and the dtypes of :data:`~qwenlite.model.config.DTYPES`.
DTYPE_CHOICES = ("auto", *sorted(DTYPES))
DTYPE_HELP = ("precision; auto: bf16 on CUDA, MPS and CPUs with AVX512-BF16 or AMX-BF16 "
              "(where zero-shot bf16 forecasts measured as good as fp32's, report/results/halving), "
              "else fp32")


def add_device_args(parser: argparse.ArgumentParser, dtype_default: str | None = "auto",
                    dtype_help: str = DTYPE_HELP) -> None:
    parser.add_argument(
        "--device", default="auto", type=device_name,
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps"
    )
    parser.add_argument("--dtype", default=dtype_default, choices=DTYPE_CHOICES, help=dtype_help)


def pick_dtype(name: str, device: torch.device | str) -> str:
    """``fp32`` or ``bf16`` for ``--dtype name`` on ``device``: ``auto`` is bf16 where bf16
    matmuls run on bf16 hardware (CUDA, MPS, a CPU with AVX512-BF16 or AMX-BF16:
    :func:`qwenlite.accel.emulation.has_bf16_units`), else fp32."""
    from qwenlite.accel.emulation import has_bf16_units

    if name != "auto":
        return name
    return "bf16" if has_bf16_units(torch.device(device).type) else "fp32"


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


def warn_if_slow_bf16(dtype: torch.dtype, device: torch.device | str) -> None:
    """On a CPU without bf16 units, say how bf16 matmuls will run (see ``qwenlite.accel``)."""
    from qwenlite.accel import emulation, settings

    if dtype != torch.bfloat16 or torch.device(device).type != "cpu":
        return
    if emulation.bf16_matmul_mode() == "native" and emulation.cpu_lacks_bf16():
        print(f"note: this CPU has no bf16 instructions and ${settings.BF16_ENV}=native: bf16 matmuls "
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


# ----- one-line errors ----------------------------------------------------------------------------
DEBUG_ENV = "QWENLITE_DEBUG"

# What to do about the failures of the outside world a command may meet, by errno.
_OS_ADVICE = {
    errno.ENOSPC: "free some disk space and rerun",
    errno.EDQUOT: "free some disk space (quota exceeded) and rerun",
    errno.EACCES: "fix its permissions or choose another path",
    errno.EPERM: "fix its permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.EISDIR: "it is a directory: pass a file path",
    errno.ENOTDIR: "a part of the path is not a directory: check the path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "use a shorter path",
}


def describe_os_error(exc: OSError) -> str:
    """One line for a failed file-system (or network) operation: the path(s), why, what to do."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    reason = exc.strerror or str(exc) or type(exc).__name__
    advice = _OS_ADVICE.get(exc.errno, "check the path and rerun")
    return f"{paths or 'a file operation'}: {reason}; {advice}"


def debugging() -> bool:
    """True when ``$QWENLITE_DEBUG`` is set (to anything but ``0``): errors keep their traceback."""
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def main_guard(func: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI ``main`` so that expected failures print one line and exit with status 2.

    Expected failures are the user's (:class:`QwenliteError`) and the outside world's
    (:class:`OSError`: an unreadable file, a full disk, a denied permission...). Any other
    exception is a bug and keeps its traceback; with ``$QWENLITE_DEBUG=1`` every exception does.
    The wrapped ``main`` returns the exit status, also when argparse refuses the command line
    (its ``SystemExit``, after its one line), so in-process callers get a status, not an exit.

    As the process's entry point it also sets glibc's malloc to keep freed memory
    (:func:`qwenlite.accel.memory.keep_freed_memory`; ``QWENLITE_MALLOC=system`` does not).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> int:
        from qwenlite.accel.memory import keep_freed_memory

        if debugging():
            keep_freed_memory()
            return int(func(*args, **kwargs) or 0)
        try:
            keep_freed_memory()
            code = func(*args, **kwargs)
        except QwenliteError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: {describe_os_error(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except SystemExit as exc:  # argparse: the message is printed already
            if exc.code is None or isinstance(exc.code, int):
                return int(exc.code or 0)
            print(exc.code, file=sys.stderr)
            return 1
        return int(code or 0)

    return wrapper


def _device_name(text: str) -> str:
    resolve_device(text)  # raises one line for a malformed or unavailable device
    return text


device_name = argument_type(_device_name, "device", ["", "bogus", "cpu:x"],
                            "argparse type: auto, cpu, cuda, cuda:N or mps (available here).")
