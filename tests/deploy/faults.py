"""Servers and processes that fault tests kill and start again: a private Redis and a private
PostgreSQL on free ports in temp directories (never the machine's shared ones), and a process
kept running the way compose's ``restart: unless-stopped`` keeps a container running.

Reuses :mod:`tests.deploy.processes` (``free_port``, ``wait_until``, ``kru_argv``); each helper is
a context manager that leaves nothing running.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from worker.runner import stop_gracefully

from .processes import free_port, wait_until


def _popen(argv: list[str], log: Path, **kwargs: object) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process and everything in its session (PostgreSQL's backends too)."""
    if proc.poll() is None:
        with_group = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            with_group = False
        if not with_group:
            proc.kill()
    proc.wait(10)


class _Server:
    """A server process of a fault test, started by the subclass, logging to :attr:`log`."""

    name: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def _assert_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            pytest.fail(f"{self.name} is not running:\n{self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL the server and every process of its session at once: no shutdown (what the
        server kept on disk is what survives)."""
        assert self.proc is not None
        _kill_group(self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)


class RedisServer(_Server):
    """A private ``redis-server`` as compose runs it (append-only file, ``noeviction``, a
    password), on a fixed free port and directory so that it restarts with its data. Killed, it
    makes no final save: the append-only file is what survives."""

    name = "redis-server"

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (scripts/services needs it too)")
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.log = workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.workdir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--maxmemory-policy", "noeviction",
            "--requirepass", self.password,
            "--save", "",
        ]  # fmt: skip
        self.proc = _popen(argv, self.log, cwd=self.workdir)
        wait_until(self.answers, timeout=20, what="redis-server to answer")

    def answers(self) -> bool:
        import redis

        self._assert_running()
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password)
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False
        finally:
            client.close()


@contextmanager
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`; killed on exit."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class PostgresServer(_Server):
    """A private PostgreSQL cluster (``initdb`` in a temp directory, trust auth on 127.0.0.1, a
    free port). Run as the ``postgres`` user when the tests run as root (PostgreSQL refuses
    root). Killed, the postmaster and every backend die at once: a crash, recovered at the next
    start."""

    name = "postgres"

    def __init__(self) -> None:
        self.bindir = _postgres_bindir()
        # Not under pytest's tmp_path: its parents are private to root, the server's user must
        # reach the data directory.
        self.root = Path(tempfile.mkdtemp(prefix="kru-faults-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.log = self.root / "postgres.log"
        self._user: dict[str, object] = {}
        if os.geteuid() == 0:
            import pwd

            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                   "--auth=trust", "-E", "UTF8", "--no-sync"])  # fmt: skip

    def _run(self, argv: list[str]) -> None:
        subprocess.run(argv, check=True, capture_output=True, cwd=self.root, **self._user)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        argv = [
            str(self.bindir / "postgres"),
            "-D", str(self.data),
            "-p", str(self.port),
            "-k", str(self.root),
            "-c", "listen_addresses=127.0.0.1",
            "-c", "fsync=off",  # a killed process loses nothing the OS has; tests need speed
            "-c", "max_connections=50",
        ]  # fmt: skip
        self.log.touch()
        if self._user:
            os.chown(self.log, self._user["user"], self._user["group"])  # type: ignore[arg-type]
        self.proc = _popen(argv, self.log, cwd=self.root, **self._user)
        wait_until(self.answers, timeout=30, what="PostgreSQL to accept connections")

    def answers(self) -> bool:
        import psycopg

        self._assert_running()
        try:
            psycopg.connect(
                f"postgresql://postgres@127.0.0.1:{self.port}/postgres", connect_timeout=2
            ).close()
        except psycopg.OperationalError:
            return False
        return True

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _postgres_bindir() -> Path:
    found = shutil.which("postgres") or shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    pytest.skip("PostgreSQL's initdb/postgres are not installed")


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A started :class:`PostgresServer`; killed and removed on exit."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@dataclass
class Supervised:
    """A process restarted whenever it exits, as compose's ``restart: unless-stopped`` does
    (1 s later); :attr:`exits` records each exit status, :attr:`pids` each process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path
    exits: list[int] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    restarted_at: list[float] = field(default_factory=list)
    _proc: subprocess.Popen[bytes] | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self._spawn()
        threading.Thread(target=self._watch, name=f"supervise-{self.name}", daemon=True).start()

    def _spawn(self) -> None:
        with self._lock:
            self._proc = _popen(self.argv, self.log, env=self.env, cwd=self.cwd)
            self.pids.append(self._proc.pid)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            proc = self._proc
            assert proc is not None
            code = proc.wait()
            if self._stopping.is_set():
                return
            self.exits.append(code)
            if self._stopping.wait(1.0):
                return
            self.restarted_at.append(time.monotonic())
            self._spawn()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the current process (the supervisor starts the next one)."""
        assert self._proc is not None
        self._proc.kill()

    def stop(self, timeout: float = 30) -> None:
        """Stop supervising, SIGTERM, wait, SIGKILL after ``timeout`` s."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
        stop_gracefully(proc, timeout, _kill_group)


@contextmanager
def supervised(
    name: str, argv: list[str], *, env: dict[str, str], cwd: Path, logs: Path
) -> Iterator[Supervised]:
    """Start ``argv`` under a :class:`Supervised` restart policy; stopped on exit."""
    logs.mkdir(parents=True, exist_ok=True)
    process = Supervised(name, argv, env, cwd, logs / f"{name}.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()


def fault_row(fault: str, **numbers: object) -> str:
    """One row of docs/deploy.md's fault table, printed by each fault test (``-s`` shows it)."""
    cells = " | ".join(f"{k}={v}" for k, v in numbers.items())
    line = f"FAULT {fault} | {cells}"
    print(line, flush=True)
    return line
