"""Typed errors of the kru HTTP API: each carries the API's ``detail`` and ``field``."""

from __future__ import annotations

from typing import Any


class KruApiError(Exception):
    """An error answer of the API (or no answer at all: ``status`` is then ``None``).

    Attributes:
        status: the HTTP status code.
        detail: the API's stable ``detail`` string.
        field: the offending field (dotted path) for invalid input, else ``None``.
        errors: every problem the API listed (``[{"field", "message", "line"}]``) or ``None``.
    """

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        field: str | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(f"{status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.errors = errors


class Unauthorized(KruApiError):
    """401: no API key was sent."""


class Forbidden(KruApiError):
    """403: the API key is not valid."""


class NotFound(KruApiError):
    """404: unknown id."""


class Conflict(KruApiError):
    """409: the resource's state forbids it (e.g. cancelling a finished job)."""


class PayloadTooLarge(KruApiError):
    """413: the request body is over the server's limit."""


class InvalidInput(KruApiError):
    """422: invalid input; ``field`` names the offending value."""


class TooManyRequests(KruApiError):
    """429: a quota or rate limit was hit."""


class ServiceUnavailable(KruApiError):
    """503 (or the server could not be reached): the database or broker is down."""


BY_STATUS: dict[int, type[KruApiError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidInput,
    429: TooManyRequests,
    503: ServiceUnavailable,
}


def error_from(status: int, body: Any, text: str = "") -> KruApiError:
    """The typed error of an answer with ``status`` and JSON ``body``."""
    if not isinstance(body, dict):
        body = {}
    detail = str(body.get("detail") or text or f"HTTP {status}")
    cls = BY_STATUS.get(status, KruApiError)
    return cls(detail, status=status, field=body.get("field"), errors=body.get("errors"))
