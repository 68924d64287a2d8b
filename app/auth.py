"""Optional API-key auth: ``Authorization: Bearer <key>``, keys from ``KRU_API_KEYS``.

Keys have names: ``KRU_API_KEYS=alice:secret1,bob:secret2``; a bare secret (no ``name:``) is
still accepted and named ``key-`` plus the first 8 hex digits of its SHA-256 (so logs and quotas
can name it without showing it). Quotas (:mod:`worker.quotas`) and ownership of jobs and datasets
go by the name; the middleware puts it in ``request.state.api_key``. With the API open, every
request is the key :data:`OPEN_KEY_NAME`.

With no keys configured the API is open (the app logs a warning at start). With keys, a request
to a ``/v1`` route without a bearer token is a ``401`` and one with an unknown token a ``403``.
A ``/v1`` request with more than one ``Authorization`` header is a ``400`` (which one a proxy
or framework would honour is not defined), keys or not.
Health, readiness, metrics and the docs stay open: probes and scrapers carry no secrets.

The check is a pure ASGI middleware, so it runs before anything reads or parses the body: a
client without a key gets a ``401`` whatever it sent, never a validation error about its payload.
The routers declare :data:`bearer_scheme` only so that the OpenAPI docs show the scheme.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from worker.models import OPEN_OWNER

MISSING_KEY_DETAIL = "missing API key: send 'Authorization: Bearer <key>'"
INVALID_KEY_DETAIL = "invalid API key"
REPEATED_HEADER_DETAIL = "Authorization: expected one header, got several"
#: The key name of every request while the API is open (no ``KRU_API_KEYS``).
OPEN_KEY_NAME = OPEN_OWNER
#: What a key name may look like (it is stored with jobs and datasets, and shown in logs).
KEY_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class ApiKey:
    """One accepted key: its ``name`` (stored, logged, quota'd) and its ``secret``."""

    name: str
    secret: str = field(repr=False)


def parse_api_keys(entries: Sequence[str]) -> tuple[ApiKey, ...]:
    """The keys of ``KRU_API_KEYS`` entries: ``name:secret``, or a bare ``secret``.

    An entry is ``name:secret`` when the part before the first ``:`` is a valid name
    (:data:`KEY_NAME_PATTERN`) and a secret follows; anything else is a bare secret, named
    ``key-<first 8 hex digits of its SHA-256>``.

    Raises:
        ValueError: two keys with the same name or the same secret.
    """
    keys: list[ApiKey] = []
    for entry in entries:
        name, sep, secret = entry.partition(":")
        if not (sep and secret and KEY_NAME_PATTERN.fullmatch(name)):
            name, secret = bare_key_name(entry), entry
        keys.append(ApiKey(name, secret))
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"KRU_API_KEYS: key names must be unique, repeated: {dupes}")
    if len({k.secret for k in keys}) != len(keys):
        raise ValueError("KRU_API_KEYS: the same secret is listed twice")
    return tuple(keys)


def bare_key_name(secret: str) -> str:
    """The name of a key given without one: ``key-`` and 8 hex digits of its SHA-256."""
    return "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]


bearer_scheme = HTTPBearer(
    auto_error=False,
    description="An API key from KRU_API_KEYS (only when the server sets any).",
)


def key_matches(token: str, keys: Sequence[str]) -> bool:
    """Whether ``token`` is one of ``keys``, comparing in constant time.

    Every key is compared (no early exit), so the time taken says nothing about which key or how
    much of it matched.
    """
    token_bytes = token.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(token_bytes, key.encode())
    return found


def matching_key(token: str, keys: Sequence[ApiKey]) -> ApiKey | None:
    """The key whose secret is ``token``, comparing every key in constant time (as
    :func:`key_matches`), or ``None``."""
    token_bytes = token.encode()
    found: ApiKey | None = None
    for key in keys:
        if hmac.compare_digest(token_bytes, key.secret.encode()):
            found = key
    return found


def authorization_headers(scope: Scope) -> list[bytes]:
    """The values of every ``Authorization`` header of the request."""
    return [value for name, value in scope.get("headers", ()) if name == b"authorization"]


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or ``None``."""
    for value in authorization_headers(scope)[:1]:
        scheme, _, token = value.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            return token
    return None


class ApiKeyMiddleware:
    """Answer ``401``/``403`` for requests under ``protected_prefix`` without a valid key.

    The name of the request's key goes to ``scope["state"]["api_key"]`` (``request.state``).

    Args:
        app: the wrapped ASGI app.
        keys: the accepted keys (``KRU_API_KEYS`` entries, see :func:`parse_api_keys`); empty:
            everything passes, as the key :data:`OPEN_KEY_NAME`.
        protected_prefix: the paths that need a key (``/v1``).
    """

    def __init__(self, app: ASGIApp, *, keys: Sequence[str], protected_prefix: str) -> None:
        self.app = app
        self.keys = parse_api_keys(keys)
        self.prefix = protected_prefix.rstrip("/")

    def under_prefix(self, path: str) -> bool:
        """Whether ``path`` is a ``/v1`` path."""
        return path == self.prefix or path.startswith(self.prefix + "/")

    def protects(self, path: str) -> bool:
        """Whether ``path`` needs a key."""
        return bool(self.keys) and self.under_prefix(path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.under_prefix(scope["path"]):
            await self.app(scope, receive, send)
            return
        if len(authorization_headers(scope)) > 1:
            await _send_error(send, 400, REPEATED_HEADER_DETAIL, [], field="Authorization")
            return
        if not self.keys:
            scope.setdefault("state", {})["api_key"] = OPEN_KEY_NAME
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        key = None if token is None else matching_key(token, self.keys)
        if token is None:
            await _send_error(send, 401, MISSING_KEY_DETAIL, [(b"www-authenticate", b"Bearer")])
        elif key is None:
            await _send_error(send, 403, INVALID_KEY_DETAIL, [])
        else:
            scope.setdefault("state", {})["api_key"] = key.name
            await self.app(scope, receive, send)


async def _send_error(
    send: Send,
    status: int,
    detail: str,
    headers: list[tuple[bytes, bytes]],
    *,
    field: str | None = None,
) -> None:
    error: dict[str, str] = {"detail": detail}
    if field is not None:
        error["field"] = field
    body = json.dumps(error, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
