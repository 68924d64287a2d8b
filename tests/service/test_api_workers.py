"""``GET /v1/workers``: a real worker process reports its host, device, versions and job."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from fastapi.testclient import TestClient
from testkit import wait_until
from worker_helpers import copy_config

from app.main import create_app
from worker import service

if TYPE_CHECKING:
    from conftest import ServiceEnv


def test_workers_lists_a_live_worker_with_its_device_and_job(
    service_env: ServiceEnv,
    worker_process: Callable[..., Any],
) -> None:
    worker = worker_process(service_env)
    with TestClient(create_app(service_env.settings)) as client:

        def workers() -> list[dict[str, Any]]:
            response = client.get("/v1/workers")
            assert response.status_code == 200, response.text
            return response.json()["items"]

        [row] = wait_until(workers, timeout=60, what="the worker's row")
        assert row["pid"] == worker.pid and row["name"].endswith(f":{worker.pid}")
        assert row["device"] == "cpu" and row["memory_bytes"] is None
        assert row["torch_version"] == torch.__version__
        assert row["cuda_version"] == torch.version.cuda
        assert row["job_id"] is None

        job = service.submit_job(copy_config(steps=3000))
        wait_until(
            lambda: [w for w in workers() if w["job_id"] == job.id],
            timeout=60,
            what="the worker to report the job it runs",
        )
        assert service.get_job(job.id).worker == row["name"]
        service.cancel_job(job.id)
        assert worker.terminate() == 0
        assert workers() == []  # a graceful stop removes its row
