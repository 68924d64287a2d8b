"""Shared fixtures of the service tests: isolated backends and real worker subprocesses.

Fixtures (all function-scoped, every test gets its own world):

``service_env`` (parametrized ``sqlite`` / ``redis_pg``)
    A :class:`ServiceEnv`: the embedded default (SQLite job store and kombu's SQLAlchemy broker
    in a temp data dir), or Redis + PostgreSQL (a fresh PostgreSQL database and a unique Redis
    queue name for this test, dropped and deleted afterwards). ``worker.service`` is initialised
    with its settings in this process. Use ``env.settings`` for ``create_app(env.settings)``.
    ``redis_pg`` is skipped when Redis or PostgreSQL is not running (``scripts/services``).
``sqlite_env``, ``redis_pg_env``
    The same, for one backend only.
``worker_process``
    A factory: ``worker_process(env, **overrides) -> WorkerProcess`` starts ``python -m worker``
    (a real Celery worker, ``--pool solo``) with the env's ``KRU_*`` variables (``overrides``:
    settings fields to change, e.g. ``max_attempts=1``). Every worker still running at the end
    of the test is killed (the test's store and broker are thrown away anyway).
``wait_until``
    ``wait_until(predicate, timeout=..., what=...)``: poll until ``predicate()`` returns a truthy
    value (returned) or fail the test after ``timeout`` seconds. Every wait has a timeout. The
    function itself is ``testkit.wait_until``.
``small_copy_config``
    ``worker_helpers.copy_config``: a tiny copy-task :class:`~kru_core.config.JobConfig`.

Settings are tuned for fast tests: heartbeat every 0.3 s, a job is lost after 3 s without one,
the reaper sweeps every 0.5 s, progress is written at most every 0.2 s.

Example (the two functions imported, rather than requested as fixtures)::

    from testkit import wait_until
    from worker_helpers import copy_config

    def test_runs(service_env, worker_process):
        worker_process(service_env)
        job = service.submit_job(copy_config())
        wait_until(lambda: service.get_job(job.id).status == "succeeded", timeout=60)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import testkit
from testkit import stop_process
from worker_helpers import copy_config

from kru_core.config import JobConfig
from worker import service
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"

#: Test timings (see the module docstring).
FAST = {
    "heartbeat_interval": 0.3,
    "heartbeat_timeout": 3.0,
    "reaper_interval": 0.5,
    "progress_interval": 0.2,
    "log_level": "INFO",
}

T = TypeVar("T")


@dataclass
class ServiceEnv:
    """One isolated job system: its settings, and the same as ``KRU_*`` variables."""

    backend: str
    settings: Settings
    data_dir: Path

    @property
    def env(self) -> dict[str, str]:
        return self.settings.to_env()

    def with_overrides(self, **overrides: Any) -> Settings:
        return self.settings.model_copy(update=overrides)


@dataclass
class WorkerProcess:
    """A ``python -m worker`` subprocess; its output goes to ``log_path``."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    settings: Settings
    _log: Any = field(repr=False, default=None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for Celery's ``ready.`` line (the worker consumes from now on)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log():
                return
            if not self.alive:
                pytest.fail(f"worker exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.1)
        pytest.fail(f"worker not ready after {timeout} s:\n{self.log()[-4000:]}")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (Celery's warm shutdown) and wait for the exit status."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the worker dies at once, mid-job, with no chance to clean up."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return stop_process(self.proc, 0, fail=lambda: f"worker:\n{self.log()[-4000:]}")

    def close(self) -> None:
        # The test's store and broker are thrown away: no need for a graceful (slow) shutdown.
        if self.alive:
            self.proc.kill()
            self.proc.wait(10)
        if self._log is not None:
            self._log.close()


# --- backends -----------------------------------------------------------------------------------


def _sqlite_settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, database_url="", broker_url="", **FAST)


@pytest.fixture
def sqlite_env(tmp_path: Path) -> Iterator[ServiceEnv]:
    """The embedded default: SQLite store and SQLAlchemy-transport broker in a temp data dir."""
    env = ServiceEnv("sqlite", _sqlite_settings(tmp_path / "kru"), tmp_path / "kru")
    service.init(env.settings)
    yield env
    service.shutdown()


def _postgres_and_redis_up() -> str | None:
    import psycopg
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except Exception as exc:
        return f"Redis not reachable at {REDIS_URL} ({exc}); run scripts/services"
    try:
        psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=2).close()
    except Exception as exc:
        return f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL} ({exc}); run scripts/services"
    return None


@pytest.fixture
def redis_pg_env(tmp_path: Path) -> Iterator[ServiceEnv]:
    """Redis broker (a unique queue) and a fresh PostgreSQL database, both removed afterwards."""
    import psycopg
    import redis

    reason = _postgres_and_redis_up()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:12]
    database = f"kru_test_{tag}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    settings = Settings(
        data_dir=tmp_path / "kru",
        database_url=POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}",
        broker_url=REDIS_URL,
        queue_name=f"kru-test-{tag}",
        **FAST,
    )
    env = ServiceEnv("redis_pg", settings, tmp_path / "kru")
    service.init(settings)
    try:
        yield env
    finally:
        service.shutdown()
        client = redis.Redis.from_url(REDIS_URL)
        client.delete(settings.queue_name, f"_kombu.binding.{settings.queue_name}")
        client.close()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "redis_pg"])
def service_env(request: pytest.FixtureRequest) -> ServiceEnv:
    """Each backend in turn: the embedded default, then Redis + PostgreSQL."""
    return request.getfixturevalue(f"{request.param}_env")


# --- workers ------------------------------------------------------------------------------------


@pytest.fixture
def worker_process(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real worker subprocesses; all are stopped at the end of the test."""
    started: list[WorkerProcess] = []

    def start(env: ServiceEnv, **overrides: Any) -> WorkerProcess:
        settings = env.with_overrides(**overrides) if overrides else env.settings
        log_path = tmp_path / f"worker-{len(started)}.log"
        log = log_path.open("wb")
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        # one thread: tiny models gain nothing from more, and the tests share the CPU
        child_env = {**os.environ, **settings.to_env(), "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker"],
            cwd=REPO,
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        worker = WorkerProcess(proc, log_path, settings, log)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


@pytest.fixture
def wait_until() -> Callable[..., Any]:
    """``wait_until(predicate, timeout=30, interval=0.1, what="...")`` (see module docstring)."""
    return testkit.wait_until


# --- configs ------------------------------------------------------------------------------------


@pytest.fixture
def small_copy_config() -> Callable[..., JobConfig]:
    """``small_copy_config(steps=200, delay=5, **train_overrides) -> JobConfig``."""
    return copy_config
