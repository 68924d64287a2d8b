"""A real API process for the service tests: ``uvicorn --factory app.main:create_app``.

The settings reach the process as ``KRU_*`` variables, exactly as in a deployment; tests talk to
it over HTTP with ``httpx``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from testkit import free_port, stop_process

from app.events import StreamTiming
from app.main import create_app
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ApiServer:
    """A running ``uvicorn`` process serving the app."""

    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30, **kwargs)  # type: ignore[arg-type]

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (uvicorn's graceful shutdown: the lifespan closes the store) and wait."""
        return stop_process(self.proc, timeout, fail=lambda: f"API:\n{self.log()[-4000:]}")


def fast_sse_app() -> FastAPI:
    """The app with job event streams that poll every 0.1 s and send a heartbeat every 0.3 s."""
    return create_app(sse_timing=StreamTiming(poll_interval=0.1, heartbeat_interval=0.3))


def start_api(
    settings: Settings,
    log_path: Path,
    *,
    factory: str = "app.main:create_app",
    timeout: float = 60.0,
) -> ApiServer:
    """Start the API on a free port with ``settings`` and wait until ``/healthz`` answers.

    ``factory``: the app factory uvicorn calls (``api_server:fast_sse_app`` for quick SSE).
    """
    port = free_port()
    here = str(Path(__file__).parent)
    tests = str(Path(__file__).parents[1])  # testkit, imported by this module (fast_sse_app)
    path = os.pathsep.join(p for p in (str(REPO), here, tests, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "uvicorn", factory, "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    log = log_path.open("ab")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    server = ApiServer(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"API exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.base_url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    pytest.fail(f"API not up after {timeout} s:\n{server.log()[-4000:]}")


@contextmanager
def running_api(settings: Settings, log_path: Path, **kwargs: Any) -> Iterator[ApiServer]:
    """``start_api`` for the duration of a ``with`` block."""
    server = start_api(settings, log_path, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def copy_sequence(data: list[int], delay: int) -> list[int]:
    """The copy-memory input of docs/architecture.md "Task encodings" (Arjovsky et al. 2016),
    written out independently of kru_core: 10 data symbols in 1..8, ``delay - 1`` blanks, the
    delimiter 9, 10 blanks."""
    assert len(data) == 10 and all(1 <= s <= 8 for s in data)
    return [*data, *([0] * (delay - 1)), 9, *([0] * 10)]


@dataclass
class Event:
    """One Server-Sent Event (``comment`` set for ``: ...`` lines)."""

    event: str | None = None
    data: Any = None
    id: int | None = None
    comment: str | None = None


def sse_events(response: httpx.Response) -> Iterator[Event]:
    """Parse a ``text/event-stream`` response as it arrives (data is JSON)."""
    current = Event()
    for line in response.iter_lines():
        if line == "":
            if current.event is not None or current.data is not None:
                yield current
            current = Event()
        elif line.startswith(":"):
            yield Event(comment=line[1:].strip())
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                current.event = value
            elif name == "data":
                current.data = json.loads(value)
            elif name == "id":
                current.id = int(value)
