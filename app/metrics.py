"""Prometheus metrics of the API: requests and latencies by route template, jobs by status,
prediction latency.

Each app gets its own registry (tests build several apps in one process). Routes are labelled by
their template (``/v1/jobs/{job_id}``), never the raw path, so ids do not explode the label set;
requests that match no route are labelled ``unmatched``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
)  # fmt: skip


class JobsByStatus(Collector):
    """A gauge read from the job store at each scrape: ``kru_jobs{status="running"}``."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the gauge; nothing (and a log line) when the store cannot be read."""
        gauge = GaugeMetricFamily("kru_jobs", "Jobs in the store by status.", labels=["status"])
        try:
            counts = self._counts()
        except Exception:
            logger.warning("cannot count jobs for /metrics", exc_info=True)
            return
        for status, count in sorted(counts.items()):
            gauge.add_metric([status], count)
        yield gauge


class ApiMetrics:
    """The API's metrics and their registry (``generate_latest(metrics.registry)``)."""

    def __init__(self, job_counts: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kru_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kru_http_request_duration_seconds",
            "HTTP request latency (to the end of the response) by method and route template.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predict_latency = Histogram(
            "kru_predict_duration_seconds",
            "Model time of one predict or generate request (validation and forward pass).",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "kru_batch_size",
            "Sequences per forward pass of the predictor's micro-batching, by kind (predict, "
            "session).",
            ["kind"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "kru_batch_queue_wait_seconds",
            "Time a request spent in its model's batch queue before its forward pass, by kind.",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(JobsByStatus(job_counts))


class MetricsMiddleware:
    """Pure ASGI middleware counting requests and timing them by route template.

    Args:
        app: the wrapped ASGI app.
        metrics: where to record.
        templates: full path templates by ``id()`` of the matched route object (the routes of
            included routers keep their router-relative ``path``); others use ``route.path``.
    """

    def __init__(
        self, app: ASGIApp, *, metrics: ApiMetrics, templates: dict[int, str] | None = None
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.templates = templates or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = self.templates.get(id(route)) or getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
