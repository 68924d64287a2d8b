"""Quotas per API key, and fair publishing of jobs across keys.

Every job and dataset has an ``owner``: the name of the API key that created it
(:mod:`app.auth`; ``anonymous`` while the API is open). Per key (defaults from the settings,
overridden per key by ``KRU_KEY_QUOTAS``):

* ``max_active_jobs`` (``KRU_MAX_ACTIVE_JOBS_PER_KEY``): queued + running jobs;
* ``max_worker_seconds`` (``KRU_MAX_WORKER_SECONDS_PER_KEY``): worker time of its jobs over the
  last 24 hours (a running job counts up to now);
* ``max_dataset_bytes`` (``KRU_MAX_DATASET_BYTES_PER_KEY``): stored dataset bytes;

over one, a submit or upload is an :class:`~worker.errors.OverQuota` (429) naming the limit,
with ``Retry-After`` when it frees by itself.

**Fair publishing.** A key has at most ``max_published_jobs`` (``KRU_MAX_PUBLISHED_JOBS_PER_KEY``)
jobs waiting in the broker; its other queued jobs wait in the store, unpublished, and
:func:`publish_fair` publishes them as the key's published ones start (the worker calls it after
each claim), round-robin across keys in the reaper. The broker's queue is first in, first out,
so one key's 30 submitted jobs put at most ``max_published_jobs`` ahead of another key's job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from worker import jobs as job_store
from worker.errors import OverQuota
from worker.models import Dataset, job_table, utcnow
from worker.settings import KEY_QUOTA_FIELDS, Settings

if TYPE_CHECKING:
    from worker.context import Context

#: The window of ``max_worker_seconds``.
WINDOW = timedelta(hours=24)
#: ``Retry-After`` of a full ``max_active_jobs``: when one of the key's jobs may have ended.
ACTIVE_RETRY_S = 30.0
ACTIVE_STATUSES = ("queued", "running")


@dataclass(frozen=True)
class Quota:
    """One key's limits (see the module docstring)."""

    max_active_jobs: int
    max_worker_seconds: float
    max_dataset_bytes: int
    max_published_jobs: int


def quota_for(settings: Settings, owner: str) -> Quota:
    """``owner``'s quota: the ``KRU_*_PER_KEY`` defaults, overridden by ``KRU_KEY_QUOTAS``."""
    values = {name: getattr(settings, setting) for name, setting in KEY_QUOTA_FIELDS.items()}
    values.update(settings.key_quotas.get(owner, {}))
    return Quota(
        max_active_jobs=int(values["max_active_jobs"]),
        max_worker_seconds=float(values["max_worker_seconds"]),
        max_dataset_bytes=int(values["max_dataset_bytes"]),
        max_published_jobs=int(values["max_published_jobs"]),
    )


def _env(name: str) -> str:
    return "KRU_" + KEY_QUOTA_FIELDS[name].upper()


def check_submit(ctx: Context, owner: str, *, seconds: float = 0.0) -> None:
    """Refuse (``OverQuota``) a new job of ``owner`` over its active-jobs or worker-time quota;
    ``seconds``: the job's estimated worker time (:mod:`worker.admission`), which must fit in
    what is left of the quota."""
    quota = quota_for(ctx.settings, owner)
    with ctx.store.reading() as db:
        active = db.scalar(
            select(func.count())
            .select_from(job_table)
            .where(job_table.c.owner == owner, job_table.c.status.in_(ACTIVE_STATUSES))
        )
    if (active or 0) >= quota.max_active_jobs:
        raise OverQuota(
            "max_active_jobs_per_key",
            f"key {owner!r} has {active} queued or running jobs, its limit "
            f"({_env('max_active_jobs')}={quota.max_active_jobs}); it frees when one of them "
            "ends",
            retry_after=ACTIVE_RETRY_S,
        )
    if seconds > quota.max_worker_seconds:
        raise OverQuota(
            "max_worker_seconds_per_key",
            f"this job alone needs about {seconds:.0f} worker-seconds, more than key "
            f"{owner!r} may use in 24 h ({_env('max_worker_seconds')}="
            f"{quota.max_worker_seconds:g}): ask for fewer train.steps",
        )
    room = quota.max_worker_seconds - seconds
    used, frees_in = worker_seconds(ctx, owner, room)
    if used >= room:
        needs = f" and this job needs about {seconds:.0f}" if seconds >= 1 else ""
        raise OverQuota(
            "max_worker_seconds_per_key",
            f"key {owner!r} used {used:.0f} worker-seconds in the last 24 h{needs}, its limit "
            f"({_env('max_worker_seconds')}={quota.max_worker_seconds:g}); it frees in about "
            f"{math.ceil(frees_in)} s",
            retry_after=frees_in,
        )


