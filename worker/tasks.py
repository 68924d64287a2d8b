"""The Celery task: ``kru.train(job_id)``. Thin: everything is in :mod:`worker.execution`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from celery import Celery
from celery.exceptions import Reject

from worker import execution
from worker.ids import is_id

if TYPE_CHECKING:
    from worker.context import Context

logger = logging.getLogger(__name__)

RETRY_PAUSE_S = 5.0
#: The one task's name: its messages carry only the job id.
TRAIN_TASK = "kru.train"


def register_tasks(app: Celery, get_context: Callable[[], Context]) -> None:
    """Register ``kru.train`` on ``app`` (late ack, reject on worker lost, no result); each
    delivery runs with ``get_context()`` (the worker process's :class:`~worker.context.Context`)."""

    @app.task(
        name=TRAIN_TASK,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        shared=False,
    )
    def train(job_id: str) -> None:
        """Claim the job and train it; a job another live worker holds is left alone."""
        if not is_id(job_id):
            logger.error("kru.train: ignoring a message with a malformed job id %r", job_id)
            return
        try:
            execution.run_job(get_context(), job_id)
        except execution.StoreUnavailable as exc:
            # Acknowledging would lose the job's only message; give it back to the broker, after
            # a pause so that an outage is not a busy loop.
            logger.error("%s; returning the message to the queue", exc)
            time.sleep(RETRY_PAUSE_S)
            raise Reject(str(exc), requeue=True) from exc
