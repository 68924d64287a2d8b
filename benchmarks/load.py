"""Load test of serving: ``kru serve`` against a bare FastAPI echo of the same JSON, same run.

Both servers run as processes under the same uvicorn (``uvicorn.run(app, ...)`` as ``kru serve``
runs it, same log level, one torch thread): the API with a copy-task KRU (hidden 128) trained by
its own worker, and :func:`echo_app`, which parses the same request body with the same pydantic
schema (``app.schemas.PredictRequest``) and answers it. The clients are keep-alive connections
driven by one asyncio loop speaking raw HTTP/1.1 (pre-encoded requests, so the client costs
little and the same for both servers). Measured:

1. **Predict** vs echo: ``--requests`` (10,000) requests of one 100-step copy sequence at 1, 8
   and 32 concurrent clients; requests/s, p50 and p99 of both, their ratios, errors (any
   answer other than 200).
2. **Sessions**: 32 concurrent sessions, each streaming 100-step sequences in 10-step chunks
   (``POST /v1/sessions/{id}/predict``); chunks/s, p50, p99.
3. **10 chunks vs one predict**: one client; a sequence streamed in 10 chunks (a session) vs one
   predict of the whole sequence, median over sequences, for 100, 2,000 and 10,000 steps.

Targets (issue 13): at 32 clients predict throughput >= 0.8x the echo's and p99 <= 1.5x the
echo's; at 1 client p50 within 1.3x; 10 chunks <= 1.5x one predict.

Usage::

    python benchmarks/load.py                         # about 8 minutes on 2 busy cores
    python benchmarks/load.py --requests 2000 --clients 32 --server-env KRU_BATCH_MAX_DELAY_MS=2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.schemas import PredictRequest
from benchmarks.api import (
    PREDICT_DELAY,
    PREDICT_JOB,
    REPO,
    _child_env,
    _free_port,
    _percentile,
    _stop,
    _wait_finished,
    copy_sequence,
)

HOST = "127.0.0.1"
LOG_LEVEL = "warning"


# --- the echo server ----------------------------------------------------------------------------


def echo_app() -> Any:
    """A bare FastAPI app: ``POST /v1/models/{model_id}/predict`` validates the body with the
    API's own ``PredictRequest`` and echoes its inputs as predictions (the HTTP + JSON floor)."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/models/{model_id}/predict")
    async def predict(model_id: str, body: PredictRequest) -> dict[str, Any]:
        return {"model_id": model_id, "predictions": body.inputs}

    return app


def serve_echo(port: int) -> None:
    """Run :func:`echo_app` the way ``kru serve`` runs the API (``uvicorn.run``)."""
    import uvicorn

    uvicorn.run(echo_app(), host=HOST, port=port, log_level=LOG_LEVEL)


# --- processes ----------------------------------------------------------------------------------


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} was not up in 120 s; see {log}")


