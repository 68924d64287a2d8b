"""``kru serve``: the API plus one worker subprocess on the embedded default, stopped cleanly.

A real ``python -m app.cli serve`` process (uvicorn + a Celery worker subprocess, SQLite store,
SQLAlchemy-transport broker in a temp data dir), driven over HTTP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from testkit import free_port

from worker import service

if TYPE_CHECKING:
    from conftest import ServiceEnv

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def kru_serve(sqlite_env: ServiceEnv, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """Start ``kru serve`` on a free port with the env's settings; killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, **sqlite_env.env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}

    def start() -> tuple[subprocess.Popen[bytes], str, Path]:
        port = free_port()
        log = tmp_path / f"serve-{len(procs)}.log"
        with log.open("wb") as out:
            cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc, f"http://127.0.0.1:{port}", log

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_runs_jobs_and_ctrl_c_stops_api_and_worker_cleanly(
    kru_serve: Callable[[], Any], wait_until: Callable[..., Any]
) -> None:
    proc, base, log = kru_serve()
    wait_until(lambda: healthy(base), timeout=90, what="kru serve to answer /healthz")
    ids = []
    for steps in (20, 1_000_000):
        body = {
            "task": {"kind": "copy", "delay": 5, "eval_size": 64},
            "model": {"cell": "kru", "hidden_size": 16},
            "train": {"steps": steps, "batch_size": 16, "checkpoint_every": 20, "device": "cpu"},
        }
        response = httpx.post(f"{base}/v1/jobs", json=body, timeout=10)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    short, long = ids
    wait_until(
        lambda: service.get_job(short).status == "succeeded", timeout=90, what="the first job"
    )
    wait_until(
        lambda: service.get_job(long).progress.step >= 25,
        timeout=90,
        what="the second job to train",
    )
    worker_pid = int(service.get_job(long).worker.rsplit(":", 1)[1])
    assert alive(worker_pid)

    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(60) == 0, log.read_text()[-3000:]
    assert not alive(worker_pid)  # the worker went with it
    output = log.read_text()
    assert "Traceback" not in output, output[-3000:]
    stopped = service.get_job(long)
    assert stopped.status == "queued", output[-3000:]  # handed back, resumes at the next start
    saved = {p.name for p in (service.settings().jobs_dir / long).iterdir()}
    assert f"step-{stopped.progress.step:09d}" in saved
