"""The compose topology without Docker: one ``kru api``, two ``kru worker`` processes (the
commands the images run), a Redis configured as the compose ``redis`` service, PostgreSQL, and
one data directory that all three processes share (the ``kru-data`` volume).

Two jobs submitted at once over HTTP must run on the two workers at the same time, both succeed,
and the API must serve predictions from the checkpoints the workers wrote.
"""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from testkit import copy_job

from .processes import CLEAN_EXIT, kru_argv, redis_and_postgres, started, started_api, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

DELAY = 5


def job_body(name: str, *, steps: int) -> dict:
    """A small copy-task job: a few seconds of CPU per worker."""
    return copy_job(name, steps=steps, delay=DELAY)


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def _worker_names(database_url: str, job_ids: list[str]) -> dict[str, str]:
    """The worker that ran each job, from the job store (the database row is the truth)."""
    import psycopg

    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id, worker FROM jobs WHERE id = ANY(%s)", (job_ids,)).fetchall()
    return dict(rows)


def test_two_jobs_run_at_once_on_two_workers(tmp_path: Path) -> None:
    api_key = secrets.token_hex(16)
    data_dir = tmp_path / "data"  # the shared volume
    headers = {"Authorization": f"Bearer {api_key}"}
    logs = tmp_path / "logs"

    with redis_and_postgres(
        tmp_path,
        data_dir,
        KRU_API_KEYS=api_key,
        KRU_LOG_LEVEL="INFO",
        KRU_HEARTBEAT_INTERVAL="0.5",
        KRU_PROGRESS_INTERVAL="0.2",
        # two CPU workers on a small machine: one thread each, as a CPU share would give them
        OMP_NUM_THREADS="1",
    ) as env:
        # Each process in a directory of its own, like a container: only /data is shared.
        homes = {name: tmp_path / name for name in ("api", "worker-1", "worker-2")}
        for home in homes.values():
            home.mkdir()

        # compose order: the API once Redis and PostgreSQL answer, the workers once it is ready
        with started_api(env, cwd=homes["api"], logs=logs) as (api, base_url):
            worker_argv = kru_argv("worker")
            with (
                started("worker-1", worker_argv, env=env, cwd=homes["worker-1"], logs=logs) as w1,
                started("worker-2", worker_argv, env=env, cwd=homes["worker-2"], logs=logs) as w2,
            ):
                for worker in (w1, w2):
                    worker.wait_worker_ready()
                    # one job at a time, in the worker's own process (CUDA-safe: no fork)
                    assert "concurrency: 1 (solo)" in worker.output()

                with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
                    with ThreadPoolExecutor(2) as pool:  # at once
                        responses = list(
                            pool.map(
                                lambda name: client.post(
                                    "/v1/jobs", json=job_body(name, steps=150)
                                ),
                                ["topology-a", "topology-b"],
                            )
                        )
                    for response in responses:
                        assert response.status_code == 202, response.text
                    ids = [r.json()["id"] for r in responses]

                    def finished() -> list[dict] | None:
                        jobs = [client.get(f"/v1/jobs/{i}").json() for i in ids]
                        for job in jobs:
                            if job["status"] in ("failed", "cancelled"):
                                pytest.fail(
                                    f"job {job['id']} {job['status']}: {job.get('error')}\n"
                                    f"{w1.output()[-3000:]}\n{w2.output()[-3000:]}"
                                )
                        return jobs if all(j["status"] == "succeeded" for j in jobs) else None

                    jobs = wait_until(finished, timeout=300, what="both jobs to succeed")

                    # at the same time: the running intervals overlap
                    (a_start, a_end), (b_start, b_end) = [
                        (_parse(j["started_at"]), _parse(j["finished_at"])) for j in jobs
                    ]
                    assert a_start < b_end and b_start < a_end, f"no overlap: {jobs}"
                    assert all(j["attempts"] == 1 for j in jobs)

                    # on the two workers: different names, one per worker process
                    names = _worker_names(env["KRU_DATABASE_URL"], ids)
                    assert len(set(names.values())) == 2, names
                    pids = {name.rsplit(":", 1)[-1] for name in names.values()}
                    assert pids == {str(w1.pid), str(w2.pid)}, (names, w1.pid, w2.pid)

                    # the shared volume: workers wrote checkpoints the API serves models from
                    for job in jobs:
                        assert any((data_dir / "jobs" / job["id"]).glob("step-*")), job["id"]
                        sequence = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2] + [0] * (DELAY - 1) + [9]
                        sequence += [0] * 10
                        predicted = client.post(
                            f"/v1/models/{job['model_id']}/predict", json={"inputs": [sequence]}
                        )
                        assert predicted.status_code == 200, predicted.text
                        (labels,) = predicted.json()["predictions"]
                        assert len(labels) == len(sequence)

                # SIGTERM, as `docker compose stop` sends: idle workers and the API exit cleanly
                assert w1.stop() in CLEAN_EXIT, w1.output()[-3000:]
                assert w2.stop() in CLEAN_EXIT, w2.output()[-3000:]
            assert api.stop() in CLEAN_EXIT, api.output()[-3000:]
