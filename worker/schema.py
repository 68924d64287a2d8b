"""The job store's schema version: Alembic migrations (``worker/migrations``) and the start-up
check of every process.

* ``kru db upgrade`` (:func:`upgrade`) runs the migrations up to the code's (the head), in one
  transaction that processes starting together take in turn (``BEGIN IMMEDIATE`` on SQLite, an
  advisory lock on PostgreSQL). A database made by the first release's ``create_all`` (tables,
  no ``alembic_version``) is stamped ``0001`` first, then upgraded.
* ``kru api`` and ``kru worker`` call :func:`prepare` with ``upgrade=False``: an empty database
  (a first start) gets the whole schema; one with an older schema is refused
  (:class:`SchemaOutdated`, naming ``kru db upgrade``), as is one newer than the code.
* ``kru serve`` (the embedded default) calls it with ``upgrade=True``: it upgrades by itself.

Example::

    >>> state = current(store)            # doctest: +SKIP
    >>> state.revision, state.head, state.up_to_date
    ('0001', '0002', False)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

from worker.db import Store

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: The revision that a database created before migrations existed has (worker/models.py at
#: commit 120f745, ``create_all``).
FIRST_REVISION = "0001"
#: A table of every schema revision; its presence without ``alembic_version`` means "0001".
_LEGACY_MARKER = "jobs"
_VERSION_TABLE = "alembic_version"  # Alembic's default
_SCHEMA_LOCK = 0x6B72_7500  # PostgreSQL advisory lock key of schema changes ("kru")


class SchemaOutdated(Exception):
    """The database's schema is not the code's; the message says what to run."""


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands.

    Attributes:
        revision: its revision (``"0001"``, ...); None for an empty database. A database from
            before migrations reads ``"0001"`` with ``legacy`` True.
        head: the code's revision (the last migration).
        legacy: tables from before migrations, no ``alembic_version`` yet (``kru db upgrade``
            stamps it).
    """

    revision: str | None
    head: str
    legacy: bool = False

    @property
    def empty(self) -> bool:
        return self.revision is None

    @property
    def up_to_date(self) -> bool:
        return self.revision == self.head

    @property
    def known(self) -> bool:
        """False when the database is at a revision this code has no migration for (newer)."""
        return self.revision is None or self.revision in revisions()

    def describe(self) -> str:
        """One line for ``kru db current``."""
        if self.empty:
            return f"none (empty database); the code's head is {self.head}"
        where = str(self.revision)
        if self.legacy:
            where += " (created before migrations, not stamped yet)"
        if self.up_to_date:
            return f"{where} (head)"
        if not self.known:
            return f"{where}: unknown to this code (head {self.head}); a newer release's schema"
        return f"{where}; the code's head is {self.head}: run `kru db upgrade`"


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration of the migrations, run on ``connection`` (for Alembic's own
    commands, e.g. ``command.revision(alembic_config(conn), ..., autogenerate=True)``)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The code's schema revision (the last migration)."""
    heads = _scripts().get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"the migrations have {len(heads)} heads {heads}: expected one chain")
    return heads[0]


def revisions() -> list[str]:
    """Every migration's revision, oldest first."""
    return [s.revision for s in reversed(list(_scripts().walk_revisions()))]


def _state(conn: Connection) -> SchemaState:
    tables = inspect(conn)
    if tables.has_table(_VERSION_TABLE):
        revision = conn.execute(text(f"SELECT version_num FROM {_VERSION_TABLE}")).scalar()
        if revision is not None:
            return SchemaState(revision, head())
    if tables.has_table(_LEGACY_MARKER):
        return SchemaState(FIRST_REVISION, head(), legacy=True)
    return SchemaState(None, head())


def current(store: Store) -> SchemaState:
    """The database's schema state (read only)."""
    with store.engine.connect() as conn:
        return _state(conn)


@contextlib.contextmanager
def _locked(store: Store) -> Iterator[Connection]:
    """A write transaction that one process at a time holds (until it commits)."""
    writer = store.engine.execution_options(sqlite_begin="IMMEDIATE")
    with writer.begin() as conn:
        if not store.is_sqlite:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
        yield conn


def upgrade(store: Store, revision: str = "head") -> tuple[SchemaState, SchemaState]:
    """Migrate to ``revision`` (default: the code's head), stamping a database from before
    migrations as ``0001`` first; return the states before and after. All in one transaction:
    a failing migration leaves the database as it was (PostgreSQL; SQLite's DDL too)."""
    with _locked(store) as conn:
        before = _state(conn)
        if not before.known:
            raise SchemaOutdated(_message(before))
        config = alembic_config(conn)
        if before.legacy:
            command.stamp(config, FIRST_REVISION)
        command.upgrade(config, revision)
        return before, _state(conn)


def prepare(store: Store, *, upgrade_schema: bool) -> SchemaState:
    """What a process does at start: upgrade (``upgrade_schema``, or an empty database), else
    raise :class:`SchemaOutdated` unless the schema is the code's."""
    state = current(store)
    if state.up_to_date:
        return state
    if upgrade_schema or state.empty:
        return upgrade(store)[1]
    raise SchemaOutdated(_message(state))


def _message(state: SchemaState) -> str:
    if not state.known:
        return (
            f"the database's schema is at revision {state.revision}, which this code does not "
            f"know (its head is {state.head}): it was upgraded by a newer release; run that "
            "release, or restore the backup taken before the upgrade"
        )
    return (
        f"the database's schema is at revision {state.revision}, older than the code's "
        f"({state.head}): run `kru db upgrade` (with the same KRU_DATABASE_URL) first"
    )