@contextmanager
def servers(root: Path, server_env: dict[str, str]) -> Iterator[tuple[int, int]]:
    """``kru serve`` (embedded default) and the echo server; yields their ports."""
    api_port, echo_port = _free_port(), _free_port()
    env = _child_env({"KRU_DATA_DIR": str(root / "data"), "KRU_LOG_LEVEL": "WARNING"}, 1)
    env.update(server_env)
    api_log, echo_log = root / "serve.log", root / "echo.log"
    with api_log.open("ab") as out:
        api = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", HOST, "--port", str(api_port)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    with echo_log.open("ab") as out:
        echo = subprocess.Popen(
            [sys.executable, __file__, "--serve-echo", str(echo_port)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait_http(f"http://{HOST}:{api_port}/readyz", api, "kru serve", api_log)
        _wait_http(f"http://{HOST}:{echo_port}/docs", echo, "the echo server", echo_log)
        yield api_port, echo_port
    finally:
        _stop(api)
        _stop(echo)


# --- a small keep-alive HTTP/1.1 client ---------------------------------------------------------


def encode_post(path: str, body: Any, port: int) -> bytes:
    """A complete ``POST`` request with a JSON body, ready to write."""
    data = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


class Connection:
    """One keep-alive connection; :meth:`send` writes a request and reads its answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


class _Tally:
    """The latencies and errors (answers other than 200) of a load's timed requests."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0

    async def send(self, connection: Connection, raw: bytes) -> None:
        """Send ``raw`` on ``connection``, timed."""
        start = time.perf_counter()
        status, _ = await connection.send(raw)
        self.latencies.append(time.perf_counter() - start)
        self.errors += status != 200

    async def run(
        self, connections: list[Connection], client: Callable[[Connection], Awaitable[None]]
    ) -> dict[str, float]:
        """Run ``client`` on every connection concurrently, close them, and summarise: requests,
        errors, requests/s over the whole run, p50 and p99 latency (s)."""
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in connections))
        elapsed = time.perf_counter() - start
        for connection in connections:
            connection.close()
        return {
            "n": len(self.latencies),
            "errors": self.errors,
            "throughput": len(self.latencies) / elapsed,
            "p50": _percentile(self.latencies, 0.50),
            "p99": _percentile(self.latencies, 0.99),
        }


async def _drive(port: int, raw: bytes, clients: int, requests: int) -> dict[str, float]:
    connections = [await Connection.open(port) for _ in range(clients)]
    for connection in connections:  # warm each connection
        for _ in range(3):
            await connection.send(raw)
    tally = _Tally()
    remaining = requests

    async def client(connection: Connection) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await tally.send(connection, raw)

    return await tally.run(connections, client)


def drive(port: int, path: str, body: Any, *, clients: int, requests: int) -> dict[str, float]:
    """``requests`` POSTs of ``body`` from ``clients`` concurrent keep-alive connections."""
    return asyncio.run(_drive(port, encode_post(path, body, port), clients, requests))


# --- sessions -----------------------------------------------------------------------------------


async def _session_load(
    port: int, model_id: str, sequence: list[int], *, sessions: int, chunks: int, chunk: int
) -> dict[str, float]:
    tally = _Tally()
    remaining = chunks

    async def stream(connection: Connection) -> None:
        nonlocal remaining
        while remaining > 0:
            _, body = await connection.send(
                encode_post(f"/v1/models/{model_id}/sessions", {"ttl_seconds": 120}, port)
            )
            session_id = json.loads(body)["id"]
            for position in range(0, len(sequence), chunk):
                if remaining <= 0:
                    break
                remaining -= 1
                raw = encode_post(
                    f"/v1/sessions/{session_id}/predict",
                    {"inputs": sequence[position : position + chunk], "position": position},
                    port,
                )
                await tally.send(connection, raw)
            await connection.send(
                f"DELETE /v1/sessions/{session_id} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                "Content-Length: 0\r\n\r\n".encode()
            )

    connections = [await Connection.open(port) for _ in range(sessions)]
    return await tally.run(connections, stream)


