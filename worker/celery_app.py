"""The Celery app, configured against the pitfalls of design.md section 5.

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
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from worker.settings import Settings

TRAIN_TASK = "kru.train"


def create_celery_app(settings: Settings) -> Celery:
    """A Celery app for ``settings`` (broker URL, queue, visibility timeout); tasks registered."""
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
        worker_enable_remote_control=False,
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
    from worker.tasks import register_tasks

    register_tasks(app)
    return app


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
