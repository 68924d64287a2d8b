"""End to end over HTTP, on the embedded default and on Redis + PostgreSQL.

A real API process (uvicorn), a real Celery worker subprocess, a real store and broker: submit a
small copy-task job, watch it go ``queued -> running -> succeeded`` with its step rising, read
its metric history and model, then predict on fresh copy sequences and get the recalled symbols
right.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from api_server import copy_sequence, running_api

if TYPE_CHECKING:
    from conftest import ServiceEnv

pytestmark = pytest.mark.slow

DELAY = 5
# Sized to learn the copy task to (near) perfect recall in well under a minute of one CPU core.
COPY_JOB: dict[str, Any] = {
    "name": "e2e-copy",
    "task": {"kind": "copy", "delay": DELAY, "eval_size": 128},
    "model": {"cell": "kru", "hidden_size": 32},
    "train": {
        "steps": 500,
        "batch_size": 32,
        "optimizer": "adam",
        "lr": 0.01,
        "eval_every": 100,
        "checkpoint_every": 200,
        "device": "cpu",
        "seed": 0,
    },
}
FINISHED = {"succeeded", "failed", "cancelled"}


def watch(client: httpx.Client, job_id: str, *, timeout: float) -> list[dict[str, Any]]:
    """Poll the job until it finishes; every snapshot seen, in order."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        seen.append(job)
        if job["status"] in FINISHED:
            return seen
        time.sleep(0.05)
    pytest.fail(f"job {job_id} not finished after {timeout} s: {seen[-1]}")


def fresh_copy_batch(n: int, *, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    data = [[rng.randint(1, 8) for _ in range(10)] for _ in range(n)]
    return [copy_sequence(d, DELAY) for d in data], data


def test_copy_job_over_http_trains_and_predicts(
    service_env: ServiceEnv,
    worker_process: Callable[..., Any],
    tmp_path: Path,
) -> None:
    worker = worker_process(service_env)
    with running_api(service_env.settings, tmp_path / "api.log") as api, api.client() as client:
        submitted = client.post("/v1/jobs", json=COPY_JOB)
        assert submitted.status_code == 202, submitted.text
        job = submitted.json()
        assert job["status"] == "queued" and job["name"] == "e2e-copy"
        assert job["config"]["train"]["steps"] == 500 and job["progress"]["step"] == 0
        assert client.get("/v1/jobs", params={"status": "queued"}).json()["total"] in (0, 1)

        seen = watch(client, job["id"], timeout=180)
        done = seen[-1]
        assert done["status"] == "succeeded", (done["error"], worker.log()[-3000:])
        statuses = [s["status"] for s in seen]
        order = [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]
        assert order in (["queued", "running", "succeeded"], ["running", "succeeded"]), order
        running_steps = [s["progress"]["step"] for s in seen if s["status"] == "running"]
        assert len(set(running_steps)) >= 3, running_steps  # progress seen rising while running
        assert running_steps == sorted(running_steps)
        assert done["progress"] == {
            **done["progress"],
            "step": 500,
            "total_steps": 500,
            "fraction": 1.0,
        }
        assert done["attempts"] == 1 and done["model_id"] and done["error"] is None

        history = client.get(f"/v1/jobs/{job['id']}/metrics").json()
        evals = [p for p in history if p["phase"] == "eval"]
        assert [p["step"] for p in evals] == [100, 200, 300, 400, 500]
        assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]

        model = client.get(f"/v1/models/{done['model_id']}").json()
        assert model["job_id"] == job["id"] and model["name"] == "e2e-copy"
        assert model["task"]["task_kind"] == "copy" and model["task"]["per_step"] is True
        assert model["parameter_counts"]["total"] > model["parameter_counts"]["recurrent"] > 0
        assert "checkpoint" not in model  # paths stay on the server
        listed = client.get("/v1/models").json()
        assert [m["id"] for m in listed["items"]] == [model["id"]]

        inputs, data = fresh_copy_batch(16, seed=12345)
        response = client.post(f"/v1/models/{model['id']}/predict", json={"inputs": inputs})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_id"] == model["id"] and "probabilities" not in body
        predictions = body["predictions"]
        assert [len(p) for p in predictions] == [DELAY + 20] * 16
        recalled = [p[-10:] for p in predictions]
        correct = sum(
            r == d
            for rs, ds in zip(recalled, data, strict=True)
            for r, d in zip(rs, ds, strict=True)
        )
        assert correct / 160 >= 0.95, (correct, recalled[:3], data[:3])
        assert all(p[: DELAY + 10] == [0] * (DELAY + 10) for p in predictions)

        with_probs = client.post(
            f"/v1/models/{model['id']}/predict", json={"inputs": inputs[:2], "probabilities": True}
        ).json()
        assert len(with_probs["probabilities"][0]) == DELAY + 20
        assert abs(sum(with_probs["probabilities"][0][-1]) - 1) < 1e-4

        metrics = client.get("/metrics").text
        assert 'kru_jobs{status="succeeded"} 1.0' in metrics
        assert 'route="/v1/models/{model_id}/predict",status="200"' in metrics
        assert "kru_predict_duration_seconds_count" in metrics
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {
            "database": "ok",
            "broker": "ok",
        }


def test_cancel_over_http_stops_a_running_job_and_keeps_its_checkpoint(
    sqlite_env: ServiceEnv, worker_process: Callable[..., Any], tmp_path: Path
) -> None:
    long_job = {**COPY_JOB, "name": "to-cancel", "train": {**COPY_JOB["train"], "steps": 100_000}}
    long_job["train"]["checkpoint_every"] = 20
    worker_process(sqlite_env)
    with running_api(sqlite_env.settings, tmp_path / "api.log") as api, api.client() as client:
        job = client.post("/v1/jobs", json=long_job).json()
        deadline = time.monotonic() + 120
        while True:
            seen = client.get(f"/v1/jobs/{job['id']}").json()
            if seen["status"] == "running" and seen["progress"]["step"] >= 40:
                break
            assert time.monotonic() < deadline, seen
            time.sleep(0.1)

        asked = time.monotonic()
        cancel = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancel.status_code == 200, cancel.text
        assert cancel.json()["cancel_requested"] is True
        while (done := client.get(f"/v1/jobs/{job['id']}").json())["status"] == "running":
            assert time.monotonic() - asked < 10, "not cancelled within 10 s"
            time.sleep(0.1)
        assert done["status"] == "cancelled" and done["model_id"] is None
        assert 40 <= done["progress"]["step"] < 100_000
        checkpoints = list((sqlite_env.settings.jobs_dir / job["id"]).glob("step-*"))
        assert checkpoints, "the cancelled job's checkpoint was not kept"

        again = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert again.status_code == 409
        assert again.json()["detail"] == (
            f"job '{job['id']}' is already cancelled; only queued or running jobs can be cancelled"
        )
