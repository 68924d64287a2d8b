"""Job state transitions, each one atomic in the database.

``queued -> running`` is a claim: a conditional ``UPDATE`` that only one worker can win, which
increments ``attempts`` and records the worker's name and a heartbeat. Every later write of that
worker (heartbeat, progress, the end) is conditional on ``(status='running', worker, attempts)``
still being its claim, so a worker that was reaped (its heartbeat went stale) cannot overwrite
the job's next attempt.

Times written from here (heartbeats, starts, ends, events, metric points) are the database's
clock (:class:`worker.db.db_clock`), never a worker node's: staleness is judged on the same clock,
so nodes whose clocks disagree cannot requeue a live job or miss a dead one. Only ``created_at``
is the API's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, and_, func, or_, select, update
from sqlalchemy.orm import Session

from worker.db import Store, db_clock
from worker.models import OPEN_OWNER, Job, JobEvent, MetricPoint, Model, job_table, utcnow

logger = logging.getLogger(__name__)


#: A point in time given to a query: a datetime, or a SQL expression such as
#: :func:`stale_cutoff` (the database's clock).
Timestamp = datetime | ColumnElement[datetime]


@dataclass(frozen=True)
class Claim:
    """A worker's hold on a running job: ``(worker, attempt)`` fences its writes."""

    job_id: str
    worker: str
    attempt: int
    config: dict[str, Any]
    metrics: dict[str, Any]


def add_event(db: Session, job_id: str, kind: str, data: dict[str, Any]) -> None:
    """Append an event (``status`` or ``progress``) in the session's transaction."""
    db.add(JobEvent(job_id=job_id, kind=kind, data=data, time=db_clock()))


def create(
    store: Store,
    *,
    job_id: str,
    name: str | None,
    config: dict[str, Any],
    owner: str = OPEN_OWNER,
) -> Job:
    """Insert a ``queued`` job of ``owner`` (an API key's name) and its first event; committed
    when this returns."""
    now = utcnow()
    job = Job(
        id=job_id,
        name=name,
        owner=owner,
        status="queued",
        config=config,
        attempts=0,
        created_at=now,
        updated_at=now,
        cancel_requested=False,
        step=0,
        total_steps=int(config["train"]["steps"]),
        metrics={},
    )
    with store.writing() as db:
        db.add(job)
        add_event(db, job_id, "status", {"status": "queued", "attempt": 0})
    return job


def mark_enqueued(store: Store, job_id: str) -> None:
    """Record that the job's message was published."""
    with store.writing() as db:
        db.execute(update(job_table).where(job_table.c.id == job_id).values(enqueued_at=db_clock()))


def claim(
    store: Store, job_id: str, *, worker: str, max_attempts: int, stale_before: Timestamp
) -> Claim | None:
    """Take the job if it is ``queued``, or ``running`` with a heartbeat older than
    ``stale_before`` (its worker is gone); None when another live worker holds it, it is
    finished, unknown, or out of attempts."""
    now = db_clock()
    claimable = or_(
        job_table.c.status == "queued",
        and_(job_table.c.status == "running", _stale(stale_before)),
    )
    stmt = (
        update(job_table)
        .where(
            job_table.c.id == job_id,
            claimable,
            job_table.c.cancel_requested.is_(False),
            job_table.c.attempts < max_attempts,
        )
        .values(
            status="running",
            attempts=job_table.c.attempts + 1,
            worker=worker,
            heartbeat_at=db_clock(),
            started_at=func.coalesce(job_table.c.started_at, now),
            updated_at=now,
        )
        .returning(job_table.c.attempts, job_table.c.config, job_table.c.metrics)
    )
    with store.writing() as db:
        row = db.execute(stmt).first()
        if row is None:
            return None
        add_event(
            db, job_id, "status", {"status": "running", "attempt": row.attempts, "worker": worker}
        )
    return Claim(job_id, worker, row.attempts, dict(row.config), dict(row.metrics or {}))


def _stale(stale_before: Timestamp) -> ColumnElement[bool]:
    return or_(job_table.c.heartbeat_at.is_(None), job_table.c.heartbeat_at < stale_before)


def _held(claim: Claim) -> ColumnElement[bool]:
    return and_(
        job_table.c.id == claim.job_id,
        job_table.c.status == "running",
        job_table.c.worker == claim.worker,
        job_table.c.attempts == claim.attempt,
    )


