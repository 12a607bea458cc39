"""LLMTIME encoding of multivariate time series as text, and tolerant decoding back to arrays.

A series ``x`` of shape (T, V) is scaled to ``x / alpha``, each value is written with a fixed
number of decimals, the V values of a timestep are joined by ``,`` and **every** timestep is
followed by ``;``::

    [[1.0, 0.5], [1.25, 0.375]]  --(alpha=0.5, decimals=2)-->  "2.00,1.00;2.50,0.75;"

The trailing ``;`` makes a prompt of k steps end exactly where the model must write the next
number, and makes training windows and prompts use one format. Qwen2.5's tokenizer writes each
digit, ``.``, ``,`` and ``;`` as its own token, so the string is tokenized one token per character.

``alpha`` is fitted on the training split only (:func:`fit_alpha`): ``alpha = P(train) / target``
with ``P`` the ``percentile``-th percentile of all training values (all variables pooled, one
``alpha`` as in the coursework's ``x / alpha``). The defaults (99th percentile mapped to 10) put 99%
of training values in 0-10, one integer digit, while using all of that range for resolution; the
rare larger value only costs one more digit. The fitted settings are saved with every run and
reused, never refitted, for validation and test.

``python -m qwenlite.preprocessor --examples 2`` prints example series, their LLMTIME strings and
their Qwen2.5 token ids.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwenlite.errors import QwenliteError
from qwenlite.io import atomic_write_text, read_json_object

DIGITS = "0123456789"
MAX_DECIMALS = 8  # beyond this, float32 series gain nothing and tokens are wasted


@dataclass(frozen=True)
class LLMTimeSettings:
    """Everything needed to encode and decode a series; saved as JSON with every run.

    Attributes:
        decimals: digits written after the decimal point (0 writes integers, with no ``.``).
        alpha: the scale, ``x' = x / alpha``; ``None`` until :func:`fit_alpha` sets it.
        percentile: percentile of the training values that :func:`fit_alpha` maps to ``target``.
        target: value that percentile is scaled to (10: most scaled values lie in 0-10).
        var_sep: separator between the variables of one timestep.
        time_sep: terminator written after every timestep.
        signed: whether values may be negative (a ``-`` sign is then allowed); set by
            :func:`fit_alpha` from the training data. Populations never are.
    """

    decimals: int = 2
    alpha: float | None = None
    percentile: float = 99.0
    target: float = 10.0
    var_sep: str = ","
    time_sep: str = ";"
    signed: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.decimals, int) or isinstance(self.decimals, bool) \
                or not 0 <= self.decimals <= MAX_DECIMALS:
            raise QwenliteError(f"decimals must be an integer from 0 to {MAX_DECIMALS}, "
                                f"got {self.decimals!r}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise QwenliteError(f"alpha must be a positive finite number, got {self.alpha!r}")
        if not 0 < self.percentile <= 100:
            raise QwenliteError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if not (math.isfinite(self.target) and self.target > 0):
            raise QwenliteError(f"target must be a positive finite number, got {self.target!r}")
        for name in ("var_sep", "time_sep"):
            sep = getattr(self, name)
            if not isinstance(sep, str) or len(sep) != 1 or sep in DIGITS + ".-" or sep.isspace():
                raise QwenliteError(f"{name} must be one character other than a digit, '.', '-' "
                                    f"or a space, got {sep!r}")
        if self.var_sep == self.time_sep:
            raise QwenliteError(f"var_sep and time_sep must differ, both are {self.var_sep!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LLMTimeSettings:
        """Settings from :meth:`to_dict`'s output; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise QwenliteError(f"unknown LLMTIME setting(s) {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LLMTimeSettings:
        return cls.from_dict(read_json_object(path, "LLMTIME settings file"))


@dataclass
class DecodeResult:
    """What :func:`decode` recovered from a text.

    Attributes:
        values: (T', V) float64 in original units: the longest prefix of complete, well-formed
            timesteps.
        n_invalid: timesteps (or trailing fragments) that could not be used: the first malformed
            one and everything after it, since later values would be misaligned in time.
    """

    values: np.ndarray
    n_invalid: int

    @property
    def n_steps(self) -> int:
        """T', the number of timesteps decoded."""
        return len(self.values)


