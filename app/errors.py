"""Domain errors to HTTP errors, in one place.

Every error body is an :class:`app.schemas.ErrorResponse`: a stable ``detail`` string, and for
invalid input the offending ``field`` (dotted path, e.g. ``train.lr`` or ``inputs.0.17``) and the
list of ``errors`` (with line numbers for dataset uploads). ``404`` unknown ids, ``409`` state
conflicts, ``413`` oversized bodies, ``422`` invalid input (malformed JSON or multipart bodies
too), ``429`` a per-key quota (with ``Retry-After`` when it frees by itself), ``507`` a server
disk too full for an upload, ``400`` a repeated ``Authorization`` header, ``401``/``403`` auth.
Anything else is a bug: it is logged with its traceback and answered with a JSON ``500``. ``503``
when the database or broker cannot be reached.

Echoed values are bounded: ``detail`` and each message are cut at :data:`MAX_DETAIL_CHARS`, and
ids are echoed through :func:`echo` (a 5,000-character id comes back as its first 64 characters).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from kru_core.errors import DatasetError, FieldError, KruError
from worker.errors import Conflict, InsufficientStorage, Invalid, NotFound, OverQuota, Unavailable

logger = logging.getLogger(__name__)

INTERNAL_ERROR_DETAIL = "internal server error"
#: Longest ``detail`` or error message sent back; longer ones (an echoed value) are cut.
MAX_DETAIL_CHARS = 500
#: How much of a client's value :func:`echo` repeats.
MAX_ECHO_CHARS = 64


def echo(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters of it (then ``…`` and
    the full length): ``echo("a" * 5000)`` is ``'aaaa…' (5000 characters)``."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(text) if isinstance(value, str) else text
    return f"{text[:limit]!r}… ({len(text)} characters)"


def _cut(text: str) -> str:
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…"


# Pydantic names the member of a union it tried (``list[int]``, ``constrained-int``) in the error
# location; the client sent no such key, so these are left out of the field path.
_UNION_TAGS = frozenset({"int", "float", "str", "bool", "list", "dict", "none", "tuple"})
_LOCATION_SOURCES = frozenset({"body", "query", "path", "header", "cookie"})


#: Problems an error body lists at most (a binary upload can have thousands of bad lines);
#: ``errors_total`` then says how many there were.
MAX_ERROR_ITEMS = 100


def error_body(
    detail: str, *, field: str | None = None, errors: Sequence[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """An :class:`app.schemas.ErrorResponse` as plain JSON data (``None`` parts left out).

    ``errors`` beyond the first :data:`MAX_ERROR_ITEMS` are left out, counted in
    ``errors_total``.
    """
    body: dict[str, Any] = {"detail": detail}
    if field is not None:
        body["field"] = field
    if errors is not None:
        body["errors"] = list(errors[:MAX_ERROR_ITEMS])
        if len(errors) > MAX_ERROR_ITEMS:
            body["errors_total"] = len(errors)
    return body


def field_path(loc: Iterable[str | int], *, keep_last: bool = False) -> str:
    """A dotted field path from a pydantic/FastAPI error location.

    ``("body", "model", "factors", 0, "list[constrained-int]")`` -> ``"model.factors.0"``.
    With ``keep_last`` the last part is kept verbatim (an unknown key the client sent).
    """
    parts = list(loc)
    if parts and parts[0] in _LOCATION_SOURCES:
        parts = parts[1:]
    kept = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(part, str) and not (keep_last and last) and _is_union_tag(part):
            continue
        kept.append(str(part))
    return ".".join(kept) or "body"


def _is_union_tag(part: str) -> bool:
    return part in _UNION_TAGS or "[" in part or part.startswith(("constrained-", "function-"))


def _validation_items(errors: Sequence[Any]) -> list[dict[str, Any]]:
    by_field: dict[str, dict[str, Any]] = {}
    for error in errors:
        if error.get("type") == "json_invalid":
            position = error["loc"][-1] if len(error["loc"]) > 1 else 0
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            return [
                {"field": "body", "message": f"malformed JSON: {reason} at position {position}"}
            ]
        extra = error.get("type") == "extra_forbidden"
        path = field_path(error["loc"], keep_last=extra)
        # A union reports each member's failure for the same value; keep one message per field,
        # preferring one from a member whose type matched ("at most 2 items" over "not an int").
        kept = by_field.get(path)
        if kept is None or (kept["type_error"] and not _is_type_error(error)):
            by_field[path] = {
                "field": path,
                "message": "unknown field" if extra else error["msg"],
                "type_error": _is_type_error(error),
            }
    return [{"field": v["field"], "message": v["message"]} for v in by_field.values()]


def _is_type_error(error: Any) -> bool:
    return str(error.get("type", "")).endswith("_type")


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    items = _validation_items(exc.errors())
    first = items[0] if items else {"field": "body", "message": "invalid request"}
    detail = (
        first["message"]
        if first["message"].startswith("malformed JSON")
        else (f"{first['field']}: {first['message']}")
    )
    return JSONResponse(error_body(detail, field=first["field"], errors=items), status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400:
        # Only body parsing raises a 400 here: FastAPI's "There was an error parsing the body"
        # (bytes that are not UTF-8, an integer of thousands of digits) and Starlette's
        # multipart errors ("Invalid multipart data.": a part header over python-multipart's
        # limit, a broken stream). Invalid input like malformed JSON: the same 422 and shape.
        cause = exc.__cause__ or exc.__context__
        if cause is not None and exc.__cause__ is not None:
            detail = f"malformed request body: {_reason(cause)}"
        else:
            detail = f"malformed multipart body: {exc.detail}"
            inner = cause.__cause__ if cause is not None else None
            if inner is not None:
                detail += f" ({_reason(inner)})"
        return _invalid_field(request, "body", detail, prefixed=False)
    headers = exc.headers
    if exc.status_code == 405:
        # Starlette names only the methods of the first route matching the path; list them all.
        headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
    return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    state = request.app.state
    if getattr(state, "method_table", None) is None:
        table = []
        for template, operations in request.app.openapi()["paths"].items():
            pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
            table.append((re.compile(pattern), sorted(m.upper() for m in operations)))
        state.method_table = table
    path = request.url.path
    return sorted({m for rx, methods in state.method_table if rx.fullmatch(path) for m in methods})


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid {exc.encoding} (byte {exc.start})"
    return str(exc)[:200] or type(exc).__name__


def _invalid_field(
    request: Request, field: str, message: str, *, prefixed: bool = True
) -> JSONResponse:
    return JSONResponse(
        error_body(
            f"{field}: {message}" if prefixed else message,
            field=field,
            errors=[{"field": field, "message": message}],
        ),
        status_code=422,
    )


async def _field_error(request: Request, exc: FieldError) -> JSONResponse:
    return _invalid_field(request, exc.field, exc.message)


async def _dataset_error(request: Request, exc: DatasetError) -> JSONResponse:
    items = [
        {"field": "file", "line": line or None, "message": message} for line, message in exc.errors
    ]
    return JSONResponse(error_body(str(exc), field="file", errors=items), status_code=422)


async def _kru_error(request: Request, exc: KruError) -> JSONResponse:
    return JSONResponse(error_body(str(exc)), status_code=422)


async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
    return JSONResponse(error_body(exc.detail), status_code=404)


async def _conflict(request: Request, exc: Conflict) -> JSONResponse:
    return JSONResponse(error_body(exc.detail), status_code=409)


async def _invalid(request: Request, exc: Invalid) -> JSONResponse:
    if exc.errors:
        items = [
            {"field": exc.field, "line": line or None, "message": message}
            for line, message in exc.errors
        ]
    else:
        items = [{"field": exc.field, "message": exc.detail}]
    return JSONResponse(
        error_body(f"{exc.field}: {exc.detail}", field=exc.field, errors=items), status_code=422
    )


async def _unavailable(request: Request, exc: Unavailable) -> JSONResponse:
    return JSONResponse(error_body(exc.detail), status_code=503)


async def _over_quota(request: Request, exc: OverQuota) -> JSONResponse:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return JSONResponse(
        error_body(exc.detail, field=exc.limit), status_code=429, headers=headers or None
    )


async def _insufficient_storage(request: Request, exc: InsufficientStorage) -> JSONResponse:
    return JSONResponse(error_body(exc.detail, field="file"), status_code=507)


# --- integers too long to parse ---------------------------------------------------------------


class _LongInt:
    """An integer literal of more digits than Python converts (``sys.get_int_max_str_digits``)."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _parse_int(text: str) -> int | _LongInt:
    limit = sys.get_int_max_str_digits()
    digits = len(text.lstrip("-"))
    return _LongInt(digits) if limit and digits > limit else int(text)


