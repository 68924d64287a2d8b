"""The job store's engine and sessions: SQLite (WAL, busy timeout) by default, PostgreSQL by URL.

SQLite allows one writer at a time across processes (API and workers). Write transactions start
with ``BEGIN IMMEDIATE`` (:meth:`Store.writing`) so that two of them queue on the busy timeout
instead of failing on a lock upgrade; reads (:meth:`Store.reading`) start deferred and never
block writers thanks to WAL. The schema is the migrations' (:mod:`worker.schema`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, bindparam, create_engine, event, text
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.functions import FunctionElement

from worker.models import UTCDateTime

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 30.0


class Store:
    """One database: an engine, a read session factory and a write session factory."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.engine = _create_engine(url)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        writer = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self._write = sessionmaker(writer, expire_on_commit=False)

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads; closed (its transaction rolled back) at the end. Objects loaded
        through it stay readable afterwards."""
        with self._read() as session:
            yield session

    @contextlib.contextmanager
    def writing(self) -> Iterator[Session]:
        """A session whose transaction is committed at the end (rolled back on error)."""
        with self._write() as session, session.begin():
            yield session

    def ping(self) -> None:
        """Run ``SELECT 1``; raise on failure."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


class db_clock(FunctionElement[datetime]):
    """The database's "now", ``seconds_ago`` earlier: a SQL expression, evaluated by the store.

    Heartbeats are written with it and judged stale against it, so the clocks of the nodes
    that run workers do not matter: on PostgreSQL it is the server's ``now()`` (its transaction's
    start), on SQLite (one machine, one clock) the UTC time of the process that runs the
    statement, as text in SQLAlchemy's storage format (``YYYY-MM-DD HH:MM:SS.ffffff``, so that
    it compares with the stored values).
    """

    type = UTCDateTime()
    inherit_cache = True
    name = "db_clock"

    def __init__(self, seconds_ago: float = 0.0) -> None:
        super().__init__(bindparam("seconds_ago", float(seconds_ago), unique=True))


@compiles(db_clock, "postgresql")
def _db_clock_postgresql(element: db_clock, compiler: Any, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"(now() - make_interval(secs => {seconds}))"


@compiles(db_clock, "sqlite")
def _db_clock_sqlite(element: db_clock, compiler: Any, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    # %f is SS.SSS (milliseconds): three more digits make SQLAlchemy's microsecond format.
    return f"(strftime('%Y-%m-%d %H:%M:%f', 'now', (-{seconds}) || ' seconds') || '000')"


def _create_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(
            url, pool_pre_ping=True, pool_size=5, max_overflow=10, connect_args=_pg_args(url)
        )
    path = url.split("///", 1)[1] if "///" in url else ""
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _pg_args(url: str) -> dict[str, Any]:
    return {"connect_timeout": 5} if "connect_timeout" not in url else {}


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take over transaction control from the sqlite3 module, so that BEGIN is ours (below).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_on_begin(connection: Any) -> None:
    mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
    connection.exec_driver_sql(f"BEGIN {mode}")
