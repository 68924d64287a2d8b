"""The plain functions the HTTP app calls; the API maps their errors to statuses in one place.

Call :func:`init` once per process (the API's lifespan) before anything else; it opens the job
store (creating tables), and the Celery app used to enqueue jobs. Every function is synchronous
and thread-safe (FastAPI may call them from its thread pool).

Errors: :class:`~worker.errors.NotFound` (404), :class:`~worker.errors.Conflict` (409),
:class:`~worker.errors.Invalid` (422, with ``field``), :class:`~worker.errors.Unavailable` (503).
"""

from __future__ import annotations

from kru_core.config import JobConfig
from worker.settings import Settings
from worker.views import DatasetView, EventView, JobView, ModelView, Page


def init(settings: Settings | None = None) -> None:
    """Open the store and the broker connection for this process (default: ``get_settings()``).

    Idempotent; calling it again with other settings closes the previous ones (tests).
    """
    raise NotImplementedError


def shutdown() -> None:
    """Close the store's connections and the broker connection pool."""
    raise NotImplementedError


def settings() -> Settings:
    """The settings :func:`init` was called with."""
    raise NotImplementedError


# --- jobs -------------------------------------------------------------------------------------


def submit_job(config: JobConfig, *, name: str | None = None) -> JobView:
    """Store a new ``queued`` job, commit, then enqueue it; return it (the API answers 202).

    ``name`` overrides ``config.name``. Raises ``Invalid`` for ``train.steps`` above
    ``max_steps_per_job`` (field ``train.steps``) and for an unknown ``task.dataset_id`` or one of
    the wrong kind (``jsonl`` for task ``dataset``, ``text`` for task ``text``; field
    ``task.dataset_id``). When the broker is down the job stays ``queued`` and is enqueued by the
    reaper once the broker is back.
    """
    raise NotImplementedError


def get_job(job_id: str) -> JobView:
    """The job; ``NotFound`` for an unknown id."""
    raise NotImplementedError


def list_jobs(*, status: str | None = None, limit: int = 50, offset: int = 0) -> Page[JobView]:
    """Jobs newest first, optionally only those with ``status``.

    ``Invalid`` (field ``status``, ``limit`` or ``offset``) for an unknown status, a limit outside
    1..500 or a negative offset.
    """
    raise NotImplementedError


def cancel_job(job_id: str) -> JobView:
    """Cooperative cancel.

    A ``queued`` job is ``cancelled`` at once; a ``running`` one gets ``cancel_requested`` and its
    worker stops within about ``heartbeat_interval`` seconds, saves a checkpoint and ends it
    ``cancelled``. Cancelling a job that already has a cancel pending returns it unchanged.
    ``NotFound`` for an unknown id; ``Conflict`` for a finished job.
    """
    raise NotImplementedError


def job_metrics(job_id: str) -> list[dict[str, object]]:
    """The metric history, oldest first: ``{"step", "time", "attempt", "phase", <metric>: value}``.

    ``time`` is an ISO 8601 UTC string, ``attempt`` the attempt that recorded the point (after a
    crash the next attempt's points start at the resumed checkpoint's step, not 0), ``phase``
    ``"train"`` (throttled training loss) or ``"eval"`` (every evaluation). ``NotFound`` for an
    unknown id.
    """
    raise NotImplementedError


def job_events(job_id: str, *, after: int = 0, limit: int = 1000) -> list[EventView]:
    """The job's events with ``id > after``, oldest first (for SSE; ``after`` = Last-Event-ID).

    The stream should end once the job's status is finished and no events are left.
    ``NotFound`` for an unknown id.
    """
    raise NotImplementedError


def job_counts_by_status() -> dict[str, int]:
    """``{status: count}`` for every status (zeros included), for Prometheus."""
    raise NotImplementedError


# --- datasets ---------------------------------------------------------------------------------


def create_dataset(filename: str, content: bytes, *, kind: str | None = None) -> DatasetView:
    """Validate and store an uploaded dataset under a new id; return it.

    ``kind`` is ``"jsonl"`` or ``"text"``; ``None`` infers it from the file name (``.jsonl`` and
    ``.json``: JSONL, anything else: text). ``filename`` is only displayed, never used as a path.
    Raises ``Invalid``: field ``file`` for an empty or oversized file, non-UTF-8 bytes, or bad
    JSONL lines (``errors`` holds every ``(line_number, message)``, ``detail`` names the first
    lines); field ``kind`` for an unknown kind. Nothing is stored when it raises.
    """
    raise NotImplementedError


def list_datasets(*, limit: int = 50, offset: int = 0) -> Page[DatasetView]:
    """Datasets newest first."""
    raise NotImplementedError


def get_dataset(dataset_id: str) -> DatasetView:
    """The dataset; ``NotFound`` for an unknown id."""
    raise NotImplementedError


# --- models -----------------------------------------------------------------------------------


def list_models(*, limit: int = 50, offset: int = 0) -> Page[ModelView]:
    """Registered models newest first."""
    raise NotImplementedError


def get_model(model_id: str) -> ModelView:
    """The model (``checkpoint`` is the directory to load for predictions); ``NotFound``."""
    raise NotImplementedError


# --- health -----------------------------------------------------------------------------------


def check_database() -> None:
    """Raise ``Unavailable`` unless the job store answers a query (within a few seconds)."""
    raise NotImplementedError


def check_broker() -> None:
    """Raise ``Unavailable`` unless the broker accepts a connection (within a few seconds)."""
    raise NotImplementedError
