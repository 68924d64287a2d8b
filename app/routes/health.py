"""``/healthz``, ``/readyz`` and ``/metrics``: open (no API key), outside ``/v1``."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from app.deps import MetricsDep
from worker import service
from worker.errors import Unavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}
                }
            }
        },
        503: {"description": "The database or the broker cannot be reached"},
    },
)
async def readyz() -> JSONResponse:
    """Readiness: the database and the broker answer (503 otherwise)."""
    checks: dict[str, str] = {}
    for name, check in (("database", service.check_database), ("broker", service.check_broker)):
        try:
            await run_in_threadpool(check)
            checks[name] = "ok"
        except Unavailable as exc:
            checks[name] = exc.detail
    ready = all(value == "ok" for value in checks.values())
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    if not ready:
        body["detail"] = "not ready: " + ", ".join(k for k, v in checks.items() if v != "ok")
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
def metrics(api_metrics: MetricsDep) -> Response:
    """Prometheus metrics: requests, latencies, jobs by status, prediction latency."""
    return Response(generate_latest(api_metrics.registry), media_type=CONTENT_TYPE_LATEST)
