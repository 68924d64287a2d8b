"""``/v1/jobs``: submit, list, inspect, follow (SSE), cancel and delete training jobs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, Security
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.auth import bearer_scheme
from app.deps import JobId, KeyName
from app.errors import ErrorRoute
from app.events import job_event_stream
from app.schemas import Job, JobList, JobQuery, JobSpec, MetricPoint, error_responses
from worker import service

#: One Server-Sent Event of a job's stream, as sent (docs/api.md, "Job events").
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["status", "progress", "end"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "JSON: a status or progress event of the job, or (end) the job",
        },
        "id": {"type": "string", "pattern": "^[0-9]+$", "description": "for Last-Event-ID"},
        "retry": {"type": "integer", "description": "the reconnection delay (ms), first event"},
    },
    "example": {
        "event": "progress",
        "id": "7",
        "data": '{"job_id":"8a1f","step":100,"total_steps":500,"fraction":0.2}',
    },
}

router = APIRouter(
    route_class=ErrorRoute,
    prefix="/jobs",
    tags=["jobs"],
    dependencies=[Security(bearer_scheme)],
    responses=error_responses(401, 403),
)


def job_json(job_id: str) -> dict[str, Any]:
    """The job as the API shows it, as JSON data."""
    return Job.model_validate(service.get_job(job_id)).model_dump(mode="json")


@router.post("", status_code=202, response_model=Job, responses=error_responses(413, 422, 429))
def submit_job(spec: JobSpec, key: KeyName) -> Job:
    """Submit a training job; it is queued and runs on the next free worker (jobs of
    different API keys take turns; 429 over the key's quota, docs/deploy.md)."""
    view = service.submit_job(spec.to_job_config(), name=spec.name, owner=key)
    return Job.model_validate(view)


@router.get("", response_model=JobList, responses=error_responses(422))
def list_jobs(query: Annotated[JobQuery, Query()]) -> JobList:
    """List jobs, newest first, optionally only those with one status."""
    page = service.list_jobs(status=query.status, limit=query.limit, offset=query.offset)
    return JobList.model_validate(page)


@router.get("/{job_id}", response_model=Job, responses=error_responses(404))
def get_job(job_id: JobId) -> Job:
    """Get a job: status, config, attempts, times, progress, model id or error."""
    return Job.model_validate(service.get_job(job_id))


@router.get("/{job_id}/metrics", response_model=list[MetricPoint], responses=error_responses(404))
def get_job_metrics(job_id: JobId) -> list[dict[str, object]]:
    """Get a job's metric history, oldest first."""
    return service.job_metrics(job_id)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            # Before OpenAPI 3.2 (itemSchema), an event stream's schema describes each event.
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
            "description": "Server-Sent Events: `status` and `progress` events (JSON data, "
            "with ids for Last-Event-ID), `: heartbeat` comments, and a last `end` event with "
            "the finished job",
        },
        **error_responses(404, 422),
    },
)
async def job_events(
    job_id: JobId,
    request: Request,
    last_event_id: Annotated[
        int,
        Header(alias="Last-Event-ID", ge=0, le=2**53 - 1, description="resume after this event"),
    ] = 0,
) -> StreamingResponse:
    """Follow a job: stream its progress and status events until it ends (SSE)."""
    await run_in_threadpool(service.get_job, job_id)  # 404 before the stream starts

    async def as_json(job_id: str) -> dict[str, Any]:
        return await run_in_threadpool(job_json, job_id)

    stream = job_event_stream(
        job_id,
        after=last_event_id,
        is_disconnected=request.is_disconnected,
        job_json=as_json,
        timing=request.app.state.sse_timing,
    )
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/{job_id}/cancel", response_model=Job, responses=error_responses(404, 409))
def cancel_job(job_id: JobId, key: KeyName) -> Job:
    """Cancel one of the key's jobs: a queued one at once, a running one at its next step
    (checkpoint kept); another key's job is a ``404``."""
    return Job.model_validate(service.cancel_job(job_id, owner=key))


@router.delete("/{job_id}", status_code=204, responses=error_responses(404, 409))
def delete_job(job_id: JobId, key: KeyName) -> Response:
    """Delete one of the key's finished jobs with its events, metric history and checkpoint
    files (``409`` while it is queued or running, or while its model is registered: delete the
    model first); another key's job is a ``404``."""
    service.delete_job(job_id, owner=key)
    return Response(status_code=204)
