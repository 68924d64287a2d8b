"""The process-wide state of the job system: settings, the store and the Celery app.

:func:`init` builds it once per process (the API's lifespan through ``worker.service.init``, a
worker through :func:`worker.runner.run_worker`); everything else reads :func:`current`.
"""

from __future__ import annotations

import fcntl
import logging
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import Engine, create_engine, text

from worker import schema
from worker.celery_app import create_celery_app, enqueue
from worker.db import Store
from worker.session_store import SessionStore, open_session_store
from worker.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class Context:
    """What a process of the job system holds."""

    settings: Settings
    store: Store
    celery: Celery
    sessions: SessionStore
    _broker_engine: Engine | None = field(default=None, repr=False)

    def enqueue(self, job_id: str) -> bool:
        """Publish the job's message; False (logged) when the broker cannot be reached."""
        try:
            enqueue(self.celery, job_id, queue=self.settings.queue_name)
        except Exception as exc:
            logger.warning("could not enqueue job %s (the reaper will retry): %s", job_id, exc)
            return False
        return True

    def ping_broker(self) -> None:
        """Raise unless the broker answers (Redis ``PING``, or a query on the SQL transport)."""
        url = self.settings.broker_url
        if self.settings.is_embedded_broker:
            if self._broker_engine is None:
                self._broker_engine = create_engine(url.removeprefix("sqla+"), pool_pre_ping=True)
            with self._broker_engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return
        import redis

        client: Any = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
        try:
            client.ping()
        finally:
            client.close()

    def close(self) -> None:
        """Release connections (database pool, broker pool)."""
        self.store.dispose()
        self.sessions.close()
        if self._broker_engine is not None:
            self._broker_engine.dispose()
        self.celery.close()


_lock = threading.Lock()
_current: Context | None = None


def init(settings: Settings, *, upgrade_schema: bool = False) -> Context:
    """Build the process's context for ``settings`` (replacing a previous one).

    The database's schema must be the code's: an empty database gets it; an older one is
    upgraded with ``upgrade_schema`` (``kru serve``), else :class:`worker.schema.SchemaOutdated`
    is raised (``kru api``, ``kru worker``: the operator runs ``kru db upgrade``)."""
    global _current
    with _lock:
        if _current is not None and _current.settings == settings:
            return _current
        if _current is not None:
            _current.close()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store(settings.database_url)
        try:
            schema.prepare(store, upgrade_schema=upgrade_schema)
        except BaseException:
            store.dispose()
            raise
        celery = create_celery_app(settings, current)
        _prepare_embedded_broker(settings, celery)
        sessions = open_session_store(settings.session_store, store)
        _current = Context(settings=settings, store=store, celery=celery, sessions=sessions)
        return _current


def current() -> Context:
    """The context built by :func:`init`; ``RuntimeError`` before it."""
    if _current is None:
        raise RuntimeError("the job system is not initialised: call worker.service.init() first")
    return _current


def close() -> None:
    """Close and forget the context."""
    global _current
    with _lock:
        if _current is not None:
            _current.close()
            _current = None


def _prepare_embedded_broker(settings: Settings, celery: Celery) -> None:
    """WAL mode and kombu's tables for a SQLite broker file, under a file lock, so that the API
    and a worker starting together do not race to create them."""
    if not settings.broker_url.startswith("sqla+sqlite:///"):
        return
    path = Path(settings.broker_url.removeprefix("sqla+sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".init-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # The journal mode is stored in the file: setting it once here covers kombu's own
        # engine, which we do not configure. WAL lets the API publish while a worker polls.
        conn = sqlite3.connect(path, timeout=30)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        finally:
            conn.close()
        with celery.connection_for_write() as connection:
            connection.default_channel.queue_declare(settings.queue_name)  # kombu's tables
