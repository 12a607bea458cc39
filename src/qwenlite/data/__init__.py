"""The data stage: Lotka-Volterra datasets, the LLMTIME encoding, splits and training windows.

* :mod:`~qwenlite.data.lotka_volterra` — loading with validation, the simulated default,
  summary statistics;
* :mod:`~qwenlite.data.llmtime` — the LLMTIME text encoding (scale, fixed decimals, separators)
  and its decoding;
* :mod:`~qwenlite.data.tokenizer` — Qwen2.5's tokenizer (digits split one by one);
* :mod:`~qwenlite.data.windows` — train/validation/test splits of the systems, training windows
  of encoded series, forecast examples;
* :mod:`~qwenlite.data.cli` — ``python -m qwenlite.data simulate|stats``.

The dataset API is re-exported here (``from qwenlite.data import load_dataset``).
"""

from qwenlite.data.cli import build_parser, main
from qwenlite.data.lotka_volterra import (
                                          LVDataset,
                                          default_data_path,
                                          format_statistics,
                                          load_dataset,
                                          resolve_data,
                                          save_dataset,
                                          simulate,
                                          simulate_to,
                                          summary_statistics,
)
from qwenlite.data.windows import (
                                          ForecastExample,
                                          Split,
                                          Windows,
                                          forecast_examples,
                                          make_training_windows,
                                          split_systems,
)

__all__ = [
    "ForecastExample", "LVDataset", "Split", "Windows", "build_parser", "default_data_path",
    "forecast_examples", "format_statistics", "load_dataset", "main", "make_training_windows",
    "resolve_data", "save_dataset", "simulate", "simulate_to", "split_systems",
    "summary_statistics",
]