def heartbeat(store: Store, claim: Claim) -> bool | None:
    """Refresh the claim's heartbeat; return ``cancel_requested``, or None if the claim is lost."""
    stmt = (
        update(job_table)
        .where(_held(claim))
        .values(heartbeat_at=db_clock())
        .returning(job_table.c.cancel_requested)
    )
    with store.writing() as db:
        row = db.execute(stmt).first()
    return None if row is None else bool(row.cancel_requested)


def report_progress(store: Store, claim: Claim, writes: list[dict[str, Any]]) -> bool:
    """Write progress reports in one transaction; False if the claim is lost.

    Each write is ``{"step", "total_steps", "metrics", "phase", "point", "event"}``, oldest
    first: the job row takes the last one's step and metrics (and a heartbeat); each adds its
    metric point (unless ``point`` is None) and its progress event.
    """
    if not writes:
        return True
    now = db_clock()
    last = writes[-1]
    stmt = (
        update(job_table)
        .where(_held(claim))
        .values(
            step=last["step"],
            total_steps=last["total_steps"],
            metrics=last["metrics"],
            heartbeat_at=db_clock(),
            updated_at=now,
        )
    )
    with store.writing() as db:
        if db.execute(stmt).rowcount == 0:
            return False
        for write in writes:
            if write["point"] is not None:
                db.add(
                    MetricPoint(
                        job_id=claim.job_id,
                        attempt=claim.attempt,
                        phase=write["phase"],
                        step=write["step"],
                        time=now,
                        metrics=write["point"],
                    )
                )
            add_event(db, claim.job_id, "progress", write["event"])
    return True


def note(store: Store, claim: Claim, data: dict[str, Any]) -> None:
    """Append a status event (e.g. where the attempt resumed) while the claim holds."""
    with store.writing() as db:
        if db.execute(select(job_table.c.id).where(_held(claim))).first() is not None:
            add_event(db, claim.job_id, "status", data)


def finish(
    store: Store,
    claim: Claim,
    status: str,
    *,
    error: str | None = None,
    model: Model | None = None,
    step: int | None = None,
    metrics: dict[str, Any] | None = None,
) -> bool:
    """End the claimed job ``succeeded``, ``failed`` or ``cancelled`` (registering ``model``
    with it); False if the claim was lost (nothing written)."""
    now = db_clock()
    values: dict[str, Any] = {
        "status": status,
        "finished_at": now,
        "updated_at": now,
        "error": error,
        "heartbeat_at": None,
    }
    if model is not None:
        values["model_id"] = model.id
    if step is not None:
        values["step"] = step
    if metrics is not None:
        values["metrics"] = metrics
    with store.writing() as db:
        if db.execute(update(job_table).where(_held(claim)).values(**values)).rowcount == 0:
            return False
        if model is not None:
            db.add(model)
        data: dict[str, Any] = {"status": status, "attempt": claim.attempt}
        if error is not None:
            data["error"] = error
        if model is not None:
            data["model_id"] = model.id
        add_event(db, claim.job_id, "status", data)
    return True


def release(store: Store, claim: Claim, *, reason: str) -> bool:
    """Give a job back to the queue (the worker is shutting down after a checkpoint); the
    attempt is not counted. False if the claim was lost."""
    stmt = (
        update(job_table)
        .where(_held(claim))
        .values(
            status="queued",
            attempts=job_table.c.attempts - 1,
            worker=None,
            heartbeat_at=None,
            enqueued_at=None,
            updated_at=db_clock(),
        )
    )
    with store.writing() as db:
        if db.execute(stmt).rowcount == 0:
            return False
        add_event(
            db,
            claim.job_id,
            "status",
            {"status": "queued", "attempt": claim.attempt, "reason": reason},
        )
    return True


def locked_job_row(db: Session, job_id: str, *columns: ColumnElement[Any]) -> Row[Any] | None:
    """The ``columns`` of job ``job_id``'s row (None if the job is unknown), locked until the
    session's transaction ends: ``SELECT ... FOR UPDATE`` on PostgreSQL, where a concurrent
    claim or decision on the job waits for this one (SQLite serializes writers anyway)."""
    return db.execute(select(*columns).where(job_table.c.id == job_id).with_for_update()).first()


