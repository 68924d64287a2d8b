"""Domain errors of the job system; the API maps them to HTTP statuses in one place.

``NotFound`` -> 404, ``Conflict`` -> 409, ``Invalid`` -> 422, ``Unavailable`` -> 503.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors :mod:`worker.service` raises on purpose.

    Attributes:
        detail: a stable, human-readable message (the API's ``detail``).
    """

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    """An unknown id: ``NotFound("job 'abc' not found")``."""


class Conflict(ServiceError):
    """The request contradicts the resource's state (e.g. cancelling a finished job)."""


class Invalid(ServiceError):
    """Invalid input.

    Attributes:
        field: dotted path of the offending field (``"train.steps"``, ``"file"``, ``"status"``).
        detail: what was expected and what was given.
        errors: for dataset uploads, every bad line as ``(line_number, message)``; else empty.
    """

    def __init__(
        self, field: str, detail: str, *, errors: list[tuple[int, str]] | None = None
    ) -> None:
        super().__init__(detail)
        self.field = field
        self.errors = list(errors or [])

    def __str__(self) -> str:
        return f"{self.field}: {self.detail}"


class Unavailable(ServiceError):
    """A dependency (database, broker) cannot be reached."""
