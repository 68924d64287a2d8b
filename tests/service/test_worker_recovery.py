"""Jobs survive their workers: SIGKILL, SIGTERM, duplicate deliveries, restarts, max attempts.

Real worker subprocesses against real SQLite / PostgreSQL stores and the SQLAlchemy / Redis
brokers (see ``conftest.py``: a job is lost after 3 s without a heartbeat, the reaper sweeps
every 0.5 s).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from testkit import wait_until
from worker_helpers import copy_config, finished, saved_steps, status_events

from kru_core.config import JobConfig
from worker import context, jobs, service
from worker.models import utcnow

if TYPE_CHECKING:
    from conftest import ServiceEnv

pytestmark = pytest.mark.slow

#: Long enough to be caught mid-run, short enough to finish soon after a resume.
STEPS = 120
CHECKPOINT_EVERY = 20


def long_job(config: Callable[..., JobConfig]) -> JobConfig:
    return config(steps=STEPS, checkpoint_every=CHECKPOINT_EVERY, eval_every=CHECKPOINT_EVERY)


def step_at_least(job_id: str, step: int) -> bool:
    return service.get_job(job_id).progress.step >= step


def test_killed_worker_job_resumes_from_its_checkpoint_on_a_new_worker(
    service_env: ServiceEnv,
    worker_process: Callable[..., Any],
) -> None:
    first = worker_process(service_env)
    job = service.submit_job(long_job(copy_config))
    wait_until(
        lambda: step_at_least(job.id, 2 * CHECKPOINT_EVERY + 5), timeout=90, what="two checkpoints"
    )
    first.kill()
    checkpoint = saved_steps(service_env.settings.jobs_dir, job.id)[-1]
    killed = service.get_job(job.id)
    assert killed.status == "running"  # until the reaper sees it
    assert killed.progress.step >= checkpoint >= 2 * CHECKPOINT_EVERY

    second = worker_process(service_env)
    done = wait_until(lambda: finished(job.id), timeout=120, what="the resumed job")
    assert done.status == "succeeded", (done.error, second.log()[-3000:])
    assert done.attempts == 2 and done.progress.step == STEPS

    history = service.job_metrics(job.id)
    resumed = [p["step"] for p in history if p["attempt"] == 2]
    assert min(resumed) == checkpoint + 1, (checkpoint, resumed[:5])  # not step 0
    assert next(p["step"] for p in history if p["attempt"] == 1) < checkpoint
    events = status_events(job.id)
    resumed_event = {"status": "running", "attempt": 2, "resumed_from_step": checkpoint}
    assert resumed_event in events
    # The second attempt starts either after the reaper requeued the stale job or because the
    # redelivered message claimed it directly once its heartbeat was stale: whichever is first.
    first_running = next(i for i, e in enumerate(events) if e["status"] == "running")
    between = events[first_running + 1 : events.index(resumed_event)]
    requeued = {"status": "queued", "attempt": 1, "reason": "worker lost (heartbeat stale)"}
    assert [e for e in between if e["status"] != "running"] in ([], [requeued]), between
    running = [e["worker"] for e in events if e["status"] == "running" and "worker" in e]
    assert [w.rsplit(":", 1)[1] for w in running] == [str(first.pid), str(second.pid)]
    assert service.get_model(done.model_id).checkpoint.name == f"step-{STEPS:09d}"


def test_reaper_settles_jobs_whose_worker_died(
    sqlite_env: ServiceEnv,
    worker_process: Callable[..., Any],
) -> None:
    """Jobs claimed by a worker that never heartbeats again (a "ghost": killed, or its node lost)
    are requeued and rerun, failed after max_attempts, or cancelled if a cancel is pending."""
    store = context.current().store
    max_attempts = 2

    def ghost_claim(job_id: str) -> None:
        claimed = jobs.claim(
            store,
            job_id,
            worker="ghost:1",
            max_attempts=max_attempts,
            stale_before=utcnow() + timedelta(seconds=1),
        )
        assert claimed is not None

    requeued = service.submit_job(copy_config(steps=20))
    ghost_claim(requeued.id)
    exhausted = service.submit_job(copy_config(steps=20))
    ghost_claim(exhausted.id)
    ghost_claim(exhausted.id)  # its second attempt died too
    cancelled = service.submit_job(copy_config(steps=20))
    ghost_claim(cancelled.id)
    assert service.cancel_job(cancelled.id).cancel_requested
    assert service.list_jobs(status="running").total == 3

    worker = worker_process(sqlite_env, max_attempts=max_attempts)
    done = wait_until(lambda: finished(requeued.id), timeout=90, what="the requeued job")
    assert done.status == "succeeded" and done.attempts == 2, worker.log()[-3000:]
    # As in the crash test: the rerun follows the reaper's requeue, or the job's own queued
    # message claimed it directly once the ghost's heartbeat was stale, whichever came first.
    events = status_events(requeued.id)
    running = [e for e in events if e["status"] == "running"]
    assert [e["worker"] == "ghost:1" for e in running] == [True, False], events
    between = events[events.index(running[0]) + 1 : events.index(running[1])]
    lost = {"status": "queued", "attempt": 1, "reason": "worker lost (heartbeat stale)"}
    assert between in ([], [lost]), events
    failed = service.get_job(exhausted.id)
    assert failed.status == "failed" and failed.attempts == 2
    assert failed.error.startswith("gave up after 2 attempts: the worker running the job stopped")
    assert service.get_job(cancelled.id).status == "cancelled"
    assert status_events(cancelled.id)[-1] == {"status": "cancelled", "attempt": 1}


def test_duplicate_delivery_of_a_running_job_is_a_no_op(
    redis_pg_env: ServiceEnv,
    worker_process: Callable[..., Any],
) -> None:
    workers = [worker_process(redis_pg_env), worker_process(redis_pg_env)]
    for worker in workers:
        worker.wait_ready()
    job = service.submit_job(long_job(copy_config))
    wait_until(lambda: step_at_least(job.id, 5), timeout=90, what="the job to run")
    holder_pid = int(service.get_job(job.id).worker.rsplit(":", 1)[1])
    holder, other = sorted(workers, key=lambda w: w.pid != holder_pid)
    assert holder.pid == holder_pid
    assert context.current().enqueue(job.id)  # the same job id, delivered a second time
    wait_until(
        lambda: f"job {job.id}: not claimable" in other.log(),
        timeout=30,
        what="the second worker to receive and skip the duplicate",
    )
    assert service.get_job(job.id).status == "running"
    done = wait_until(lambda: finished(job.id), timeout=120, what="the job")
    assert done.status == "succeeded" and done.attempts == 1
    running = [e for e in status_events(job.id) if e["status"] == "running"]
    assert running == [{"status": "running", "attempt": 1, "worker": running[0]["worker"]}]
    assert running[0]["worker"].endswith(f":{holder.pid}")
    train = [p["step"] for p in service.job_metrics(job.id) if p["phase"] == "train"]
    assert train == sorted(set(train))  # one run: no step recorded twice
    assert f"job {job.id}: attempt" not in other.log()


def test_sigterm_and_restart_keep_every_job_and_run_the_queued_ones(
    redis_pg_env: ServiceEnv,
    worker_process: Callable[..., Any],
) -> None:
    """SIGTERM mid-job: the job checkpoints and goes back to the queue; the API restarts too;
    everything is still there, and a new worker runs the requeued job (resuming), a queued one
    and one whose message was never published."""
    first = worker_process(redis_pg_env)
    dataset = service.create_dataset("kept.txt", b"to be or not to be\n" * 10)
    earlier = service.submit_job(copy_config(steps=20))
    job = service.submit_job(long_job(copy_config))
    wait_until(
        lambda: step_at_least(job.id, CHECKPOINT_EVERY + 5), timeout=90, what="the job to run"
    )
    assert first.terminate(timeout=30) == 0
    stopped = service.get_job(job.id)
    assert stopped.status == "queued", (stopped, first.log()[-3000:])
    assert stopped.attempts == 0  # a graceful hand-back is not a failed attempt
    at = saved_steps(redis_pg_env.settings.jobs_dir, job.id)[-1]
    assert at == stopped.progress.step and at > CHECKPOINT_EVERY  # saved where it stopped
    assert status_events(job.id)[-1] == {
        "status": "queued",
        "attempt": 1,
        "reason": "worker shutting down",
    }
    done_before = service.get_job(earlier.id)
    assert done_before.status == "succeeded"
    metrics = service.job_metrics(earlier.id)

    service.shutdown()  # the API goes down too, and comes back
    service.init(redis_pg_env.settings)
    queued = service.submit_job(copy_config(steps=20))
    never_sent = uuid.uuid4().hex  # committed, then the API died before publishing it
    jobs.create(
        context.current().store,
        job_id=never_sent,
        name=None,
        config=copy_config(steps=20).to_dict(),
    )
    assert service.get_job(earlier.id) == done_before
    assert service.job_metrics(earlier.id) == metrics
    assert service.get_dataset(dataset.id) == dataset
    assert service.get_model(done_before.model_id).checkpoint.is_dir()

    worker_process(redis_pg_env)
    for job_id in (job.id, queued.id, never_sent):
        ended = wait_until(lambda j=job_id: finished(j), timeout=120, what=f"job {job_id}")
        assert ended.status == "succeeded" and ended.attempts == 1
    assert {"status": "running", "attempt": 1, "resumed_from_step": at} in status_events(job.id)
    assert service.list_jobs().total == 4
