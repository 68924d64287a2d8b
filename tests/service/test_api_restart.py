"""Restart: stop the API and the worker, start them again; everything is still there.

Jobs, metric histories, datasets and models survive, the model still predicts, and a job that
was queued while no worker ran is trained once a worker is back. On the embedded default and on
Redis + PostgreSQL, with real processes (uvicorn, Celery) stopped by SIGTERM.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from api_server import running_api

if TYPE_CHECKING:
    from conftest import ServiceEnv

pytestmark = pytest.mark.slow

JOB = {
    "task": {"kind": "copy", "delay": 5, "eval_size": 32},
    "model": {"cell": "kru", "hidden_size": 16},
    "train": {"steps": 40, "batch_size": 16, "eval_every": 20, "checkpoint_every": 20},
}


def wait_for(client: httpx.Client, job_id: str, status: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == status:
            return job
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.1)
    pytest.fail(f"job {job_id} not {status} after {timeout} s")


def test_state_survives_a_restart_and_a_queued_job_runs(
    service_env: ServiceEnv, worker_process: Callable[..., Any], tmp_path: Path
) -> None:
    settings = service_env.settings
    worker = worker_process(service_env)
    with running_api(settings, tmp_path / "api-1.log") as api, api.client() as client:
        dataset = client.post(
            "/v1/datasets", files={"file": ("notes.txt", b"hello restart\n" * 20)}
        ).json()
        trained = client.post("/v1/jobs", json={**JOB, "name": "before"}).json()
        trained = wait_for(client, trained["id"], "succeeded")
        history = client.get(f"/v1/jobs/{trained['id']}/metrics").json()
        model = client.get(f"/v1/models/{trained['model_id']}").json()
        prediction = client.post(
            f"/v1/models/{model['id']}/predict", json={"inputs": [[1, 2, 3, 0, 9, 0]]}
        ).json()

        assert worker.terminate() == 0
        queued = client.post("/v1/jobs", json={**JOB, "name": "queued across the restart"})
        queued = queued.json()
        time.sleep(1.0)
        assert client.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"
    # the API is stopped here, the worker too: nothing of this run is left in memory

    with running_api(settings, tmp_path / "api-2.log") as api, api.client() as client:
        assert client.get(f"/v1/jobs/{trained['id']}").json() == trained
        assert client.get(f"/v1/jobs/{trained['id']}/metrics").json() == history
        assert client.get(f"/v1/models/{model['id']}").json() == model
        assert client.get(f"/v1/datasets/{dataset['id']}").json() == dataset
        assert client.get("/v1/jobs").json()["total"] == 2
        again = client.post(
            f"/v1/models/{model['id']}/predict", json={"inputs": [[1, 2, 3, 0, 9, 0]]}
        ).json()
        assert again == prediction

        worker_process(service_env)
        done = wait_for(client, queued["id"], "succeeded")
        assert done["attempts"] == 1 and done["model_id"]
        assert client.get("/v1/models").json()["total"] == 2
