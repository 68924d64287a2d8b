"""The FastAPI app: ``create_app(settings)`` wires routers, auth, limits, metrics and errors.

Run it with ``kru api`` (or ``uvicorn --factory app.main:create_app``); settings come from
``KRU_*`` variables unless given.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app.auth import ApiKeyMiddleware
from app.errors import install_error_handlers
from app.events import StreamTiming
from app.limits import BodyLimitMiddleware
from app.logs import install_access_log_filter
from app.metrics import ApiMetrics, MetricsMiddleware
from app.predictor import Predictor, ServingLimits
from app.predictor import install_error_handlers as install_predictor_errors
from app.routes import datasets, health, jobs, models, sessions, workers
from app.ui import install_ui
from worker import service
from worker.settings import Settings, get_settings

logger = logging.getLogger(__name__)

API_PREFIX = "/v1"
# Multipart framing (boundaries, part headers) around an upload of max_upload_bytes.
_MULTIPART_OVERHEAD = 64 * 1024

DESCRIPTION = """
Train and serve Kronecker Recurrent Units (Jose, Cissé and Fleuret, ICML 2018).

Submit a training job (`POST /v1/jobs`), follow it (`GET /v1/jobs/{id}`, or the Server-Sent
Events of `GET /v1/jobs/{id}/events`), then predict with its model
(`POST /v1/models/{model_id}/predict`).

Errors are JSON: a stable `detail`, and for invalid input the offending `field`. With
`KRU_API_KEYS` set, every `/v1` route needs `Authorization: Bearer <key>`.
"""


def request_limit(settings: Settings) -> Callable[[str, str], int]:
    """The body limit of a request from its method and path: uploads get ``max_upload_bytes``."""
    upload_limit = settings.max_upload_bytes + _MULTIPART_OVERHEAD
    uploads = f"{API_PREFIX}/datasets"

    def limit_for(method: str, path: str) -> int:
        if method == "POST" and path.rstrip("/") == uploads:
            return upload_limit
        return settings.max_request_bytes

    return limit_for


def serving_limits(settings: Settings) -> ServingLimits:
    """The predictor's limits and batching from the ``KRU_*`` settings."""
    return ServingLimits(
        max_sequences=settings.max_sequences_per_request,
        max_sequence_length=settings.max_sequence_length,
        max_cost=settings.max_request_cost,
        batch_max_size=settings.batch_max_size,
        batch_max_delay=settings.batch_max_delay_ms / 1000,
        queue_size=settings.batch_queue_size,
        timeout=settings.predict_timeout,
        inline_forward=settings.inline_forward_ms / 1000,
    )


def create_app(
    settings: Settings | None = None, *, sse_timing: StreamTiming | None = None
) -> FastAPI:
    """Build the app.

    Args:
        settings: default :func:`worker.settings.get_settings` (the ``KRU_*`` variables).
        sse_timing: poll and heartbeat intervals of the job event streams.
    """
    settings = settings or get_settings()
    install_access_log_filter()  # no query string (a key sent by mistake) in the access log

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(service.init, settings)
        if not settings.api_keys:
            logger.warning("KRU_API_KEYS is empty: the API is open to anyone who can reach it")
        logger.info("kru API ready (database %s)", _redact(settings.database_url))
        # What is loaded by now (modules, torch, the app) lives as long as the process: out of
        # the cyclic collector's full passes, which took 150 ms each under load and held up
        # every request in flight (docs/benchmarks.md, "Serving").
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            app.state.predictor.close()
            await run_in_threadpool(service.shutdown)

    app = FastAPI(
        title="kru",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served from the package by install_ui (FastAPI's load from a CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.sse_timing = sse_timing or StreamTiming()
    app.state.metrics = metrics = ApiMetrics(service.job_counts_by_status)
    app.state.predictor = Predictor(
        lambda model_id: service.get_model(model_id).checkpoint,
        cache_size=settings.model_cache_size,
        limits=serving_limits(settings),
        observe_batch=lambda kind, size: metrics.batch_size.labels(kind).observe(size),
        observe_wait=lambda kind, seconds: metrics.queue_wait.labels(kind).observe(seconds),
    )

    # Route templates for metrics labels: the routes keep their router-relative paths.
    # Matched in this order: the serving routes first (a request is tried against every route
    # before its own).
    templates: dict[int, str] = {}
    for router, prefix in (
        (models.router, API_PREFIX),
        (sessions.router, API_PREFIX),
        (jobs.router, API_PREFIX),
        (datasets.router, API_PREFIX),
        (workers.router, API_PREFIX),
        (health.router, ""),
    ):
        app.include_router(router, prefix=prefix)
        templates.update({id(route): prefix + route.path for route in router.routes})

    install_ui(app)
    install_error_handlers(app)
    install_predictor_errors(app)
    # Added last = outermost. Metrics see every answer; auth refuses before a byte of the body
    # is read; the size limit runs before anything parses it.
    app.add_middleware(BodyLimitMiddleware, limit_for=request_limit(settings))
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys, protected_prefix=API_PREFIX)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, templates=templates)
    return app


def _redact(url: str) -> str:
    """``url`` without its password."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
