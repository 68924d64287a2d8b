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


class OverQuota(ServiceError):
    """A per-key quota is used up (429).

    Attributes:
        limit: the setting that limits it (``"max_active_jobs_per_key"``, ...), as in
            docs/deploy.md "Limits and quotas".
        detail: which limit, how much is used, and when it frees.
        retry_after: seconds until it frees (the ``Retry-After`` header), or None when only the
            client can free it (deleting a dataset).
    """

    def __init__(self, limit: str, detail: str, *, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.limit = limit
        self.retry_after = retry_after


class InsufficientStorage(ServiceError):
    """The server's disk is too full to store an upload (507)."""
