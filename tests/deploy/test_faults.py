"""Faults survived by the deployment's processes (``kru api``, ``kru worker``) on a private Redis
and a private PostgreSQL that the tests kill with SIGKILL and start again.

Each test prints one ``FAULT`` row (run with ``-s``): the numbers of docs/deploy.md's fault
table. The goals asserted: every job submitted succeeds, none runs twice at once (one running
attempt at a time, no training step recorded twice in an attempt), recovery within 30 s of the
broker's (or database's) return. The worker runs under a restart policy like compose's
(:class:`~tests.deploy.faults.Supervised`); settings are shortened for the tests (heartbeats,
reaper, consume watchdog).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from testkit import copy_job

from .faults import fault_row, postgres_server, redis_server, supervised
from .processes import (
    KRU,
    Process,
    deployment_env,
    fresh_postgres_database,
    kru_argv,
    started,
    started_api,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

DELAY = 5
RECOVERY_GOAL_S = 30.0
FAST = {
    "KRU_HEARTBEAT_INTERVAL": "0.5",
    "KRU_HEARTBEAT_TIMEOUT": "6",
    "KRU_REAPER_INTERVAL": "1",
    "KRU_CONSUME_TIMEOUT": "5",
    "KRU_PROGRESS_INTERVAL": "0.2",
    "KRU_LOG_LEVEL": "INFO",
    "OMP_NUM_THREADS": "1",
}


def job_body(name: str, *, steps: int, checkpoint_every: int = 50) -> dict:
    return copy_job(name, steps=steps, delay=DELAY, eval_size=32, checkpoint_every=checkpoint_every)


def parse_time(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


@dataclass
class Deployment:
    """The API's client, the API and the supervised worker of one test."""

    client: httpx.Client
    api: Process
    worker: object  # faults.Supervised
    base_url: str
    env: dict[str, str]

    def submit(self, name: str, steps: int, **kw: int) -> str:
        response = self.client.post("/v1/jobs", json=job_body(name, steps=steps, **kw))
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.client.get(f"/v1/jobs/{job_id}").json()

    def logs(self, *processes: Process) -> str:
        """The tails of the worker's and the API's logs, or of each of ``processes``'."""
        if processes:
            return "\n".join(f"--- {p.name} ---\n{p.output()[-4000:]}" for p in processes)
        return f"{self.worker.output()[-5000:]}\n--- api ---\n{self.api.output()[-2000:]}"

    def wait_step(self, job_id: str, step: int, timeout: float = 60) -> dict:
        def reached() -> dict | None:
            job = self.job(job_id)
            return job if job["status"] == "running" and job["progress"]["step"] >= step else None

        return wait_until(reached, timeout=timeout, what=f"job {job_id} at step {step}")

    def wait_succeeded(
        self, job_ids: list[str], timeout: float = 90, *, logs: tuple[Process, ...] = ()
    ) -> list[dict]:
        """The jobs once all have succeeded; the test fails at the first that fails or is
        cancelled, or after ``timeout`` s, with :meth:`logs` (of ``logs``, where given)."""

        def done() -> list[dict] | None:
            found = [self.job(i) for i in job_ids]
            for job in found:
                if job["status"] in ("failed", "cancelled"):
                    pytest.fail(
                        f"job {job['id']} {job['status']}: {job['error']}\n{self.logs(*logs)}"
                    )
            return found if all(j["status"] == "succeeded" for j in found) else None

        try:
            return wait_until(done, timeout=timeout, what=f"jobs {job_ids} to succeed")
        except pytest.fail.Exception:
            print(self.logs(*logs))
            raise

    def assert_never_twice_at_once(self, job_id: str) -> None:
        """One running attempt at a time: attempts start in order, each once, each after the
        previous one's hand-back or loss; no training step recorded twice in an attempt."""
        running = [
            e["data"]["attempt"]
            for e in _status_events(self, job_id)
            if e["data"]["status"] == "running" and "worker" in e["data"]
        ]
        assert running == list(range(1, len(running) + 1)), (job_id, running)
        seen: set[tuple[int, str, int]] = set()
        for point in self.client.get(f"/v1/jobs/{job_id}/metrics").json():
            key = (point["attempt"], point["phase"], point["step"])
            assert key not in seen, f"job {job_id}: {key} recorded twice"
            seen.add(key)