def fit_alpha(train_trajectories: np.ndarray, settings: LLMTimeSettings) -> LLMTimeSettings:
    """Fit the scale on training data: ``alpha = percentile(|train|) / target``.

    Args:
        train_trajectories: (N, T, V) training series only; never validation or test data.
        settings: settings whose ``percentile`` and ``target`` give the rule.

    Returns:
        A copy of ``settings`` with ``alpha`` (and ``signed``) set.

    Raises:
        QwenliteError: the array is empty, not 3-D, non-finite, or all zero.
    """
    x = np.asarray(train_trajectories, dtype=np.float64)
    if x.ndim != 3 or x.size == 0:
        raise QwenliteError(f"training trajectories must be a non-empty (N, T, V) array, "
                            f"got shape {x.shape}")
    if not np.isfinite(x).all():
        raise QwenliteError("training trajectories contain non-finite values")
    scale = float(np.percentile(np.abs(x), settings.percentile))
    if scale <= 0:
        raise QwenliteError(f"the {settings.percentile:g}th percentile of the training values is "
                            "0: cannot fit alpha")
    return dataclasses.replace(settings, alpha=scale / settings.target, signed=bool((x < 0).any()))


def _alpha(settings: LLMTimeSettings) -> float:
    if settings.alpha is None:
        raise QwenliteError("LLMTIME alpha is not set: fit it on the training split with fit_alpha")
    return settings.alpha


