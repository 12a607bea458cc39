"""User-facing errors.

Every mistake a user can make (a bad path, a corrupt checkpoint, a bad flag value) is raised as
:class:`QwenliteError` with a one-line message that says what is wrong and, where possible, what to
do. Command-line entry points catch it and print that one line, with no traceback.
"""

from __future__ import annotations


class QwenliteError(Exception):
    """An error caused by the user's input, reported as one line by the CLIs."""


class CheckpointError(QwenliteError):
    """A checkpoint directory is missing, incomplete, corrupt or of another architecture."""


class DataError(QwenliteError):
    """A dataset file is missing or malformed."""


class BudgetError(QwenliteError):
    """A planned experiment does not fit in what is left of the FLOPS budget."""
