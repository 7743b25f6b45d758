"""The exceptions the CLI turns into a clean message and an exit code: 2 for input the user can fix
(config, data, model), 1 for a run that had to stop."""

from __future__ import annotations


class LorasmithError(Exception):
    """A problem the user can fix: bad input, bad config, missing dependency.

    The message says what is wrong, where (file:line or config key) and how to fix it.
    The CLI prints it without a traceback (unless ``--debug``) and exits with ``exit_code``.
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class ConfigError(LorasmithError):
    """An unknown, mistyped or contradictory configuration key."""


class DataError(LorasmithError):
    """Training data that cannot be read or used as given."""


class ModelLoadError(LorasmithError):
    """A model or tokenizer that cannot be found or loaded."""


class TrainingError(LorasmithError):
    """A run that had to stop (non-finite loss, out of memory with no smaller batch left...)."""

    exit_code = 1