def _long_int_path(value: Any, path: tuple[str, ...] = ()) -> tuple[tuple[str, ...], int] | None:
    if isinstance(value, _LongInt):
        return path, value.digits
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, item in items:
        found = _long_int_path(item, (*path, str(key)))
        if found is not None:
            return found
    return None


def long_integer_field(body: bytes) -> tuple[str, int] | None:
    """``(field, digits)`` of the first integer in the JSON ``body`` too long for Python to
    convert (FastAPI's parser fails on it as a whole); None if there is none."""
    try:
        data = json.loads(body, parse_int=_parse_int)
    except (ValueError, RecursionError):
        return None
    found = _long_int_path(data)
    if found is None:
        return None
    path, digits = found
    return ".".join(path) or "body", digits


class ErrorRoute(APIRoute):
    """The routes of the API: a JSON body with an integer of thousands of digits (valid JSON
    that Python refuses to convert) is a ``422`` naming that integer's field, not a parse error
    of the whole body. Routers use it as ``route_class``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except StarletteHTTPException as exc:
                if exc.status_code != 400 or not isinstance(exc.__cause__, ValueError):
                    raise
                found = long_integer_field(await request.body())
                if found is None:
                    raise
                field, digits = found
                return _invalid_field(
                    request, field, f"integer out of range (a number of {digits} digits)"
                )

        return route_handler


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body(INTERNAL_ERROR_DETAIL), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Register every domain-error-to-HTTP mapping on ``app``."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(FieldError, _field_error)  # ConfigError and InputError
    app.add_exception_handler(DatasetError, _dataset_error)
    app.add_exception_handler(KruError, _kru_error)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(Conflict, _conflict)
    app.add_exception_handler(Invalid, _invalid)
    app.add_exception_handler(Unavailable, _unavailable)
    app.add_exception_handler(OverQuota, _over_quota)
    app.add_exception_handler(InsufficientStorage, _insufficient_storage)
    app.add_exception_handler(Exception, _unexpected)
