"""Logging set-up of the entry points (``kru`` commands, workers); libraries only log."""

from __future__ import annotations

import logging

#: One format for every process: time, level, logger, pid, message.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


def configure_logging(level: str | int) -> None:
    """Log to stderr at ``level``, replacing any earlier set-up of the root logger."""
    logging.basicConfig(level=level, format=LOG_FORMAT, force=True)