def encode(values: np.ndarray, settings: LLMTimeSettings) -> str:
    """Encode one series as LLMTIME text, every timestep followed by ``time_sep``.

    Args:
        values: (T, V) series in original units (a 1-D (T,) array is one variable).
        settings: fitted settings (``alpha`` set).

    Returns:
        ``T`` groups ``"v1,v2,...,vV;"``, each value ``round(x / alpha, decimals)`` with exactly
        ``decimals`` decimals; empty for ``T == 0``.

    Raises:
        QwenliteError: ``alpha`` unset, wrong rank, non-finite values, or negative values with
            unsigned settings.
    """
    alpha = _alpha(settings)
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise QwenliteError(f"encode expects a (T, V) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise QwenliteError("cannot encode non-finite values")
    if not settings.signed and (x < 0).any():
        raise QwenliteError("cannot encode negative values: these settings were fitted on "
                            "non-negative data")
    fmt = f"{{:.{settings.decimals}f}}".format
    scaled = np.round(x / alpha, settings.decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
    rows = [settings.var_sep.join(fmt(v) for v in row) for row in scaled.tolist()]
    return "".join(row + settings.time_sep for row in rows)


def _number_pattern(settings: LLMTimeSettings) -> re.Pattern:
    sign = "-?" if settings.signed else ""
    frac = rf"\.[0-9]{{{settings.decimals}}}" if settings.decimals else ""
    return re.compile(rf"{sign}[0-9]+{frac}")


def decode(text: str, settings: LLMTimeSettings, n_vars: int = 2) -> DecodeResult:
    """Decode LLMTIME text (e.g. a model's output) into values; never raises on any text.

    A timestep is used only if it has exactly ``n_vars`` numbers in the encoder's format (optional
    ``-`` for signed settings, digits, ``.`` and exactly ``decimals`` decimals), so a number cut
    short is recognised as such. Decoding stops at the first malformed timestep: a truncated last
    number, a missing or extra field, stray text, or a non-finite value. The final group needs no
    terminating ``time_sep`` if it is complete. Surrounding whitespace is ignored.

    Args:
        text: the text to decode.
        settings: the settings the text was encoded with (``alpha`` set).
        n_vars: V, the number of values per timestep.

    Returns:
        The longest valid prefix as (T', V) float64 values times ``alpha``, and the number of
        timesteps or fragments after it that were dropped (0 when all of ``text`` was used).

    Raises:
        QwenliteError: ``alpha`` unset or ``n_vars < 1`` (misuse, not a property of the text).
    """
    alpha = _alpha(settings)
    if n_vars < 1:
        raise QwenliteError(f"n_vars must be >= 1, got {n_vars}")
    number = _number_pattern(settings)
    groups = text.strip().split(settings.time_sep)
    if groups[-1].strip() == "":  # text ended with the separator (or was empty)
        groups.pop()
    rows: list[list[float]] = []
    for group in groups:
        fields = [f.strip() for f in group.split(settings.var_sep)]
        if len(fields) != n_vars or not all(number.fullmatch(f) for f in fields):
            break
        row = [float(f) * alpha for f in fields]
        if not all(math.isfinite(v) for v in row):  # hundreds of digits overflow to inf
            break
        rows.append(row)
    n_invalid = len(groups) - len(rows)
    values = np.asarray(rows, dtype=np.float64).reshape(len(rows), n_vars)
    return DecodeResult(values=values, n_invalid=n_invalid)


def allowed_characters(settings: LLMTimeSettings) -> str:
    """The characters an encoded series can contain: digits, ``.`` (if ``decimals > 0``), the
    separators, and ``-`` only for signed settings. Used to restrict a forecast's tokens."""
    return (DIGITS + ("." if settings.decimals else "") + settings.var_sep + settings.time_sep
            + ("-" if settings.signed else ""))


@dataclass(frozen=True)
class Grammar:
    """A finite-state machine that accepts exactly the LLMTIME texts :func:`decode` reads in full.

    Attributes:
        chars: the alphabet, in column order (:func:`allowed_characters`).
        table: (states, len(chars)) int64: the next state, or -1 where the character would leave
            the grammar.
        start: the state at the start of a timestep (where a prompt ends).
    """

    chars: str
    table: np.ndarray
    start: int = 0

    def accepts(self, text: str) -> bool:
        """Whether ``text`` is a sequence of whole timesteps in the grammar."""
        state = self.start
        for ch in text:
            col = self.chars.find(ch)
            state = int(self.table[state, col]) if col >= 0 else -1
            if state < 0:
                return False
        return state == self.start


def grammar(settings: LLMTimeSettings, n_vars: int = 2, int_digits: int = 3) -> Grammar:
    """The LLMTIME grammar of these settings: per value an optional ``-`` (signed settings only),
    1 to ``int_digits`` integer digits, then ``.`` and exactly ``decimals`` digits (no ``.`` for 0
    decimals), then ``var_sep`` after each value but the last and ``time_sep`` after the last.

    Every path through it is a forecast :func:`decode` parses in full, and a timestep is at most
    ``n_vars * (int_digits + decimals + 2)`` characters (plus a sign), so a forecaster's token
    budget (:func:`qwenlite.evaluation.forecasting.max_tokens_for`) always fits its horizon.
    """
    if n_vars < 1 or int_digits < 1:
        raise QwenliteError(f"a grammar needs n_vars >= 1 and int_digits >= 1, got {n_vars}, "
                            f"{int_digits}")
    chars = allowed_characters(settings)
    names: dict[tuple, int] = {}

    def state(*name) -> int:
        return names.setdefault(name, len(names))

    edges: list[tuple[int, str, int]] = []
    for v in range(n_vars):
        start = state("start", v)
        end = settings.var_sep if v < n_vars - 1 else settings.time_sep
        after = state("start", (v + 1) % n_vars)
        if settings.signed:
            edges.append((start, "-", state("sign", v)))
            edges += [(state("sign", v), d, state("int", v, 1)) for d in DIGITS]
        edges += [(start, d, state("int", v, 1)) for d in DIGITS]
        for k in range(1, int_digits + 1):
            here = state("int", v, k)
            if k < int_digits:
                edges += [(here, d, state("int", v, k + 1)) for d in DIGITS]
            if settings.decimals:
                edges.append((here, ".", state("frac", v, 0)))
            else:
                edges.append((here, end, after))
        for j in range(settings.decimals + 1 if settings.decimals else 0):
            here = state("frac", v, j)
            if j < settings.decimals:
                edges += [(here, d, state("frac", v, j + 1)) for d in DIGITS]
            else:
                edges.append((here, end, after))
    table = np.full((len(names), len(chars)), -1, dtype=np.int64)
    for src, ch, dst in edges:
        table[src, chars.index(ch)] = dst
    return Grammar(chars, table, names[("start", 0)])