@contextmanager
def deployment(
    tmp_path: Path, *, broker_url: str, database_url: str, **settings: str
) -> Iterator[Deployment]:
    """``kru api`` and a supervised ``kru worker`` on the given broker and database."""
    env = deployment_env(
        tmp_path / "data", database_url=database_url, broker_url=broker_url, **{**FAST, **settings}
    )
    logs = tmp_path / "logs"
    with (
        started_api(env, cwd=tmp_path, logs=logs) as (api, base_url),
        supervised("worker", kru_argv("worker"), env=env, cwd=tmp_path, logs=logs) as worker,
    ):
        wait_until(lambda: " ready." in worker.output(), timeout=90, what="the worker to be ready")
        with httpx.Client(base_url=base_url, timeout=30) as client:
            yield Deployment(client, api, worker, base_url, env)


def test_redis_killed_mid_job_and_a_submit_during_the_outage(tmp_path: Path) -> None:
    """Redis SIGKILLed while a job trains, a job submitted while it is down, Redis started
    again on its append-only file: the running job finishes, the one submitted during the
    outage runs after it, and the worker consumes the next job within seconds (restarted by
    its consume watchdog where Celery lost its consumer)."""
    with (
        redis_server(tmp_path) as redis,
        fresh_postgres_database() as database_url,
        deployment(tmp_path, broker_url=redis.url, database_url=database_url) as dep,
    ):
        running = dep.submit("running-through", steps=2000)
        dep.wait_step(running, 30)
        redis.kill()
        t_kill = time.time()
        during = dep.submit("submitted-during-outage", steps=60)
        assert dep.job(during)["status"] == "queued"
        readyz = httpx.get(f"{dep.base_url}/readyz", timeout=10)
        assert readyz.status_code == 503 and readyz.json()["checks"]["broker"] != "ok"
        time.sleep(max(0.0, 3.0 - (time.time() - t_kill)))
        redis.start()
        t_back = time.time()
        first, second = dep.wait_succeeded([running, during], timeout=120)
        recovered = parse_time(second["started_at"]) - t_back
        t_next = time.time()
        after = dep.submit("after-recovery", steps=60)
        (third,) = dep.wait_succeeded([after], timeout=60)
        next_wait = parse_time(third["started_at"]) - t_next
        jobs = [first, second, third]

        # A published job that this idle worker does not take (what a lost Celery consumer
        # looks like from the job store; also a message the broker lost): the consume
        # watchdog ends the worker with 75, the restart policy starts a new one, whose reaper
        # re-publishes the job at start.
        exits_before = len(dep.worker.exits)
        orphan = _published_without_a_message(dep, job_body("orphan", steps=60))
        t_orphan = time.time()
        (fourth,) = dep.wait_succeeded([orphan], timeout=60)
        watchdog_s = parse_time(fourth["started_at"]) - t_orphan
        assert dep.worker.exits[exits_before:] == [75], (dep.worker.exits, dep.logs())
        assert "consume watchdog: job " in dep.worker.output()
        jobs.append(fourth)
        fault_row(
            "worker-stops-consuming",
            submitted=1,
            succeeded=int(fourth["status"] == "succeeded"),
            attempts=fourth["attempts"],
            worker_exits=dep.worker.exits[exits_before:],
            recover_s=round(watchdog_s, 1),
        )
        assert watchdog_s < RECOVERY_GOAL_S
        fault_row(
            "redis-sigkill-restart",
            submitted=3,
            succeeded=sum(j["status"] == "succeeded" for j in jobs[:3]),
            attempts=[j["attempts"] for j in jobs[:3]],
            worker_exits=dep.worker.exits[:exits_before],
            outage_s=round(t_back - t_kill, 1),
            recover_s=round(recovered, 1),
            next_job_wait_s=round(next_wait, 1),
        )
        assert [j["attempts"] for j in jobs] == [1, 1, 1, 1], dep.logs()
        assert recovered < RECOVERY_GOAL_S, dep.logs()
        assert next_wait < 10, dep.logs()
        assert all(code == 75 for code in dep.worker.exits), dep.worker.exits
        for job in jobs:
            dep.assert_never_twice_at_once(job["id"])