def worker_seconds(
    ctx: Context, owner: str, limit: float, *, now: datetime | None = None
) -> tuple[float, float]:
    """``(used, frees_in)``: ``owner``'s worker-seconds over the last 24 h, and the seconds
    until that drops below ``limit`` (running jobs counted as they are now)."""
    now = now or utcnow()
    start = now - WINDOW
    query = select(job_table.c.started_at, job_table.c.finished_at).where(
        job_table.c.owner == owner,
        job_table.c.started_at.is_not(None),
        (job_table.c.finished_at.is_(None)) | (job_table.c.finished_at > start),
    )
    with ctx.store.reading() as db:
        rows = db.execute(query).all()
    spans = [(r.started_at, r.finished_at or now) for r in rows]

    def used_at(later: float) -> float:
        begin = start + timedelta(seconds=later)
        return sum(max(0.0, (end - max(s, begin)).total_seconds()) for s, end in spans)

    used = used_at(0.0)
    if used < limit:
        return used, 0.0
    low, high = 0.0, WINDOW.total_seconds()
    for _ in range(40):  # bisect: used_at only decreases as the window slides
        mid = (low + high) / 2
        low, high = (mid, high) if used_at(mid) >= limit else (low, mid)
    return used, high


def check_upload(ctx: Context, owner: str, size: int) -> None:
    """Refuse (``OverQuota``, no ``Retry-After``) an upload of ``size`` bytes that would take
    ``owner`` over its dataset storage."""
    quota = quota_for(ctx.settings, owner)
    with ctx.store.reading() as db:
        used = db.scalar(
            select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.owner == owner)
        )
    if int(used or 0) + size > quota.max_dataset_bytes:
        raise OverQuota(
            "max_dataset_bytes_per_key",
            f"key {owner!r} stores {used} bytes of datasets; {size} more would pass its limit "
            f"({_env('max_dataset_bytes')}={quota.max_dataset_bytes}); delete one "
            "(DELETE /v1/datasets/{id}) to make room",
        )


def publish_fair(
    ctx: Context, owner: str | None = None, *, created_before: datetime | None = None
) -> list[str]:
    """Publish held jobs (``queued``, never published) while their key has fewer than
    ``max_published_jobs`` waiting in the broker: ``owner``'s only, or every key's taking one
    job of each key in turn. ``created_before``: only jobs created earlier (the reaper's grace
    for jobs the API is publishing). Returns the ids published; stops when the broker fails."""
    held = select(job_table.c.id, job_table.c.owner).where(
        job_table.c.status == "queued",
        job_table.c.enqueued_at.is_(None),
        job_table.c.cancel_requested.is_(False),
    )
    if owner is not None:
        held = held.where(job_table.c.owner == owner)
    if created_before is not None:
        held = held.where(job_table.c.created_at < created_before)
    waiting = (
        select(job_table.c.owner, func.count())
        .where(
            job_table.c.status == "queued",
            job_table.c.enqueued_at.is_not(None),
            job_table.c.cancel_requested.is_(False),
        )
        .group_by(job_table.c.owner)
    )
    with ctx.store.reading() as db:
        rows = db.execute(held.order_by(job_table.c.created_at, job_table.c.id)).all()
        counts = dict(db.execute(waiting).all())
    lines: dict[str, list[str]] = {}
    for row in rows:
        lines.setdefault(row.owner, []).append(row.id)
    room = {o: quota_for(ctx.settings, o).max_published_jobs - int(counts.get(o, 0)) for o in lines}
    published: list[str] = []
    while True:  # round-robin: one job of each key with room per round
        progressed = False
        for key, ids in lines.items():
            if not ids or room[key] <= 0:
                continue
            job_id = ids.pop(0)
            if not ctx.enqueue(job_id):
                return published
            job_store.mark_enqueued(ctx.store, job_id)
            room[key] -= 1
            published.append(job_id)
            progressed = True
        if not progressed:
            return published


def publish_next(ctx: Context, job_id: str) -> list[str]:
    """After ``job_id`` started or ended: publish its key's next held jobs."""
    with ctx.store.reading() as db:
        owner = db.scalar(select(job_table.c.owner).where(job_table.c.id == job_id))
    return [] if owner is None else publish_fair(ctx, owner)
