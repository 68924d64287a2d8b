"""Retention: what a finished job keeps, and what is removed when.

* **Checkpoints**, when the job ends (:func:`prune_checkpoints`, called by the worker that ended
  it): every checkpoint of the job except its last one and its registered model's.
* **Progress events and training metric points**, ``KRU_EVENT_RETENTION_DAYS`` after the job
  finished (:func:`thin_finished`, in the reaper's sweep): its ``progress`` events are deleted
  (``status`` events are kept: the job's history), its ``train`` metric points thinned to at most
  :data:`MAX_TRAIN_POINTS` spread over the run (the last one kept; every ``eval`` point kept).
  ``jobs.pruned_at`` records it, so a job is thinned once.
* **Deletes** (``DELETE /v1/jobs/{id}``, ``DELETE /v1/models/{id}``): :func:`delete_job` and
  :func:`delete_model` remove the rows and the files.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import delete, select, update

from worker.db import Store, db_clock
from worker.errors import Conflict, NotFound
from worker.jobs import locked_job_row
from worker.models import Job, JobEvent, MetricPoint, Model, StreamSession, job_table
from worker.views import FINISHED_STATUSES

if TYPE_CHECKING:
    from worker.context import Context
    from worker.jobs import Claim

logger = logging.getLogger(__name__)

#: Training metric points a thinned job keeps at most (evaluation points are all kept).
MAX_TRAIN_POINTS = 200
#: Finished jobs thinned per reaper sweep (the rest wait for the next sweeps).
THIN_BATCH = 20
_SECONDS_PER_DAY = 86_400.0

_events = JobEvent.__table__
_points = MetricPoint.__table__


def prune_checkpoints(ctx: Context, claim: Claim) -> list[Path]:
    """Remove the checkpoints of the claim's job except its last and its model's, once the job
    is finished by this claim (not when it was handed back, reaped, or taken by another
    attempt). Returns the directories removed."""
    from kru_core.checkpoint import CheckpointStore

    with ctx.store.reading() as db:
        row = db.execute(
            select(job_table.c.status, job_table.c.attempts, job_table.c.model_id).where(
                job_table.c.id == claim.job_id
            )
        ).first()
        model = db.get(Model, row.model_id) if row is not None and row.model_id else None
    if row is None or row.status not in FINISHED_STATUSES or row.attempts != claim.attempt:
        return []
    out_dir = ctx.settings.jobs_dir / claim.job_id
    checkpoints = CheckpointStore(out_dir).checkpoints() if out_dir.exists() else []
    keep = set(checkpoints[-1:])
    if model is not None:
        keep.add((ctx.settings.data_dir / model.checkpoint).resolve())
    removed = [p for p in checkpoints if p.resolve() not in {k.resolve() for k in keep}]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    if removed:
        logger.info("job %s: removed %d older checkpoint(s)", claim.job_id, len(removed))
    return removed


def thin_finished(store: Store, *, retention_days: float, limit: int = THIN_BATCH) -> list[str]:
    """Thin the progress events and training metric points of up to ``limit`` jobs finished
    more than ``retention_days`` ago (on the database's clock) and not thinned yet; return
    their ids. ``retention_days`` 0 disables it."""
    if retention_days <= 0:
        return []
    cutoff = db_clock(retention_days * _SECONDS_PER_DAY)
    due = (
        select(job_table.c.id)
        .where(
            job_table.c.status.in_(FINISHED_STATUSES),
            job_table.c.finished_at < cutoff,
            job_table.c.pruned_at.is_(None),
        )
        .order_by(job_table.c.finished_at)
        .limit(limit)
    )
    with store.reading() as db:
        job_ids = [r.id for r in db.execute(due).all()]
    for job_id in job_ids:
        _thin(store, job_id)
    return job_ids


def _thin(store: Store, job_id: str) -> None:
    with store.writing() as db:
        db.execute(delete(_events).where(_events.c.job_id == job_id, _events.c.kind == "progress"))
        train = (
            db.execute(
                select(_points.c.id)
                .where(_points.c.job_id == job_id, _points.c.phase == "train")
                .order_by(_points.c.id)
            )
            .scalars()
            .all()
        )
        if len(train) > MAX_TRAIN_POINTS:
            last = len(train) - 1  # evenly spread, the first and the last included
            keep = {
                train[round(i * last / (MAX_TRAIN_POINTS - 1))] for i in range(MAX_TRAIN_POINTS)
            }
            drop = [i for i in train if i not in keep]
            for start in range(0, len(drop), 500):
                db.execute(delete(_points).where(_points.c.id.in_(drop[start : start + 500])))
        db.execute(update(job_table).where(job_table.c.id == job_id).values(pruned_at=db_clock()))


def delete_job(ctx: Context, job_id: str, *, owner: str) -> None:
    """Delete ``owner``'s finished job: its row, events and metric points, and its directory
    of checkpoints. ``NotFound`` for an unknown id or another key's job; ``Conflict`` while it
    is queued or running (cancel it first), or while it has a registered model (delete the
    model first: ``DELETE /v1/models/{id}``)."""

    with ctx.store.reading() as db:
        row = db.get(Job, job_id)
    if row is None or row.owner != owner:
        raise NotFound(f"job {job_id!r} not found")
    with ctx.store.writing() as db:
        # Conditional on the state checked: a job requeued or given a model meanwhile stays.
        state = locked_job_row(db, job_id, job_table.c.status, job_table.c.model_id)
        if state is None:
            raise NotFound(f"job {job_id!r} not found")
        if state.status not in FINISHED_STATUSES:
            raise Conflict(
                f"job {job_id!r} is {state.status}: cancel it (POST /v1/jobs/{job_id}/cancel) "
                "and delete it once it has ended"
            )
        if state.model_id is not None:
            raise Conflict(
                f"job {job_id!r} has the registered model {state.model_id!r}: delete the model "
                f"first (DELETE /v1/models/{state.model_id})"
            )
        db.execute(delete(_events).where(_events.c.job_id == job_id))
        db.execute(delete(_points).where(_points.c.job_id == job_id))
        db.execute(delete(job_table).where(job_table.c.id == job_id))
    shutil.rmtree(ctx.settings.jobs_dir / job_id, ignore_errors=True)


def check_model_unused(ctx: Context, model_id: str) -> None:
    """``Conflict`` while a streaming session is open on ``model_id`` (in the session store of
    ``KRU_SESSION_STORE``: the job store's table or Redis)."""
    open_sessions = ctx.sessions.count_on_model(model_id)
    if open_sessions:
        raise Conflict(
            f"model {model_id!r} is in use by {open_sessions} streaming session(s): "
            "delete them (DELETE /v1/sessions/{id}) or let them expire"
        )


def delete_model(ctx: Context, model_id: str, *, owner: str) -> None:
    """Delete a model of ``owner``'s job: its row and its checkpoint directory (the job stays,
    with no model). ``NotFound`` for an unknown id or another key's model; ``Conflict`` while a
    streaming session is open on it (:func:`check_model_unused`)."""
    with ctx.store.reading() as db:
        model = db.get(Model, model_id)
        job = db.get(Job, model.job_id) if model is not None else None
    if model is None or job is None or job.owner != owner:
        raise NotFound(f"model {model_id!r} not found")
    check_model_unused(ctx, model_id)
    sessions = StreamSession.__table__
    with ctx.store.writing() as db:
        # the model's sessions in the job store: expired ones, and any opened since the check
        db.execute(delete(sessions).where(sessions.c.model_id == model_id))
        db.execute(update(job_table).where(job_table.c.id == model.job_id).values(model_id=None))
        db.execute(delete(Model.__table__).where(Model.__table__.c.id == model_id))
    # A session created on the model after the check above (its model found in an API's cache)
    # must not outlive it: removed here, or, created later still, by its own creation's check
    # that the model exists (app/sessions.py, create_session). The model is gone already: a
    # store that fails here must not keep its files (such a session answers 404, then expires).
    try:
        opened = ctx.sessions.delete_on_model(model_id)
        if opened:
            logger.info("deleted %d session(s) opened on model %s meanwhile", opened, model_id)
    except Exception as exc:
        logger.warning("deleting the sessions of deleted model %s failed: %s", model_id, exc)
    checkpoint = (ctx.settings.data_dir / model.checkpoint).resolve()
    if checkpoint.is_relative_to(ctx.settings.jobs_dir.resolve()):
        shutil.rmtree(checkpoint, ignore_errors=True)