async def _chunks_vs_whole(
    port: int, model_id: str, sequence: list[int], *, repeats: int, pieces: int = 10
) -> tuple[float, float]:
    """Median seconds of one predict of ``sequence`` and of streaming it in ``pieces`` chunks
    (session creation not counted, deletion neither)."""
    connection = await Connection.open(port)
    whole_raw = encode_post(f"/v1/models/{model_id}/predict", {"inputs": [sequence]}, port)
    size = -(-len(sequence) // pieces)
    whole, chunked = [], []
    for i in range(repeats + 3):
        start = time.perf_counter()
        status, _ = await connection.send(whole_raw)
        if i >= 3:
            whole.append(time.perf_counter() - start)
        assert status == 200
        status, body = await connection.send(
            encode_post(f"/v1/models/{model_id}/sessions", {}, port)
        )
        session_id = json.loads(body)["id"]
        requests = [
            encode_post(
                f"/v1/sessions/{session_id}/predict",
                {"inputs": sequence[p : p + size], "position": p},
                port,
            )
            for p in range(0, len(sequence), size)
        ]
        start = time.perf_counter()
        for raw in requests:
            status, _ = await connection.send(raw)
            assert status == 200, status
        if i >= 3:
            chunked.append(time.perf_counter() - start)
    connection.close()
    return statistics.median(whole), statistics.median(chunked)


# --- main ---------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="requests per level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--session-chunks", type=int, default=3200, help="chunks, 32 sessions")
    parser.add_argument("--repeats", type=int, default=30, help="10 chunks vs one predict")
    parser.add_argument(
        "--server-env", nargs="*", default=[], metavar="KRU_X=V", help="settings of kru serve"
    )
    parser.add_argument("--serve-echo", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_echo:
        serve_echo(args.serve_echo)
        return 0
    server_env = dict(item.split("=", 1) for item in args.server_env)

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs (shared), load average "
          f"{os.getloadavg()[0]:.1f}; kru serve settings {server_env or 'defaults'}")  # fmt: skip
    sequence = copy_sequence(PREDICT_DELAY)
    body = {"inputs": [sequence]}
    with (
        tempfile.TemporaryDirectory(prefix="kru-load-") as tmp,
        servers(Path(tmp), server_env) as (api_port, echo_port),
    ):
        with httpx.Client(base_url=f"http://{HOST}:{api_port}", timeout=60) as client:
            job = client.post("/v1/jobs", json=PREDICT_JOB).json()
            model_id = _wait_finished(client, job["id"])["model_id"]
        path = f"/v1/models/{model_id}/predict"
        levels = {}
        for n in args.clients:
            levels[n] = {
                "predict": drive(api_port, path, body, clients=n, requests=args.requests),
                "echo": drive(echo_port, path, body, clients=n, requests=args.requests),
            }
            print(f"  {n} clients done (load average {os.getloadavg()[0]:.1f})", flush=True)
        sessions = asyncio.run(
            _session_load(api_port, model_id, sequence, sessions=32,
                          chunks=args.session_chunks, chunk=10)
        )  # fmt: skip
        chunks = {
            n: asyncio.run(
                _chunks_vs_whole(
                    api_port, model_id, (sequence * (n // 100))[:n], repeats=args.repeats
                )
            )
            for n in (100, 2000, 10_000)
        }

    print(f"\nPredict (one {len(sequence)}-step copy sequence, KRU hidden 128, CPU) vs the echo "
          f"of the same JSON, {args.requests} requests per level")  # fmt: skip
    print("| clients | predict req/s | echo req/s | ratio | predict p50 ms | echo p50 ms | ratio "
          "| predict p99 ms | echo p99 ms | ratio | errors |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, level in levels.items():
        p, e = level["predict"], level["echo"]
        print(f"| {n} | {p['throughput']:.0f} | {e['throughput']:.0f} | "
              f"{p['throughput'] / e['throughput']:.2f} | {_ms(p['p50'])} | {_ms(e['p50'])} | "
              f"{p['p50'] / e['p50']:.2f} | {_ms(p['p99'])} | {_ms(e['p99'])} | "
              f"{p['p99'] / e['p99']:.2f} | {int(p['errors'] + e['errors'])} |")  # fmt: skip
    print(f"\nSessions: 32 concurrent sessions, 10-step chunks: {sessions['n']} chunks, "
          f"{sessions['throughput']:.0f} chunks/s, p50 {_ms(sessions['p50'])} ms, "
          f"p99 {_ms(sessions['p99'])} ms, errors {int(sessions['errors'])}")  # fmt: skip
    print("\nOne sequence in 10 chunks (a session) vs one predict of it, one client, median of "
          f"{args.repeats}")  # fmt: skip
    print("| steps | one predict ms | 10 chunks ms | ratio |")
    print("|---|---|---|---|")
    for n, (whole, chunked) in chunks.items():
        print(f"| {n} | {_ms(whole)} | {_ms(chunked)} | {chunked / whole:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
