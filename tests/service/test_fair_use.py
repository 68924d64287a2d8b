"""Issue 11, what it must show: one key's flood of jobs and uploads leaves another key's job and
predictions served in their normal time (a real API process and a real worker, one of each)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api_server import running_api
from worker_helpers import finished

from worker import service

if TYPE_CHECKING:
    from conftest import ServiceEnv

KEYS = ["alice:alice-secret-0123", "bob:bob-secret-4567"]
ALICE = {"Authorization": "Bearer alice-secret-0123"}
BOB = {"Authorization": "Bearer bob-secret-4567"}
JOB = {
    "task": {"kind": "copy", "delay": 5, "eval_size": 64},
    "model": {"cell": "kru", "hidden_size": 16},
    "train": {"steps": 60, "batch_size": 16, "eval_every": 30, "device": "cpu"},
}
PUBLISHED = 2  # KRU_MAX_PUBLISHED_JOBS_PER_KEY of this test
FLOOD = 12


def test_one_keys_flood_leaves_another_keys_job_and_predictions_served(
    sqlite_env: ServiceEnv,
    worker_process: Callable[..., Any],
    wait_until: Callable[..., Any],
    tmp_path: Path,
) -> None:
    overrides = {
        "api_keys": KEYS,
        "max_active_jobs_per_key": FLOOD,
        "max_published_jobs_per_key": PUBLISHED,
        "max_dataset_bytes_per_key": 20_000,
    }
    settings = sqlite_env.with_overrides(**overrides)
    worker = worker_process(sqlite_env, **overrides)
    with running_api(settings, tmp_path / "api.log") as api, api.client() as client:
        # bob's model, and how long his predictions take before the flood
        first = client.post("/v1/jobs", headers=BOB, json=JOB).json()
        done = wait_until(lambda: finished(first["id"]), timeout=120, what="bob's first job")
        assert done.status == "succeeded", (done.error, worker.log()[-3000:])
        body = {"inputs": [[1, 2, 3, 4, 5, 6, 7, 8, 1, 2, *[0] * 4, 9, *[0] * 10]]}

        def predict() -> float:
            start = time.perf_counter()
            r = client.post(f"/v1/models/{done.model_id}/predict", headers=BOB, json=body)
            assert r.status_code == 200, r.text
            return time.perf_counter() - start

        baseline = max(predict() for _ in range(5))

        # alice floods: more jobs than her quota, and uploads (the same file again, then more)
        codes = [client.post("/v1/jobs", headers=ALICE, json=JOB).status_code for _ in range(15)]
        assert codes == [202] * FLOOD + [429] * 3
        rows = b'{"input": [1, 2, 3], "target": 1}\n' * 100
        uploads = [
            client.post("/v1/datasets", headers=ALICE, files={"file": ("d.jsonl", rows)})
            for _ in range(5)
        ]
        assert [u.status_code for u in uploads] == [201, 200, 200, 200, 200]
        assert len({u.json()["id"] for u in uploads}) == 1  # one copy stored
        more = [
            client.post(
                "/v1/datasets", headers=ALICE, files={"file": ("d.jsonl", rows * (i + 2))}
            ).status_code
            for i in range(5)
        ]
        assert 429 in more and more[0] == 201

        # bob's next job is served after at most the running and the published ones of alice
        job = client.post("/v1/jobs", headers=BOB, json=JOB).json()
        during = [predict() for _ in range(10)]
        done = wait_until(lambda: finished(job["id"]), timeout=180, what="bob's job")
        assert done.status == "succeeded", (done.error, worker.log()[-3000:])

    alices = sorted(
        (j for j in service.list_jobs(limit=500).items if j.id not in (first["id"], job["id"])),
        key=lambda j: j.created_at,
    )
    before_bob = [j for j in alices if j.started_at is not None and j.started_at < done.started_at]
    assert len(before_bob) <= 1 + PUBLISHED, [j.started_at for j in alices]
    assert any(j.status == "queued" for j in alices) or len(before_bob) < FLOOD
    # predictions are served by the API, not the busy worker: not slowed by the flood
    assert max(during) < max(2.0, 10 * baseline), (baseline, during)
