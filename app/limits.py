"""Request size limits: a pure ASGI middleware that answers ``413`` for oversized bodies.

``Content-Length`` alone is not enough: a chunked upload has none, and a client may lie. The
middleware checks the header before the app runs (nothing is read, nothing is stored) and also
counts the bytes of the streamed body as the app receives them; the first message past the limit
raises :class:`BodyTooLarge`, which FastAPI re-raises from body parsing and the app's exception
handler turns into the same JSON ``413``. The route never runs with a truncated body.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """The request body is larger than the limit of its route."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=body_too_large_detail(limit))
        self.limit = limit


def body_too_large_detail(limit: int) -> str:
    """The stable ``detail`` of a ``413``."""
    return f"request body too large: the limit is {limit} bytes"


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit_for(method, path)`` bytes with a JSON ``413``.

    Args:
        app: the wrapped ASGI app.
        limit_for: the byte limit of a request, from its method and path (uploads get a larger
            one than JSON routes).
    """

    def __init__(self, app: ASGIApp, *, limit_for: Callable[[str, str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_413(send, limit)
            return

        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            # Raised where no exception handler sees it (e.g. an outer middleware reading the
            # body); answer here unless a response is already on its way.
            if response_started:
                raise
            await _send_413(send, limit)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps({"detail": body_too_large_detail(limit)}, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
