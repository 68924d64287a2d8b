"""The job store's tables (SQLAlchemy 2 declarative): jobs, metric points, events, datasets,
models.

The schema is made by the Alembic migrations in ``worker/migrations/versions`` (``kru db
upgrade``, :mod:`worker.schema`); a change here needs a new migration that makes the same change
(docs/deploy.md, "Schema migrations"). ``tests/deploy/test_migrations.py`` checks that the
migrations and these classes agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

#: The owner of rows created while the API is open, and of rows from before owners (0004); the
#: same name as :data:`app.auth.OPEN_KEY_NAME`.
OPEN_OWNER = "anonymous"


def utcnow() -> datetime:
    """Now, as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC, returns timezone-aware UTC datetimes on SQLite and PostgreSQL alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Job(Base):
    """A training job; the row is the truth about it (not Celery's result backend).

    ``worker`` and ``attempts`` together are the claim: every write of a running job's worker is
    conditional on both, so a worker that lost its claim (reaped) cannot overwrite the job.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_created", "status", "created_at"),
        Index("ix_jobs_created", "created_at"),
        Index("ix_jobs_owner_status", "owner", "status"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    enqueued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    worker: Mapped[str | None] = mapped_column(String(200))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]
    error: Mapped[str | None] = mapped_column(Text)
    model_id: Mapped[str | None] = mapped_column(String(32))
    #: The name of the API key that submitted it (quotas, fair publishing; 0004).
    owner: Mapped[str] = mapped_column(String(64), default=OPEN_OWNER, server_default=OPEN_OWNER)
    #: When retention thinned the finished job's progress events and metric points (0002).
    pruned_at: Mapped[datetime | None]


#: The jobs table, for SQLAlchemy Core statements (``update(job_table).where(...)``).
job_table = Job.__table__


class MetricPoint(Base):
    """One point of a job's metric history (``phase`` ``train`` or ``eval``)."""

    __tablename__ = "metric_points"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(16))
    step: Mapped[int] = mapped_column(Integer)
    time: Mapped[datetime]
    metrics: Mapped[dict[str, Any]]


class JobEvent(Base):
    """A status change or progress report, streamed to clients as Server-Sent Events."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]]
    time: Mapped[datetime]


class Dataset(Base):
    """An uploaded dataset; its file is ``datasets_dir / f"{id}.{kind}"``, never a client name."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_owner_sha256", "owner", "sha256"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    filename: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    summary: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(index=True)
    #: The name of the API key that uploaded it (quotas, deduplication per key; 0004).
    owner: Mapped[str] = mapped_column(String(64), default=OPEN_OWNER, server_default=OPEN_OWNER)


class Model(Base):
    """A trained model: the final checkpoint of a succeeded job (path relative to data_dir)."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    config: Mapped[dict[str, Any]]
    task: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any]]
    parameter_counts: Mapped[dict[str, Any]]
    checkpoint: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(index=True)


class StreamSession(Base):
    """A streaming prediction session (0003): a model's hidden state carried between chunks.

    ``position`` is the steps consumed so far; every write is conditional on it, so two
    replicas cannot both advance a session from the same position. ``last_position``,
    ``last_digest`` and ``last_answer`` keep the last chunk's answer for a retry of it.
    """

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(32))
    position: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[bytes | None] = mapped_column(LargeBinary)
    last_position: Mapped[int | None] = mapped_column(Integer)
    last_digest: Mapped[str | None] = mapped_column(String(64))
    last_answer: Mapped[dict[str, Any] | None]
    ttl_seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)


class WorkerRow(Base):
    """A live worker process (0005), heartbeated by :mod:`worker.registry`: where it runs, on
    what device, and the job it holds. A row whose heartbeat is older than the heartbeat timeout
    is a worker that is gone (its row is removed at a graceful stop, or later by another)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    device_name: Mapped[str | None] = mapped_column(String(200))
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    torch_version: Mapped[str] = mapped_column(String(64))
    cuda_version: Mapped[str | None] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(String(32))
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime] = mapped_column(index=True)
