"""Issue 11 on a real worker: honest end states of runs stopped by a wall-clock limit, and the
host protected from a job's memory (rlimit per job, allocation failures end the job)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from testkit import wait_until
from worker_helpers import copy_config, finished

from kru_core.config import MIN_MAX_SECONDS, ConfigError, JobConfig
from worker import service

if TYPE_CHECKING:
    from conftest import ServiceEnv


def test_runs_stopped_by_a_time_limit_end_failed_without_a_model(
    sqlite_env: ServiceEnv,
    worker_process: Callable[..., Any],
) -> None:
    own = service.submit_job(copy_config(steps=100_000, max_seconds=1.0))
    kept = service.submit_job(
        copy_config(steps=100_000, max_seconds=1.0, keep_model_on_timeout=True)
    )
    server = service.submit_job(copy_config(steps=100_000))
    worker = worker_process(sqlite_env, max_job_seconds=2.0)

    for job_id in (own.id, kept.id, server.id):
        wait_until(lambda job_id=job_id: finished(job_id), timeout=120, what="the jobs")
    job = service.get_job(own.id)
    assert job.status == "failed" and job.model_id is None, (job, worker.log()[-3000:])
    assert job.error.startswith("timed out: stopped at step ")
    assert "by train.max_seconds (1 s); no model registered" in job.error
    job = service.get_job(kept.id)
    assert job.status == "succeeded" and job.model_id is not None, job
    assert 0 < job.progress.step < 100_000
    job = service.get_job(server.id)
    assert job.status == "failed" and job.model_id is None
    assert "wall-clock limit of 2 s (KRU_MAX_JOB_SECONDS)" in job.error
    assert [m.job_id for m in service.list_models().items] == [kept.id]


@pytest.mark.parametrize("seconds", [1e-300, 0.5, 0.0])
def test_max_seconds_has_a_minimum(seconds: float) -> None:
    with pytest.raises(ConfigError, match=r"train\.max_seconds"):
        JobConfig.from_dict({"train": {"max_seconds": seconds}})
    assert JobConfig.from_dict({"train": {"max_seconds": MIN_MAX_SECONDS}})


def test_a_job_past_its_memory_limit_fails_and_the_worker_lives_on(
    sqlite_env: ServiceEnv,
    worker_process: Callable[..., Any],
) -> None:
    """The API admitted it (its estimate fits the API's budget); the worker's own limit of
    300 MB (RLIMIT_AS over what it already uses) stops it at the first allocation past it."""
    greedy = JobConfig.from_dict(
        {
            "task": {"kind": "copy", "delay": 200},
            "model": {"cell": "lstm", "hidden_size": 512},
            "train": {"steps": 5, "batch_size": 512, "device": "cpu"},
        }
    )
    big = service.submit_job(greedy)
    after = service.submit_job(copy_config(steps=20))
    worker = worker_process(sqlite_env, max_job_memory_bytes=300 * 2**20)

    wait_until(lambda: finished(after.id), timeout=120, what="both jobs")
    job = service.get_job(big.id)
    assert job.status == "failed", (job, worker.log()[-3000:])
    assert job.error.startswith("out of memory: the job needed more than this worker allows")
    assert "KRU_MAX_JOB_MEMORY_BYTES" in job.error and "Traceback" not in job.error
    assert service.get_job(after.id).status == "succeeded", worker.log()[-3000:]
    assert worker.alive
