"""The reaper: a thread in every worker process that settles jobs whose worker died.

Every ``reaper_interval`` seconds it

* requeues ``running`` jobs whose heartbeat is older than ``heartbeat_timeout`` (their worker was
  killed, ran out of memory, or lost its node) and enqueues them again; a job out of
  ``max_attempts`` ends ``failed``, one with a pending cancel ends ``cancelled``;
* publishes ``queued`` jobs whose message was never published (the broker was down at submit,
  or their key had ``max_published_jobs`` waiting: :func:`worker.quotas.publish_fair`, one job of
  each key in turn).

At start it also re-enqueues every published ``queued`` job, since a broker restart (Redis
without its
append-only file) or a lost connection may have dropped their messages. Duplicates are harmless:
the claim in :func:`worker.jobs.claim` lets only one delivery run a job. Several workers may run
reapers at once; each settles a job with one conditional ``UPDATE``.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from worker import jobs, quotas, retention
from worker.context import Context
from worker.db import db_clock

logger = logging.getLogger(__name__)

#: A submitted job's message is retried by the reaper only after this long (the API sends it).
UNSENT_GRACE = timedelta(seconds=10)


class Reaper(threading.Thread):
    """The reaper thread of a worker process; :meth:`stop` ends it."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(name="kru-reaper", daemon=True)
        self.ctx = ctx
        self._stopped = threading.Event()

    def run(self) -> None:
        try:
            self.recover()
        except Exception:
            logger.exception("reaper: recovery at start failed")
        interval = self.ctx.settings.reaper_interval
        if interval <= 0:
            return
        while not self._stopped.wait(interval):
            try:
                self.sweep()
            except Exception:
                logger.exception("reaper: sweep failed")

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=10)

    def recover(self) -> None:
        """Re-enqueue every published queued job, then sweep."""
        queued = jobs.queued(self.ctx.store, published_only=True)
        if queued:
            logger.info("reaper: re-enqueuing %d queued job(s)", len(queued))
        self._enqueue(queued)
        self.sweep()

    def sweep(self) -> None:
        """Settle lost jobs, and publish unsent ones fairly across keys (requeued jobs are
        unsent again): :func:`worker.quotas.publish_fair`."""
        settings = self.ctx.settings
        requeued = jobs.reap(
            self.ctx.store,
            stale_before=jobs.stale_cutoff(settings.heartbeat_timeout),
            max_attempts=settings.max_attempts,
        )
        if requeued:
            logger.info("reaper: %d job(s) requeued", len(requeued))
        thinned = retention.thin_finished(
            self.ctx.store, retention_days=settings.event_retention_days
        )
        if thinned:
            logger.info(
                "reaper: thinned the events and metrics of %d finished job(s)", len(thinned)
            )
        if not self._stopped.is_set():
            # created_at is the API's clock; the database's is the closest one to it.
            grace = db_clock(UNSENT_GRACE.total_seconds())
            quotas.publish_fair(self.ctx, created_before=grace)

    def _enqueue(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            if self._stopped.is_set() or not self.ctx.enqueue(job_id):
                return
            jobs.mark_enqueued(self.ctx.store, job_id)
