"""Run the deployment's processes without Docker: the containers' commands, a private Redis
configured as compose configures it, a fresh PostgreSQL database, a shared data directory."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from testkit import free_port, stop_process, wait_until

from .specs import container_command

__all__ = ["free_port", "wait_until"]  # re-exported: the deploy tests import them from here

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
KRU = Path(sys.executable).with_name("kru")
T = TypeVar("T")
#: Exit statuses of a graceful stop: 0, or death by the SIGTERM that uvicorn re-raises once it
#: has shut down (what a shell or Docker reports as 143).
CLEAN_EXIT = (0, -signal.SIGTERM)


def kru_argv(
    target: str, *, host: str = "127.0.0.1", port: int | None = None, kru: Path = KRU
) -> list[str]:
    """The command of the ``target`` image, run with the ``kru`` executable (default: this
    virtualenv's); for the API, on a local address and a free port instead of 0.0.0.0:8000 (the
    only two words that differ)."""
    argv = container_command(target)
    assert argv[0] == "kru"
    argv = [str(kru), *argv[1:]]
    if "--host" in argv:
        argv[argv.index("--host") + 1] = host
    if "--port" in argv and port is not None:
        argv[argv.index("--port") + 1] = str(port)
    return argv


def clean_env(**kru: str) -> dict[str, str]:
    """This process's environment without any ``KRU_`` variable, plus ``kru``'s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRU_")}
    return {**env, **kru}


def deployment_env(
    data_dir: Path, *, database_url: str, broker_url: str, **kru: str
) -> dict[str, str]:
    """The environment of the deployment's processes (:func:`clean_env`): ``data_dir`` as the
    shared data volume (created if missing), the job store and the broker, plus ``kru``'s."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return clean_env(
        KRU_DATA_DIR=str(data_dir), KRU_DATABASE_URL=database_url, KRU_BROKER_URL=broker_url, **kru
    )


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait; SIGKILL after ``timeout`` s. Returns the exit code."""
        return stop_process(self.proc, timeout)

    def wait_worker_ready(self, timeout: float = 120) -> None:
        """For a ``kru worker``: wait for Celery's ``<name>@<host> ready.`` line (it consumes
        from then on); fail the test if the process exits first."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")
            return re.search(r"@\S+ ready\.", self.output()) is not None

        wait_until(ready, timeout=timeout, what=f"{self.name} to be ready")


@contextmanager
def started(
    name: str, argv: list[str], *, env: dict[str, str], cwd: Path, logs: Path
) -> Iterator[Process]:
    """Start ``argv`` (its own session, output to ``logs/<name>.log``); stop it on exit."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    process = Process(name, proc, log)
    try:
        yield process
    finally:
        process.stop()


@contextmanager
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis server of its own, configured as the compose ``redis`` service (append-only file,
    ``noeviction``, a password); yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (scripts/services needs it too)")
    port, password = free_port(), secrets.token_hex(16)
    workdir = tmp_path / "redis"
    workdir.mkdir()
    argv = [
        binary,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(workdir),
        "--appendonly", "yes",
        "--maxmemory-policy", "noeviction",
        "--requirepass", password,
        "--save", "",
    ]  # fmt: skip
    with started("redis", argv, env=dict(os.environ), cwd=workdir, logs=tmp_path / "logs") as p:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, password=password)

        def pong() -> bool:
            if p.proc.poll() is not None:
                pytest.fail(f"redis-server exited:\n{p.output()}")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(pong, timeout=20, what="redis-server")
        client.close()
        yield f"redis://:{password}@127.0.0.1:{port}/0"


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new database in the local PostgreSQL (``scripts/services``); dropped afterwards."""
    import psycopg

    try:
        psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL} ({exc}); scripts/services")
    database = f"kru_topology_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@contextmanager
def redis_and_postgres(tmp_path: Path, data_dir: Path, **kru: str) -> Iterator[dict[str, str]]:
    """A :func:`private_redis` and a :func:`fresh_postgres_database`: yields the
    :func:`deployment_env` of processes on them that share ``data_dir``, plus ``kru``'s."""
    with private_redis(tmp_path) as broker_url, fresh_postgres_database() as database_url:
        yield deployment_env(data_dir, database_url=database_url, broker_url=broker_url, **kru)


def wait_ready(api: Process, base_url: str, *, timeout: float = 90) -> None:
    """Wait for ``GET /readyz`` to answer 200 (compose's healthcheck of the api service)."""

    def ready() -> bool:
        if api.proc.poll() is not None:
            pytest.fail(f"kru api exited with {api.proc.returncode}:\n{api.output()}")
        try:
            return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, timeout=timeout, what=f"{base_url}/readyz")


@contextmanager
def started_api(
    env: dict[str, str],
    *,
    cwd: Path,
    logs: Path,
    name: str = "api",
    port: int | None = None,
    kru: Path = KRU,
) -> Iterator[tuple[Process, str]]:
    """The api image's command (:func:`kru_argv`) on ``port`` (default: a free one), started as
    :func:`started` starts it; yields the process and its base URL once it is ready
    (:func:`wait_ready`)."""
    port = free_port() if port is None else port
    base_url = f"http://127.0.0.1:{port}"
    with started(name, kru_argv("api", port=port, kru=kru), env=env, cwd=cwd, logs=logs) as api:
        wait_ready(api, base_url)
        yield api, base_url
