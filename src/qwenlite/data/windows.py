"""Splits of a dataset's systems, training windows of their token series, forecast examples.

Splits are drawn once per seed and saved with a run (:meth:`Split.save`), so that a run resumed
or evaluated later uses the same systems. Training windows cut an encoded series
(:mod:`qwenlite.data.llmtime`) into fixed-length token windows; forecast examples pair a
context's LLMTIME prompt with the values that follow it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwenlite.data.llmtime import LLMTimeSettings, encode
from qwenlite.errors import DataError, QwenliteError
from qwenlite.io import atomic_write_text, read_json_object


# ----- splits -------------------------------------------------------------------------------------
@dataclass
class Split:
    """Disjoint system indices for training, validation and test (each sorted).

    Attributes:
        train, val, test: int64 index arrays into the dataset's first axis.
        seed: the seed that drew them, when known.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int | None = None

    def to_dict(self) -> dict:
        return {"seed": self.seed, "train": self.train.tolist(), "val": self.val.tolist(),
                "test": self.test.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> Split:
        try:
            parts = {k: np.asarray(data[k], dtype=np.int64).reshape(-1)
                     for k in ("train", "val", "test")}
            seed = data.get("seed")
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"malformed split: {exc}") from None
        joined = np.concatenate(list(parts.values()))
        if (joined < 0).any() or len(np.unique(joined)) != len(joined):
            raise DataError("malformed split: indices must be non-negative and disjoint")
        return cls(**parts, seed=seed)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Split:
        return cls.from_dict(read_json_object(path, "split file", DataError))


def split_systems(n_systems: int, seed: int = 0,
                  fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> Split:
    """Split systems (never timesteps) into train/val/test, deterministically given the seed.

    Args:
        n_systems: N.
        seed: seed of the permutation.
        fractions: train, val, test fractions (summing to 1); val and test get ``round(f * N)``
            systems, train the rest.

    Raises:
        QwenliteError: a negative seed, bad fractions, or too few systems to give every part
            with a positive fraction at least one system.
    """
    if isinstance(seed, int) and seed < 0:
        raise QwenliteError(f"the split seed must be a non-negative integer, got {seed}")
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or (f < 0).any() or not np.isclose(f.sum(), 1.0):
        raise QwenliteError(f"split fractions must be 3 non-negative numbers summing to 1, "
                            f"got {tuple(fractions)}")
    n_val, n_test = (int(round(x * n_systems)) for x in f[1:])
    n_train = n_systems - n_val - n_test
    sizes = (n_train, n_val, n_test)
    if any(size < 1 for size, frac in zip(sizes, f) if frac > 0) or n_train < 0:
        raise QwenliteError(f"cannot split {n_systems} systems by {tuple(fractions)}: a part "
                            "would be empty")
    order = np.random.default_rng(seed).permutation(n_systems)
    train, val, test = np.split(order, [n_train, n_train + n_val])
    return Split(np.sort(train), np.sort(val), np.sort(test), seed=seed)


# ----- examples -----------------------------------------------------------------------------------
@dataclass
class Windows:
    """Fixed-length training windows.

    Attributes:
        input_ids: (n_windows, context_len) int64 token ids.
        loss_mask: (n_windows, context_len) bool, True where a token is real and may be a loss
            target; ``None`` when no window is padded (every token counts).
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor | None = None


def make_training_windows(token_seqs: list[list[int]], context_len: int, stride: int | None = None,
                          pad_id: int | None = None) -> Windows:
    """Cut each system's tokenized series into windows of ``context_len`` tokens.

    Windows start at ``0, stride, 2 * stride, ...``; if the last one stops short of the end of the
    series, one more window ends exactly at its end, so every token is covered. Windows never
    span two systems.

    A series shorter than ``context_len`` is dropped, unless ``pad_id`` is given: it then becomes
    one window, right-padded with ``pad_id`` and masked out in ``loss_mask``.

    Args:
        token_seqs: one token-id list per system (e.g. an encoded full series).
        context_len: tokens per window.
        stride: tokens between window starts; ``None`` means ``context_len`` (no overlap).
        pad_id: pad short series with this id instead of dropping them.

    Returns:
        :class:`Windows`; ``loss_mask`` is ``None`` unless a series was padded.

    Raises:
        QwenliteError: ``context_len`` or ``stride`` < 1, or ``context_len`` larger than every
            series.
    """
    stride = context_len if stride is None else stride
    if context_len < 1 or stride < 1:
        raise QwenliteError(f"context length and stride must be >= 1, got {context_len}, {stride}")
    longest = max((len(s) for s in token_seqs), default=0)
    if longest < context_len:
        raise QwenliteError(f"context length {context_len} is larger than every series (the "
                            f"longest has {longest} tokens)")
    windows, masks = [], []
    for seq in token_seqs:
        seq = torch.as_tensor(seq, dtype=torch.long)
        if len(seq) < context_len:
            if pad_id is not None and len(seq):
                pad = seq.new_full((context_len - len(seq),), pad_id)
                windows.append(torch.cat([seq, pad])[None])
                masks.append((torch.arange(context_len) < len(seq))[None])
            continue
        starts = list(range(0, len(seq) - context_len + 1, stride))
        if starts[-1] + context_len < len(seq):
            starts.append(len(seq) - context_len)
        windows.append(torch.stack([seq[s:s + context_len] for s in starts]))
        masks.append(torch.ones(len(starts), context_len, dtype=torch.bool))
    input_ids = torch.cat(windows)
    loss_mask = torch.cat(masks)
    return Windows(input_ids, None if bool(loss_mask.all()) else loss_mask)


@dataclass
class ForecastExample:
    """One forecasting task.

    Attributes:
        prompt: LLMTIME text of the context, ending with the time separator.
        context: (k, V) the first k timesteps, original units.
        target: (h, V) the next h timesteps, original units.
        system: index of the system in the trajectories given.
    """

    prompt: str
    context: np.ndarray
    target: np.ndarray
    system: int


def forecast_examples(trajectories: np.ndarray, settings: LLMTimeSettings, context_steps: int,
                      horizon: int, systems: Sequence[int] | None = None) -> list[ForecastExample]:
    """Forecasting tasks: the first ``context_steps`` timesteps as prompt, the next ``horizon``
    as target.

    Args:
        trajectories: (N, T, V) series, original units.
        settings: fitted LLMTIME settings.
        context_steps: k >= 1.
        horizon: h >= 1, with k + h <= T.
        systems: which systems (indices into ``trajectories``); default all.

    Raises:
        QwenliteError: k or h < 1, or k + h > T.
    """
    traj = np.asarray(trajectories)
    n_steps = traj.shape[1]
    if context_steps < 1 or horizon < 1 or context_steps + horizon > n_steps:
        raise QwenliteError(f"context {context_steps} + horizon {horizon} steps must be >= 1 each "
                            f"and fit in the {n_steps} timesteps of a series")
    indices = range(len(traj)) if systems is None else systems
    return [ForecastExample(prompt=encode(traj[i, :context_steps], settings),
                            context=traj[i, :context_steps],
                            target=traj[i, context_steps:context_steps + horizon], system=int(i))
            for i in indices]
