"""The consume watchdog: a thread in every worker process that notices a worker which no longer
consumes, and ends the process so that its supervisor starts a fresh one.

A Celery worker can lose its consumer for good after a broker outage: Redis restarted under a
finished job's acknowledgement logs ``Couldn't ack ..., reason:network:ConnectionError`` and the
worker, still alive and connected, never takes a message again (celery/celery issues 8030, 9054
and 10302). Watching the connection does not see it; watching the work does. Every few seconds
the watchdog asks the job store whether a job has been ``queued`` with its message published
for more than ``consume_timeout`` seconds while this worker has been idle for as long. A
consuming worker would have taken it; so the worker logs it and exits with
:data:`EXIT_STALLED`, and ``restart: unless-stopped`` (docker-compose) or ``kru serve``'s
supervisor (:class:`worker.runner.WorkerSupervisor`) starts a new one, whose reaper
re-publishes every queued job at start.

The check runs only while the process is idle (:data:`worker.execution.activity`), and exits
under its lock, so that no delivery starts between the decision and the exit: nothing runs,
nothing needs a checkpoint.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import select

from worker import execution
from worker.db import db_clock
from worker.models import job_table

if TYPE_CHECKING:
    from worker.context import Context

logger = logging.getLogger(__name__)

#: Exit status of a worker the watchdog ends (``EX_TEMPFAIL``: start it again).
EXIT_STALLED = 75


def oldest_waiting(ctx: Context, older_than_s: float) -> tuple[str, float] | None:
    """The queued job whose message was published longest ago, more than ``older_than_s``
    seconds ago, with its wait in seconds; None if there is none. On the database's clock, as
    ``enqueued_at`` is (a worker whose clock is ahead does not see jobs waiting)."""
    query = (
        select(job_table.c.id, job_table.c.enqueued_at, db_clock().label("now"))
        .where(
            job_table.c.status == "queued",
            job_table.c.enqueued_at.is_not(None),
            job_table.c.enqueued_at < db_clock(older_than_s),
            job_table.c.cancel_requested.is_(False),
        )
        .order_by(job_table.c.enqueued_at)
        .limit(1)
    )
    with ctx.store.reading() as db:
        row = db.execute(query).first()
    if row is None:
        return None
    return row.id, (row.now - row.enqueued_at).total_seconds()


def _exit(code: int) -> None:
    logging.shutdown()
    os._exit(code)


class ConsumeWatchdog(threading.Thread):
    """Ends the worker process when it idles while a published job waits (module docstring)."""

    def __init__(
        self,
        ctx: Context,
        *,
        timeout: float | None = None,
        on_stall: Callable[[int], None] = _exit,
    ) -> None:
        super().__init__(name="kru-consume-watchdog", daemon=True)
        self.ctx = ctx
        self.timeout = ctx.settings.consume_timeout if timeout is None else timeout
        self.on_stall = on_stall
        self._stopped = threading.Event()

    def run(self) -> None:
        if self.timeout <= 0:
            return
        interval = min(5.0, max(0.5, self.timeout / 4))
        while not self._stopped.wait(interval):
            try:
                self.check()
            except Exception as exc:  # the store may be down; the next check retries
                logger.warning("consume watchdog: check failed: %s", exc)

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=5)

    def check(self) -> bool:
        """Look once; on a stall, log it and call ``on_stall`` (exit). True if it stalled."""
        activity = execution.activity
        with activity.lock:
            idle_for = time.monotonic() - activity.idle_since
            if activity.busy or idle_for < self.timeout:
                return False
        waiting = oldest_waiting(self.ctx, self.timeout)
        if waiting is None:
            return False
        job_id, waited = waiting
        with activity.lock:
            if activity.busy or time.monotonic() - activity.idle_since < self.timeout:
                return False
            if self._stopped.is_set():
                return False
            logger.critical(
                "consume watchdog: job %s has waited %.0f s in the queue while this worker sat "
                "idle for %.0f s: the worker no longer consumes (KRU_CONSUME_TIMEOUT=%g); "
                "exiting with %d so that it is restarted",
                job_id,
                waited,
                idle_for,
                self.timeout,
                EXIT_STALLED,
            )
            self.on_stall(EXIT_STALLED)
        return True
