"""Optional API-key auth: ``Authorization: Bearer <key>``, keys from ``KRU_API_KEYS``.

With no keys configured the API is open (the app logs a warning at start). With keys, a request
to a ``/v1`` route without a bearer token is a ``401`` and one with an unknown token a ``403``.
Health, readiness, metrics and the docs stay open: probes and scrapers carry no secrets.

The check is a pure ASGI middleware, so it runs before anything reads or parses the body: a
client without a key gets a ``401`` whatever it sent, never a validation error about its payload.
The routers declare :data:`bearer_scheme` only so that the OpenAPI docs show the scheme.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence

from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

MISSING_KEY_DETAIL = "missing API key: send 'Authorization: Bearer <key>'"
INVALID_KEY_DETAIL = "invalid API key"

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


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or ``None``."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer" and token:
                return token
            return None
    return None


class ApiKeyMiddleware:
    """Answer ``401``/``403`` for requests under ``protected_prefix`` without a valid key.

    Args:
        app: the wrapped ASGI app.
        keys: the accepted keys; empty: everything passes.
        protected_prefix: the paths that need a key (``/v1``).
    """

    def __init__(self, app: ASGIApp, *, keys: Sequence[str], protected_prefix: str) -> None:
        self.app = app
        self.keys = tuple(keys)
        self.prefix = protected_prefix.rstrip("/")

    def protects(self, path: str) -> bool:
        """Whether ``path`` needs a key."""
        return bool(self.keys) and (path == self.prefix or path.startswith(self.prefix + "/"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.protects(scope["path"]):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is None:
            await _send_error(send, 401, MISSING_KEY_DETAIL, [(b"www-authenticate", b"Bearer")])
        elif not key_matches(token, self.keys):
            await _send_error(send, 403, INVALID_KEY_DETAIL, [])
        else:
            await self.app(scope, receive, send)


async def _send_error(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]
) -> None:
    body = json.dumps({"detail": detail}, separators=(",", ":")).encode()
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
