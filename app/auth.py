"""Optional API-key auth: ``Authorization: Bearer <key>``, keys from ``KRU_API_KEYS``.

With no keys configured the API is open (the app logs a warning at start). With keys, a request
without a bearer token is a ``401`` and one with an unknown token a ``403``. Health, readiness,
metrics and the docs stay open: probes and scrapers carry no secrets.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

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


def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """Dependency of every protected router: pass, or raise ``401`` / ``403``."""
    keys: Sequence[str] = request.app.state.api_keys
    if not keys:
        return
    if credentials is None or not credentials.credentials:
        raise HTTPException(
            status_code=401, detail=MISSING_KEY_DETAIL, headers={"WWW-Authenticate": "Bearer"}
        )
    if not key_matches(credentials.credentials, keys):
        raise HTTPException(status_code=403, detail=INVALID_KEY_DETAIL)