def request_cancel(store: Store, job_id: str) -> str | None:
    """Cancel a queued job at once or flag a running one; return the status before (None if
    the job is unknown). A finished job is left alone."""
    now = db_clock()
    with store.writing() as db:
        # FOR UPDATE (PostgreSQL): a concurrent claim waits for this decision, and vice versa.
        row = locked_job_row(db, job_id, job_table.c.status, job_table.c.cancel_requested)
        if row is None:
            return None
        if row.status == "queued":
            db.execute(
                update(job_table)
                .where(job_table.c.id == job_id)
                .values(status="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
            )
            add_event(db, job_id, "status", {"status": "cancelled"})
        elif row.status == "running" and not row.cancel_requested:
            db.execute(
                update(job_table)
                .where(job_table.c.id == job_id)
                .values(cancel_requested=True, updated_at=now)
            )
            add_event(db, job_id, "status", {"status": "running", "cancel_requested": True})
        return str(row.status)


def reap(store: Store, *, stale_before: Timestamp, max_attempts: int) -> list[str]:
    """Settle running jobs whose heartbeat is older than ``stale_before`` (their worker died):
    ``cancelled`` if a cancel was asked, ``failed`` after ``max_attempts``, else back to
    ``queued``. Return the ids requeued (to enqueue after this commit)."""
    requeued: list[str] = []
    now = db_clock()
    with store.writing() as db:
        query = select(
            job_table.c.id,
            job_table.c.attempts,
            job_table.c.cancel_requested,
            job_table.c.heartbeat_at,
        )
        query = query.where(job_table.c.status == "running", _stale(stale_before))
        if not store.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        for row in db.execute(query).all():
            guard = and_(
                job_table.c.id == row.id,
                job_table.c.status == "running",
                job_table.c.attempts == row.attempts,
                _stale(stale_before),
            )
            if row.cancel_requested:
                values: dict[str, Any] = {"status": "cancelled", "finished_at": now}
                data: dict[str, Any] = {"status": "cancelled", "attempt": row.attempts}
            elif row.attempts >= max_attempts:
                error = (
                    f"gave up after {row.attempts} attempts: the worker running the job "
                    "stopped heartbeating (killed, out of memory, or its node was lost)"
                )
                values = {"status": "failed", "finished_at": now, "error": error}
                data = {"status": "failed", "attempt": row.attempts, "error": error}
            else:
                values = {"status": "queued", "enqueued_at": None}
                data = {
                    "status": "queued",
                    "attempt": row.attempts,
                    "reason": "worker lost (heartbeat stale)",
                }
            values.update(worker=None, heartbeat_at=None, updated_at=now)
            if db.execute(update(job_table).where(guard).values(**values)).rowcount:
                add_event(db, row.id, "status", data)
                logger.warning("job %s: worker lost, now %s", row.id, data["status"])
                if data["status"] == "queued":
                    requeued.append(row.id)
        exhausted = and_(job_table.c.status == "queued", job_table.c.attempts >= max_attempts)
        for (job_id,) in db.execute(select(job_table.c.id).where(exhausted)).all():
            error = f"gave up after {max_attempts} attempts"
            db.execute(
                update(job_table)
                .where(job_table.c.id == job_id, exhausted)
                .values(status="failed", finished_at=now, updated_at=now, error=error)
            )
            add_event(db, job_id, "status", {"status": "failed", "error": error})
    return requeued


def unsent(store: Store, *, created_before: datetime | None = None) -> list[str]:
    """Queued jobs whose message was never published (created before ``created_before``)."""
    query = select(job_table.c.id).where(
        job_table.c.status == "queued", job_table.c.enqueued_at.is_(None)
    )
    if created_before is not None:
        query = query.where(job_table.c.created_at < created_before)
    with store.reading() as db:
        return [r.id for r in db.execute(query.order_by(job_table.c.created_at)).all()]


def queued(store: Store, *, published_only: bool = False) -> list[str]:
    """Every queued job (only those whose message was published), oldest first."""
    query = (
        select(job_table.c.id)
        .where(job_table.c.status == "queued")
        .order_by(job_table.c.created_at)
    )
    if published_only:
        query = query.where(job_table.c.enqueued_at.is_not(None))
    with store.reading() as db:
        return [r.id for r in db.execute(query).all()]


def stale_cutoff(timeout_s: float) -> ColumnElement[datetime]:
    """The heartbeat time before which a running job counts as lost: ``timeout_s`` before the
    database's now (:class:`worker.db.db_clock`), as heartbeats are written on its clock."""
    return db_clock(timeout_s)
