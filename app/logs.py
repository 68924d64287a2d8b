"""Access-log hygiene: no query string ever reaches the log.

A client may put a secret in a query string (``GET /v1/jobs?api_key=...``: refused, but the URL
was already on its way to the access log). :class:`QueryStringFilter` removes the query string
from every record of uvicorn's access logger (``uvicorn.access``, whose arguments are
``(client, method, path_with_query, http_version, status)``) before any handler formats it, so
neither the console nor a log shipper ever sees one. :func:`install_access_log_filter` adds it
once per process; :func:`app.main.create_app` calls it.
"""

from __future__ import annotations

import logging

ACCESS_LOGGER = "uvicorn.access"
#: What replaces a removed query string, so that the log still shows that there was one.
REDACTED_QUERY = "?<query removed>"


def strip_query(target: str) -> str:
    """``target`` (a request path with an optional query string) without its query string."""
    path, sep, _ = target.partition("?")
    return path + REDACTED_QUERY if sep else path


class QueryStringFilter(logging.Filter):
    """Remove query strings from uvicorn access-log records (the path argument, index 2)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], strip_query(args[2]), *args[3:])
        return True


def install_access_log_filter() -> None:
    """Add :class:`QueryStringFilter` to uvicorn's access logger (once)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, QueryStringFilter) for f in logger.filters):
        logger.addFilter(QueryStringFilter())
