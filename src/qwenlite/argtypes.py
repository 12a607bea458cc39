"""The argparse types of every command: each value is checked where it is parsed.

:func:`number_type` makes counts, seeds and rates (finite, in range), :func:`path_type` files to
read, directories to use or create and files to write, :func:`text_type` texts, :func:`name_list`
lists of names. Each type refuses a bad value with one line and carries ``kind`` and
``bad_values`` (what it refuses), which ``tests/test_cli_errors.py`` feeds to every option of
every command. :mod:`qwenlite.cli` re-exports them with the other conventions.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from qwenlite.errors import QwenliteError
from qwenlite.io import check_dir, check_dir_creatable, check_file, check_file_writable

#: Placeholders in the ``bad_values`` of path types, filled in by whoever tries them (the tests):
#: ``{missing}`` a path that does not exist, ``{file}`` an existing regular file, ``{dir}`` an
#: existing directory, ``{unwritable}`` an existing directory the user may not write to.
PATH_PLACEHOLDERS = ("missing", "file", "dir", "unwritable")

INT_MAX = 2**63 - 1  # every count and seed must fit in torch's and numpy's int64


def argument_type(convert: Callable[[str], Any], kind: str, bad_values: Iterable[str],
                  doc: str) -> Callable[[str], Any]:
    """Make ``convert`` an argparse type whose refusal is one line.

    Args:
        convert: text -> value; raises :class:`QwenliteError` or ``ValueError`` with the message.
        kind: what sort of value it is (``number``, ``path``, ``text``, ``names``, ``device``).
        bad_values: texts it refuses, for tests to try (paths may hold :data:`PATH_PLACEHOLDERS`).
        doc: its docstring.

    Returns:
        The type, carrying ``kind`` and ``bad_values`` as attributes.
    """

    def parse(text: str):
        try:
            return convert(text)
        except (QwenliteError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.kind = kind
    parse.bad_values = tuple(dict.fromkeys(bad_values))
    parse.__doc__ = doc
    return parse


def number_type(convert: type, what: str, *, low: float, low_open: bool = False,
                high: float | None = None) -> Callable[[str], int | float]:
    """An argparse type for finite ``int`` or ``float`` values in ``[low, high]`` (``(low, high]``
    with ``low_open``); ints are at most :data:`INT_MAX` unless ``high`` says less."""
    implicit_high = convert is int and high is None
    if implicit_high:
        high = INT_MAX

    def convert_checked(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise ValueError(f"expected {what}, got {text!r}") from None
        if implicit_high and value > high:
            raise ValueError(f"expected {what} of at most {high}, got {text}")
        finite = convert is int or math.isfinite(value)
        above = high is not None and value > high
        if not finite or above or value < low or (low_open and value == low):
            raise ValueError(f"expected {what}, got {text}")
        return value

    below = [low - 1, *([low] if low_open else []), *([-1] if -1 < low else [])]
    bad = ["", "abc", "nan", "inf", "-inf", *(convert(x) for x in below),
           *(["1.5", "9" * 40] if convert is int else ["1e400"])]
    if high is not None:
        bad.append(convert(high + 1))
    return argument_type(convert_checked, "number", map(str, bad), f"argparse type: {what}.")


positive_int = number_type(int, "a positive integer", low=1)
nonnegative_int = number_type(int, "a non-negative integer", low=0)
positive_float = number_type(float, "a positive number", low=0, low_open=True)
nonnegative_float = number_type(float, "a non-negative number", low=0)
probability = number_type(float, "a number in (0, 1]", low=0, low_open=True, high=1)


def path_type(check: Callable[[str], Path], what: str, bad_values: Iterable[str]):
    """An argparse type for a path that ``check`` accepts (returns it expanded, as a str)."""

    def convert(text: str) -> str:
        if not text.strip():
            raise ValueError(f"expected {what}, got an empty string")
        return str(check(text))

    return argument_type(convert, "path", ["", *bad_values], f"argparse type: {what}.")


existing_file = path_type(check_file, "an existing file", ["{missing}", "{dir}", "{file}/x"])
existing_dir = path_type(check_dir, "an existing directory", ["{missing}", "{file}"])
creatable_dir = path_type(check_dir_creatable, "a directory that exists or can be created",
                          ["{file}", "{file}/sub", "{unwritable}", "{unwritable}/sub"])
writable_file = path_type(check_file_writable, "a file path that can be written",
                          ["{dir}", "{file}/x", "{unwritable}/x"])


def text_type(what: str, valid: Callable[[str], bool], bad_values: Iterable[str]):
    """An argparse type for text that ``valid`` accepts (returned as it is)."""

    def convert(text: str) -> str:
        if not valid(text):
            raise ValueError(f"expected {what}, got {text!r}")
        return text

    return argument_type(convert, "text", bad_values, f"argparse type: {what}.")


nonempty_text = text_type("a non-empty text", lambda t: bool(t.strip()), ["", "  "])
one_line_text = text_type("one line of printable text", str.isprintable, ["two\nlines", "tab\t"])
repo_id = text_type("a hub repository owner/name",
                    lambda t: re.fullmatch(r"[\w.-]+/[\w.-]+", t) is not None,
                    ["", "no-slash", "a/b/c", "own er/name"])


def name_list(allowed: Iterable[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type for a comma-separated, non-empty list of names from ``allowed``."""
    allowed = tuple(allowed)

    def convert(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
        unknown = [n for n in names if n not in allowed]
        if not names or unknown:
            raise ValueError(f"expected comma-separated names from {','.join(allowed)}, "
                             f"got {text!r}")
        return names

    return argument_type(convert, "names", ["", ",", "not_a_name", f"{allowed[0]},not_a_name"],
                         f"argparse type: comma-separated names from {', '.join(allowed)}.")