def test_postgres_killed_mid_job(tmp_path: Path) -> None:
    """PostgreSQL SIGKILLed (every backend) while a job trains, started again 4 s later (crash
    recovery): /readyz answers 503 meanwhile and recovers alone; the job's progress writes are
    kept and written once it is back (every evaluation point is there), and it succeeds."""
    steps, evals = 700, 50
    with (
        redis_server(tmp_path) as redis,
        postgres_server() as postgres,
        deployment(
            tmp_path,
            broker_url=redis.url,
            database_url=postgres.url,
            KRU_HEARTBEAT_TIMEOUT="20",
        ) as dep,
    ):
        job_id = dep.submit("through-a-db-crash", steps=steps)
        dep.wait_step(job_id, 30)
        postgres.kill()
        t_kill = time.time()
        wait_until(
            lambda: httpx.get(f"{dep.base_url}/readyz", timeout=10).status_code == 503,
            timeout=15,
            what="/readyz to answer 503",
        )
        assert httpx.get(f"{dep.base_url}/readyz", timeout=10).json()["checks"]["database"] != (
            "ok"
        )
        time.sleep(max(0.0, 4.0 - (time.time() - t_kill)))
        postgres.start()
        t_back = time.time()
        wait_until(
            lambda: httpx.get(f"{dep.base_url}/readyz", timeout=10).status_code == 200,
            timeout=RECOVERY_GOAL_S,
            what="/readyz to recover",
        )
        ready_s = time.time() - t_back
        (job,) = dep.wait_succeeded([job_id], timeout=120)
        points = dep.client.get(f"/v1/jobs/{job_id}/metrics").json()
        eval_steps = sorted(p["step"] for p in points if p["phase"] == "eval")
        fault_row(
            "postgres-sigkill-restart",
            submitted=1,
            succeeded=int(job["status"] == "succeeded"),
            attempts=job["attempts"],
            outage_s=round(t_back - t_kill, 1),
            readyz_recover_s=round(ready_s, 1),
            eval_points=f"{len(eval_steps)}/{steps // evals}",
        )
        assert job["attempts"] == 1, dep.logs()
        assert eval_steps == list(range(evals, steps + 1, evals)), (eval_steps, dep.logs())
        dep.assert_never_twice_at_once(job_id)


