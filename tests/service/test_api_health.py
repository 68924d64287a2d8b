"""``/healthz``, ``/readyz`` and ``/metrics``."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from worker.settings import Settings


def test_ready_and_metrics_on_the_embedded_default(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(data_dir=tmp_path / "kru", reaper_interval=0))) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}

        c.post("/v1/jobs", json={"train": {"steps": 5}})
        c.get("/v1/jobs/0123456789abcdef0123456789abcdef")
        c.get("/no/such/path")
        text = c.get("/metrics").text
        assert 'kru_jobs{status="queued"} 1.0' in text
        assert 'kru_jobs{status="running"} 0.0' in text
        assert 'kru_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in text
        assert (
            'kru_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0'
            in text
        )
        assert 'kru_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
        assert 'kru_http_request_duration_seconds_count{method="POST",route="/v1/jobs"} 1.0' in text


def test_not_ready_without_a_broker(tmp_path: Path) -> None:
    """Nothing listens on port 1: the broker check fails, the database one passes."""
    settings = Settings(
        data_dir=tmp_path / "kru", broker_url="redis://127.0.0.1:1/0", reaper_interval=0
    )
    with TestClient(create_app(settings)) as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503
        body = ready.json()
        assert body["status"] == "not ready" and body["detail"] == "not ready: broker"
        assert body["checks"]["database"] == "ok"
        assert body["checks"]["broker"].startswith("broker unreachable")
