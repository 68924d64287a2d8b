"""Domain errors to HTTP errors, in one place.

Every error body is an :class:`app.schemas.ErrorResponse`: a stable ``detail`` string, and for
invalid input the offending ``field`` (dotted path, e.g. ``train.lr`` or ``inputs.0.17``) and the
list of ``errors`` (with line numbers for dataset uploads). ``404`` unknown ids, ``409`` state
conflicts, ``413`` oversized bodies, ``422`` invalid input, ``401``/``403`` auth. Anything else is
a bug: it is logged with its traceback and answered with a JSON ``500``. ``503`` when the
database or broker cannot be reached.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kru_core.errors import DatasetError, FieldError, KruError
from worker.errors import Conflict, Invalid, NotFound, Unavailable

logger = logging.getLogger(__name__)

INTERNAL_ERROR_DETAIL = "internal server error"

# Pydantic names the member of a union it tried (``list[int]``, ``constrained-int``) in the error
# location; the client sent no such key, so these are left out of the field path.
_UNION_TAGS = frozenset({"int", "float", "str", "bool", "list", "dict", "none", "tuple"})
_LOCATION_SOURCES = frozenset({"body", "query", "path", "header", "cookie"})


def error_body(
    detail: str, *, field: str | None = None, errors: Sequence[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """An :class:`app.schemas.ErrorResponse` as plain JSON data (``None`` parts left out)."""
    body: dict[str, Any] = {"detail": detail}
    if field is not None:
        body["field"] = field
    if errors is not None:
        body["errors"] = list(errors)
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
    if exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI's "There was an error parsing the body" (bytes that are not UTF-8, a broken
        # multipart stream): invalid input like malformed JSON, so the same 422 and shape.
        detail = f"malformed request body: {_reason(exc.__cause__)}"
        return JSONResponse(
            error_body(detail, field="body", errors=[{"field": "body", "message": detail}]),
            status_code=422,
        )
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


def _invalid_field(request: Request, field: str, message: str) -> JSONResponse:
    return JSONResponse(
        error_body(
            f"{field}: {message}", field=field, errors=[{"field": field, "message": message}]
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
    app.add_exception_handler(Exception, _unexpected)
