"""Issue 11: query strings never reach the access log of a real uvicorn (a key sent there by
mistake stays out of the logs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from api_server import REPO, free_port

from app.logs import REDACTED_QUERY
from worker.settings import Settings

SECRET = "secret1-0123456789"
HEADERS = {"Authorization": f"Bearer {SECRET}"}


def test_query_strings_never_reach_the_access_log(tmp_path: Path) -> None:
    """A real uvicorn with its access log on: the key sent in a query string is not logged."""
    settings = Settings(data_dir=tmp_path / "kru", api_keys=SECRET, reaper_interval=0)
    port = free_port()
    log_path = tmp_path / "api.log"
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(REPO)}
    command = [
        sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "info",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        leaked = httpx.get(f"{base}/v1/jobs?api_key={SECRET}&limit=5", timeout=10)
        assert leaked.status_code == 401
        ok = httpx.get(f"{base}/v1/jobs?limit=5", headers=HEADERS, timeout=10)
        assert ok.status_code == 200
        time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(30)
    text = log_path.read_text()
    assert f'"GET /v1/jobs{REDACTED_QUERY} HTTP/1.1" 401' in text, text
    assert f'"GET /v1/jobs{REDACTED_QUERY} HTTP/1.1" 200' in text, text
    assert SECRET not in text and "limit=5" not in text
