"""The Celery app, configured against the pitfalls of docs/architecture.md ("Job lifecycle").

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only when the
  task returns, so a killed worker's job is not silently dropped by the broker.
* ``worker_prefetch_multiplier=1`` (and ``--concurrency 1``): a worker holds one message, the
  one it runs; a busy worker does not sit on queued jobs.
* ``visibility_timeout`` above the longest job (``max_job_seconds``), set in
  ``broker_transport_options`` and ``result_backend_transport_options``: Redis redelivers an
  unacknowledged message after it, and a shorter one would run a long job twice. (The claim in
  :mod:`worker.jobs` makes such a redelivery a no-op anyway.)
* JSON only, no result backend (the database row is the truth), explicit task name ``kru.train``.
* The task takes only the job id.
* Remote control on Redis (``celery -A worker.celery_app inspect ping`` / ``active``, Flower);
  off on the embedded SQLAlchemy transport, which has no broadcast.

``worker.celery_app:app`` is a module-level app built from :func:`worker.settings.get_settings`
on first access, for Celery's own command line and Flower; kru's processes build theirs with
:func:`create_celery_app` (``worker.context.init``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Celery

from worker.settings import Settings, get_settings
from worker.tasks import TRAIN_TASK, register_tasks

if TYPE_CHECKING:
    from worker.context import Context


def create_celery_app(
    settings: Settings, get_context: Callable[[], Context] | None = None
) -> Celery:
    """A Celery app for ``settings`` (broker URL, queue, visibility timeout); tasks registered.

    Args:
        settings: the process's settings.
        get_context: what ``kru.train`` runs a job with (``worker.context.current``, passed in
            by :func:`worker.context.init`, so that this module does not import it); default:
            none, for an app that only publishes or inspects (``celery -A worker.celery_app
            inspect``, Flower): a job delivered to it fails with a message naming ``kru worker``,
            and stays ``queued`` for a real worker.
    """
    app = Celery("kru", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        # `celery inspect` / Flower; kombu's SQLAlchemy transport has no fanout to carry it.
        worker_enable_remote_control=not settings.is_embedded_broker,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(settings),
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        task_default_queue=settings.queue_name,
        task_routes={TRAIN_TASK: {"queue": settings.queue_name}},
        task_publish_retry_policy={
            "max_retries": 3,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        timezone="UTC",
        enable_utc=True,
    )
    register_tasks(app, get_context or _no_context)
    return app


def _no_context() -> Context:
    raise RuntimeError(
        "this Celery app only publishes and inspects; run jobs with `kru worker` "
        "(it builds the worker's context: database, data dir, heartbeats)"
    )


def _transport_options(settings: Settings) -> dict[str, Any]:
    if settings.is_embedded_broker:
        # kombu passes these to sqlalchemy.create_engine: a busy timeout for the SQLite file
        # shared by the API (publishing) and the workers (polling).
        if settings.broker_url.startswith("sqla+sqlite"):
            return {"connect_args": {"timeout": 30}}
        return {}
    return {"visibility_timeout": settings.visibility_timeout}


def enqueue(app: Celery, job_id: str, *, queue: str) -> None:
    """Publish one ``kru.train`` message for ``job_id`` (after its row is committed)."""
    app.send_task(TRAIN_TASK, args=[job_id], queue=queue)


_app: Celery | None = None
_app_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """``app``: the module-level Celery app for ``celery -A worker.celery_app`` (and Flower),
    built from the ``KRU_*`` settings on first access."""
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _app_lock:
        if _app is None:
            _app = create_celery_app(get_settings())
        return _app
