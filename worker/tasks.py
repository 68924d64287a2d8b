"""The Celery task: ``kru.train(job_id)``. Thin: everything is in :mod:`worker.execution`."""

from __future__ import annotations

import logging
import re
import time

from celery import Celery
from celery.exceptions import Reject

from worker import context, execution

logger = logging.getLogger(__name__)

_JOB_ID = re.compile(r"[0-9a-f]{32}")
RETRY_PAUSE_S = 5.0


def register_tasks(app: Celery) -> None:
    """Register ``kru.train`` on ``app`` (late ack, reject on worker lost, no result)."""
    from worker.celery_app import TRAIN_TASK

    @app.task(
        name=TRAIN_TASK,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        shared=False,
    )
    def train(job_id: str) -> None:
        """Claim the job and train it; a job another live worker holds is left alone."""
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            logger.error("kru.train: ignoring a message with a malformed job id %r", job_id)
            return
        try:
            execution.run_job(context.current(), job_id)
        except execution.StoreUnavailable as exc:
            # Acknowledging would lose the job's only message; give it back to the broker, after
            # a pause so that an outage is not a busy loop.
            logger.error("%s; returning the message to the queue", exc)
            time.sleep(RETRY_PAUSE_S)
            raise Reject(str(exc), requeue=True) from exc
