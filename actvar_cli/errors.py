"""Typed errors: library code raises these, the CLI prints them as one line and exits with 2."""

from __future__ import annotations


class ActvarError(Exception):
    """A problem the user can fix. ``str(err)`` says what is wrong and what to do."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class CheckpointError(ActvarError):
    """A checkpoint file is missing, unreadable, truncated, or of the wrong kind."""


class ConfigError(ActvarError):
    """An option, recipe key or inferred configuration does not make sense."""


class OutputError(ActvarError):
    """An output location cannot be written."""


class HubError(ActvarError):
    """The Hugging Face Hub (or its offline cache) could not give what was asked."""


class DataError(ActvarError):
    """A dataset folder, token cache or reference batch is missing or malformed."""


class MetricsError(ActvarError):
    """A metric cannot be computed (for example: Inception weights are not available offline)."""
