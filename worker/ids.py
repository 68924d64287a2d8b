"""The one shape of the ids the store makes for jobs, datasets, models and sessions."""

from __future__ import annotations

import re
import uuid

#: 32 lowercase hex digits (a UUID4 without dashes): :func:`new_id`.
ID_PATTERN = r"[0-9a-f]{32}"
_ID = re.compile(ID_PATTERN)


def new_id() -> str:
    """A fresh random id."""
    return uuid.uuid4().hex


def is_id(value: object) -> bool:
    """Whether ``value`` has the shape of an id (anything else names nothing)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None
