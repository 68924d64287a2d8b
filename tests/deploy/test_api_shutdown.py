"""``kru api`` on SIGTERM (``docker compose stop``, an upgrade, a scale-down) finishes the requests
in flight before it exits: it stops accepting connections, answers the request it is reading,
then exits 0.
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import time
from pathlib import Path

import pytest

from .processes import CLEAN_EXIT, clean_env, free_port, kru_argv, started, wait_ready, wait_until

pytestmark = pytest.mark.timeout(180)

JOB = {
    "name": "in-flight",
    "task": {"kind": "copy", "delay": 5},
    "model": {"cell": "kru", "hidden_size": 16},
    "train": {"steps": 10, "batch_size": 4},
}


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    headers = {k.lower(): v for k, v in headers.items()}
    return int(status_line.split()[1]), headers, body


def test_sigterm_finishes_the_request_in_flight(tmp_path: Path) -> None:
    api_key = secrets.token_hex(16)
    port = free_port()
    env = clean_env(KRU_DATA_DIR=str(tmp_path / "data"), KRU_API_KEYS=api_key)
    home = tmp_path / "api"
    home.mkdir()
    with started(
        "api", kru_argv("api", port=port), env=env, cwd=home, logs=tmp_path / "logs"
    ) as api:
        wait_ready(api, f"http://127.0.0.1:{port}")
        body = json.dumps(JOB).encode()
        head = (
            f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            # The request is in flight: headers and half the body are sent, the app is reading.
            sock.sendall(head + body[: len(body) // 2])
            time.sleep(0.5)
            api.proc.send_signal(signal.SIGTERM)
            # Shutdown has begun: no new connections are accepted ...
            wait_until(lambda: _refused(port), timeout=15, what="the API to stop listening")
            assert api.proc.poll() is None, "kru api exited with a request in flight"
            # ... but the request in flight is read to its end and answered.
            sock.sendall(body[len(body) // 2 :])
            status, headers, payload = _read_response(sock)
        assert status == 202, payload
        assert json.loads(payload)["status"] == "queued"
        assert len(payload) == int(headers["content-length"])  # whole, then the server closed
        # Then it exits: 0, or (uvicorn re-raises the signal it handled) "terminated by SIGTERM".
        assert api.proc.wait(30) in CLEAN_EXIT, api.output()[-3000:]