def test_worker_and_api_killed_mid_job_and_celery_inspect(tmp_path: Path) -> None:
    """``celery -A worker.celery_app inspect ping`` answers for the running worker; the API
    SIGKILLed and started again while a job trains loses nothing; the worker SIGKILLed mid-job
    is restarted and its job resumes from its checkpoint on the next attempt."""
    with (
        redis_server(tmp_path) as redis,
        fresh_postgres_database() as database_url,
        deployment(tmp_path, broker_url=redis.url, database_url=database_url) as dep,
    ):
        celery = KRU.with_name("celery")
        ping = subprocess.run(
            [str(celery), "-A", "worker.celery_app", "inspect", "ping", "--timeout", "5"],
            env=dep.env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert f"kru-{dep.worker.pid}@" in ping.stdout and "pong" in ping.stdout, ping.stdout

        dataset = dep.client.post(
            "/v1/datasets", files={"file": ("notes.txt", b"kept across restarts\n" * 20)}
        ).json()
        earlier = dep.submit("earlier", steps=60)
        (earlier_job,) = dep.wait_succeeded([earlier])
        before = {
            "job": earlier_job,
            "metrics": dep.client.get(f"/v1/jobs/{earlier}/metrics").json(),
            "model": dep.client.get(f"/v1/models/{earlier_job['model_id']}").json(),
            "dataset": dep.client.get(f"/v1/datasets/{dataset['id']}").json(),
        }
        job_id = dep.submit("through-kills", steps=3000, checkpoint_every=100)
        dep.wait_step(job_id, 30)

        # the API: SIGKILL, start again on the same port
        dep.api.proc.kill()
        dep.api.proc.wait(10)
        t_api = time.time()
        port = int(dep.base_url.rsplit(":", 1)[1])
        with started_api(
            dep.env, cwd=tmp_path, logs=tmp_path / "logs", name="api-2", port=port
        ) as (api2, _):
            api_recover = time.time() - t_api
            dep.api = api2
            after = {
                "job": dep.job(earlier),
                "metrics": dep.client.get(f"/v1/jobs/{earlier}/metrics").json(),
                "model": dep.client.get(f"/v1/models/{earlier_job['model_id']}").json(),
                "dataset": dep.client.get(f"/v1/datasets/{dataset['id']}").json(),
            }
            assert after == before
            assert dep.job(job_id)["status"] == "running"

            # the worker: SIGKILL past a checkpoint; compose (here: Supervised) restarts it
            dep.wait_step(job_id, 250)
            first_pid = dep.worker.pid
            dep.worker.kill()
            t_worker = time.time()
            (job,) = dep.wait_succeeded([job_id], timeout=120)
            worker_recover = (
                parse_time(
                    next(
                        e["time"]
                        for e in _status_events(dep, job_id)
                        if e["data"].get("attempt") == 2 and e["data"]["status"] == "running"
                    )
                )
                - t_worker
            )
            assert dep.worker.pid != first_pid
            predicted = dep.client.post(
                f"/v1/models/{job['model_id']}/predict",
                json={"inputs": [[1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 0, 0, 0, 0, 9] + [0] * 10]},
            )
            assert predicted.status_code == 200, predicted.text
            resumed = [
                e["data"] for e in _status_events(dep, job_id) if "resumed_from_step" in e["data"]
            ]
            fault_row(
                "api-sigkill-restart",
                submitted=2,
                succeeded=2,
                attempts=[earlier_job["attempts"], job["attempts"]],
                recover_s=round(api_recover, 1),
            )
            fault_row(
                "worker-sigkill",
                submitted=1,
                succeeded=int(job["status"] == "succeeded"),
                attempts=job["attempts"],
                resumed_from=resumed[0]["resumed_from_step"] if resumed else None,
                recover_s=round(worker_recover, 1),
            )
            assert job["attempts"] == 2
            assert resumed and resumed[0]["resumed_from_step"] >= 100
            assert worker_recover < RECOVERY_GOAL_S
            dep.assert_never_twice_at_once(job_id)


def _status_events(dep: Deployment, job_id: str) -> list[dict]:
    """The job's status events (``time``, ``data``) from the store, oldest first."""
    import psycopg

    url = dep.env["KRU_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT time, data FROM job_events WHERE job_id = %s AND kind = 'status' ORDER BY id",
            (job_id,),
        ).fetchall()
    return [{"time": t.isoformat(), "data": d} for t, d in rows]


def _published_without_a_message(dep: Deployment, body: dict) -> str:
    """A job stored ``queued`` and marked published, whose message never reaches the broker."""
    import uuid

    from kru_core.config import JobConfig
    from worker import jobs
    from worker.db import Store

    store = Store(dep.env["KRU_DATABASE_URL"])
    try:
        job_id = uuid.uuid4().hex
        config = JobConfig.from_dict({k: v for k, v in body.items() if k != "name"}).to_dict()
        jobs.create(store, job_id=job_id, name=body["name"], config=config)
        jobs.mark_enqueued(store, job_id)
    finally:
        store.dispose()
    return job_id


#: libfaketime (Debian package ``faketime``): a process's clock shifted by an offset.
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
SKEW_S = 300
#: How long the first job trains (train.max_seconds): the fast worker must start meanwhile.
LIVE_S = 30


def _skewed(env: dict[str, str], offset_s: int) -> dict[str, str]:
    """``env`` for a process whose wall clock is ``offset_s`` seconds off (its monotonic clock is
    left alone).

    ``FAKETIME_FORCE_MONOTONIC_FIX=0``: libfaketime 0.9.10's default tracks the clock of every
    condition variable in a table that its ``pthread_cond_timedwait`` wrapper updates without a
    lock; a worker whose watchdog thread waits while the main thread imports torch crashed with
    SIGSEGV in 4 of 6 starts here (and 0 of 16 with the fix off; the waits keep their lengths,
    since monotonic time is not faked)."""
    return {
        **env,
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME": f"{offset_s:+d}",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_FORCE_MONOTONIC_FIX": "0",
    }


def test_clock_skew_between_worker_nodes(tmp_path: Path) -> None:
    """Two workers whose clocks are 5 minutes behind and 5 minutes ahead of the database's
    (libfaketime): heartbeats are written and judged on the database's clock, so the fast
    worker's reaper does not requeue the slow worker's live job, and the slow worker's reaper
    requeues the fast worker's job as soon as that worker is SIGKILLed."""
    if not LIBFAKETIME.exists():
        pytest.skip(f"{LIBFAKETIME} missing: apt-get install faketime")
    timeout_s = float(FAST["KRU_HEARTBEAT_TIMEOUT"]) + float(FAST["KRU_REAPER_INTERVAL"])
    logs = tmp_path / "logs"
    with redis_server(tmp_path) as redis, fresh_postgres_database() as database_url:
        env = deployment_env(
            tmp_path / "data", database_url=database_url, broker_url=redis.url, **FAST
        )
        skewed = subprocess.run(
            ["date", "-u", "+%s"], env=_skewed(env, -SKEW_S), capture_output=True, text=True
        )
        assert abs(int(skewed.stdout) + SKEW_S - time.time()) < 5, "libfaketime did not apply"

        def worker(name: str, offset_s: int) -> AbstractContextManager[Process]:
            return started(
                name, kru_argv("worker"), env=_skewed(env, offset_s), cwd=tmp_path, logs=logs
            )

        with (
            started_api(env, cwd=tmp_path, logs=logs) as (api, base_url),
            httpx.Client(base_url=base_url, timeout=30) as client,
        ):
            dep = Deployment(client, api, None, base_url, env)

            def submit(name: str, train: dict) -> str:
                body = job_body(name, steps=train.pop("steps", 1_000_000), checkpoint_every=50)
                body["train"].update(train)
                response = client.post("/v1/jobs", json=body)
                assert response.status_code == 202, response.text
                return response.json()["id"]

            # 1. A live job on the slow worker, judged by the fast worker's reaper.
            with worker("slow", -SKEW_S) as slow:
                slow.wait_worker_ready(timeout=90)
                live = submit("live", {"max_seconds": LIVE_S, "keep_model_on_timeout": True})
                dep.wait_step(live, 1)
                with worker("fast", +SKEW_S) as fast:
                    fast.wait_worker_ready(timeout=90)
                    t_judged = time.time()
                    (job,) = dep.wait_succeeded([live], timeout=120, logs=(slow, fast))
                    watched = parse_time(job["finished_at"]) - t_judged
                    # A false requeue comes at the fast reaper's first sweep (the heartbeat looks
                    # 10 minutes old): a heartbeat timeout of watching is plenty.
                    assert watched > timeout_s, f"the fast reaper watched only {watched:.1f} s"
                    assert job["attempts"] == 1, (job, fast.output()[-3000:])
                    assert "worker lost" not in fast.output() + slow.output()
                    rate = job["progress"]["step"] / LIVE_S
                    # 2. The fast worker runs a job alone and is SIGKILLed; the slow one reaps.
                    slow.stop()
                    lost = submit("lost", {"steps": max(200, int(rate * 20))})
                    dep.wait_step(lost, 60)
                    with worker("slow-2", -SKEW_S) as slow2:
                        slow2.wait_worker_ready(timeout=90)
                        fast.proc.kill()
                        t_kill = time.time()
                        wait_until(
                            lambda: dep.job(lost)["attempts"] == 2,
                            timeout=60,
                            what="the lost job's second attempt",
                        )
                        requeued = time.time() - t_kill
                        (done,) = dep.wait_succeeded([lost], timeout=180, logs=(slow2,))
            dep.assert_never_twice_at_once(live)
            dep.assert_never_twice_at_once(lost)
    assert requeued < timeout_s + 10, requeued
    fault_row(
        "clock-skew",
        submitted=2,
        succeeded=2,
        attempts=f"{job['attempts']}, {done['attempts']}",
        watched_s=f"{watched:.1f}",
        requeued_s=f"{requeued:.1f}",
        skew_s=f"-{SKEW_S}/+{SKEW_S}",
    )
