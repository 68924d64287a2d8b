"""Server-Sent Events over real HTTP: ``GET /v1/jobs/{id}/events`` streams a job's progress and
status until it ends, resumes after ``Last-Event-ID``, sends heartbeats, and stops for a client
that went away."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from api_server import Event, running_api, sse_events
from fastapi.testclient import TestClient

from app.main import create_app

if TYPE_CHECKING:
    from conftest import ServiceEnv

JOB = {
    "task": {"kind": "copy", "delay": 5, "eval_size": 32},
    "model": {"cell": "kru", "hidden_size": 16},
    "train": {"steps": 150, "batch_size": 16, "eval_every": 50, "checkpoint_every": 50},
}


def collect(client: httpx.Client, job_id: str, **headers: str) -> list[Event]:
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        return list(sse_events(response))  # returns only when the server ends the stream


@pytest.mark.slow
def test_stream_follows_a_job_until_it_ends(
    sqlite_env: ServiceEnv, worker_process: Callable[..., Any], tmp_path: Path
) -> None:
    worker_process(sqlite_env)
    with running_api(sqlite_env.settings, tmp_path / "api.log") as api, api.client() as client:
        job = client.post("/v1/jobs", json=JOB).json()
        events = [e for e in collect(client, job["id"]) if e.comment is None]

        statuses = [e.data["status"] for e in events if e.event == "status"]
        assert statuses == ["queued", "running", "succeeded"]
        progress = [e.data for e in events if e.event == "progress"]
        steps = [p["step"] for p in progress]
        assert len(set(steps)) >= 3 and steps == sorted(steps), steps
        assert steps[-1] == 150 and progress[-1]["total_steps"] == 150
        assert all(p["job_id"] == job["id"] for p in progress)
        ids = [e.id for e in events if e.id is not None]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)

        end = events[-1]
        assert end.event == "end" and end.id is None
        assert end.data["status"] == "succeeded" and end.data["model_id"]
        assert events[-2].event == "status" and events[-2].data["status"] == "succeeded"

        # Reconnecting with Last-Event-ID replays only what came after it, then ends at once.
        middle = ids[len(ids) // 2]
        started = time.monotonic()
        resumed = [e for e in collect(client, job["id"], **{"Last-Event-ID": str(middle)})]
        assert time.monotonic() - started < 5
        assert [e.id for e in resumed if e.id is not None] == [i for i in ids if i > middle]
        assert resumed[-1].event == "end"


def test_heartbeats_and_a_vanished_client(sqlite_env: ServiceEnv, tmp_path: Path) -> None:
    """No worker: the job stays queued and its stream would run forever; heartbeats keep it
    alive, and closing the connection ends it on the server (its request is then counted)."""
    settings = sqlite_env.settings
    with (
        running_api(settings, tmp_path / "api.log", factory="api_server:fast_sse_app") as api,
        api.client() as client,
    ):
        job = client.post("/v1/jobs", json=JOB).json()
        seen: list[Event] = []
        with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
            for event in sse_events(response):
                seen.append(event)
                if sum(e.comment == "heartbeat" for e in seen) == 2:
                    break  # leave: the context manager closes the connection
        assert seen[0].event == "status" and seen[0].data["status"] == "queued"

        def stream_ended_on_server() -> bool:
            counted = 'method="GET",route="/v1/jobs/{job_id}/events",status="200"} 1.0'
            return counted in client.get("/metrics").text

        deadline = time.monotonic() + 10
        while not stream_ended_on_server():
            assert time.monotonic() < deadline, "the server kept streaming to a closed connection"
            time.sleep(0.1)

        # A cancel ends the stream of a queued job at once.
        assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        events = [e for e in collect(client, job["id"]) if e.comment is None]
        assert [e.data["status"] for e in events if e.event == "status"] == [
            "queued",
            "cancelled",
        ]
        assert events[-1].event == "end" and events[-1].data["status"] == "cancelled"


def test_unknown_job_is_404_before_streaming(sqlite_env: ServiceEnv) -> None:
    with TestClient(create_app(sqlite_env.settings)) as client:
        response = client.get("/v1/jobs/0123456789abcdef0123456789abcdef/events")
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/json"
        bad = client.get(
            "/v1/jobs/0123456789abcdef0123456789abcdef/events", headers={"Last-Event-ID": "x"}
        )
        assert bad.status_code == 422 and bad.json()["field"] == "Last-Event-ID"
