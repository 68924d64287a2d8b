"""Server-Sent Events of a job: its stored events, streamed until the job ends.

The stream polls :func:`worker.service.job_events` (the database is the truth; there is no
pub/sub to miss messages). Each stored event goes out as ``id: <n>``, ``event: status`` or
``event: progress`` and ``data: <json>``; the browser's ``Last-Event-ID`` resumes after ``n``.
When the job is finished and every event was sent, a last ``event: end`` carries the final job and
the stream closes. A comment line (``: heartbeat``) goes out when nothing else was sent for a
while, so proxies keep the connection open and a vanished client is noticed. There is no overall
timeout: a job may train for hours; the loop ends with the job or with the client.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.concurrency import run_in_threadpool

from worker import service
from worker.views import FINISHED_STATUSES, EventView

_PAGE = 500


@dataclass(frozen=True)
class StreamTiming:
    """How often the stream polls the store and sends heartbeats (seconds)."""

    poll_interval: float = 0.5
    heartbeat_interval: float = 15.0
    retry_ms: int = 2000


def format_event(*, event: str, data: Any, event_id: int | None = None) -> bytes:
    """One SSE message; ``data`` is sent as a single line of JSON."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"event: {event}")
    lines.append(f"data: {json.dumps(data, separators=(',', ':'), default=str)}")
    return ("\n".join(lines) + "\n\n").encode()


def _stored_event(event: EventView) -> bytes:
    time_utc = event.time.isoformat().replace("+00:00", "Z")  # as in the job JSON
    data = {"job_id": event.job_id, "time": time_utc, **event.data}
    return format_event(event=event.kind, data=data, event_id=event.id)


async def job_event_stream(
    job_id: str,
    *,
    after: int,
    is_disconnected: Callable[[], Awaitable[bool]],
    job_json: Callable[[str], Awaitable[dict[str, Any]]],
    timing: StreamTiming,
) -> AsyncIterator[bytes]:
    """Yield the SSE byte stream of ``job_id`` from event id ``after`` on.

    Args:
        job_id: an existing job (the route checked it).
        after: resume after this event id (``Last-Event-ID``; 0: from the start).
        is_disconnected: true once the client went away.
        job_json: the job as the API shows it (for the last ``end`` event).
        timing: poll and heartbeat intervals.
    """
    yield f"retry: {timing.retry_ms}\n\n".encode()
    last_sent = time.monotonic()
    while True:
        # Read the status before the events: every event of a finished job was written before
        # (or with) its final status, so an empty read after a finished status means the end.
        job = await run_in_threadpool(service.get_job, job_id)
        events = await run_in_threadpool(
            lambda after=after: service.job_events(job_id, after=after, limit=_PAGE)
        )
        for event in events:
            yield _stored_event(event)
            after = event.id
            last_sent = time.monotonic()
        if len(events) == _PAGE:
            continue  # a full page: more are waiting
        if job.status in FINISHED_STATUSES:
            yield format_event(event="end", data=await job_json(job_id))
            return
        if time.monotonic() - last_sent >= timing.heartbeat_interval:
            yield b": heartbeat\n\n"
            last_sent = time.monotonic()
        if await is_disconnected():
            return
        await anyio.sleep(timing.poll_interval)
