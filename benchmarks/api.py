"""HTTP API latency: submit-to-running with a warm worker, and the predict route, side by side.

Everything is real: a ``uvicorn`` process serving ``app.main:create_app``, a Celery worker
subprocess (``python -m worker``, solo pool), the job store and the broker. Two measurements:

1. **Submit to running** (Redis broker + PostgreSQL store, the deployment; and the embedded
   default, SQLite + kombu's SQLAlchemy transport, which polls): after a warm-up job, each trial
   submits a tiny job over HTTP and polls ``GET /v1/jobs/{id}`` every 5 ms until it reads
   ``running``. Reported: the client-observed time (POST sent -> ``running`` seen) and the
   server-side ``started_at - created_at``. Each trial waits for the job to end first, so the
   worker is idle when the next one is submitted. Target (Redis): 2 s or less.
2. **Predict**: one 100-step copy-task sequence (delay 80) to ``POST /v1/models/{id}/predict``
   of a KRU model (hidden 128) on CPU, with 1, 8 and 32 concurrent clients (one keep-alive
   connection each). Reported: p50 / p99 latency and throughput; the API's own mean time in the
   predictor (validation and forward pass, from its ``/metrics``); the model's time for the same
   call in this process (``LoadedModel.predict``) and ``GET /healthz`` (HTTP alone), so the rest
   is queueing, JSON and HTTP. Target: p50 under 10 ms with one client.

Usage::

    python benchmarks/api.py                    # both, about 2 minutes on 2 cores
    python benchmarks/api.py --skip-embedded --trials 20 --requests 500
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"

TINY_JOB = {
    "task": {"kind": "copy", "delay": 5, "eval_size": 16},
    "model": {"cell": "kru", "hidden_size": 16},
    "train": {"steps": 5, "batch_size": 8, "eval_every": 5, "checkpoint_every": 5},
}
PREDICT_DELAY = 80  # copy sequences of delay + 20 = 100 steps
PREDICT_JOB = {
    "name": "bench-predict",
    "task": {"kind": "copy", "delay": PREDICT_DELAY, "eval_size": 16},
    "model": {"cell": "kru", "hidden_size": 128},
    "train": {"steps": 5, "batch_size": 8, "eval_every": 5, "checkpoint_every": 5},
}


# --- processes ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child_env(env: dict[str, str], threads: int) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **env, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads)}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def running_service(env: dict[str, str], log_dir: Path, *, api_threads: int) -> Iterator[str]:
    """An API process and a worker process with ``env`` (``KRU_*``); yields the base URL."""
    port = _free_port()
    api_log = (log_dir / "api.log").open("ab")
    worker_log = (log_dir / "worker.log").open("ab")
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=REPO, env=_child_env(env, api_threads), stdout=api_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker"],
        cwd=REPO, env=_child_env(env, 1), stdout=worker_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if api.poll() is not None or worker.poll() is not None:
                raise SystemExit(f"a process exited; see the logs in {log_dir}")
            try:
                if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the API was not ready in 120 s; see {log_dir}")
            time.sleep(0.2)
        yield base_url
    finally:
        _stop(api)
        _stop(worker)
        api_log.close()
        worker_log.close()


@contextmanager
def redis_postgres_env(data_dir: Path) -> Iterator[dict[str, str]]:
    """``KRU_*`` variables for Redis and a fresh PostgreSQL database (dropped afterwards)."""
    import psycopg
    import redis

    tag = uuid.uuid4().hex[:12]
    database, queue = f"kru_bench_{tag}", f"kru-bench-{tag}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    try:
        yield {
            "KRU_DATA_DIR": str(data_dir),
            "KRU_DATABASE_URL": POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}",
            "KRU_BROKER_URL": REDIS_URL,
            "KRU_QUEUE_NAME": queue,
        }
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        client.delete(queue, f"_kombu.binding.{queue}")
        client.close()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


# --- measurements -------------------------------------------------------------------------------


def _wait_finished(client: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            if job["status"] != "succeeded":
                raise SystemExit(f"job {job_id} ended {job['status']}: {job['error']}")
            return job
        time.sleep(0.05)
    raise SystemExit(f"job {job_id} did not finish in {timeout} s")


def submit_to_running(base_url: str, trials: int) -> dict[str, list[float]]:
    """Client-observed and server-side submit-to-running times (seconds), one per trial."""
    observed, server = [], []
    with httpx.Client(base_url=base_url, timeout=30) as client:
        _wait_finished(client, client.post("/v1/jobs", json=TINY_JOB).json()["id"])  # warm-up
        for _ in range(trials):
            start = time.perf_counter()
            job = client.post("/v1/jobs", json=TINY_JOB).json()
            while True:
                seen = client.get(f"/v1/jobs/{job['id']}").json()
                if seen["status"] != "queued":
                    observed.append(time.perf_counter() - start)
                    break
                time.sleep(0.005)
            done = _wait_finished(client, job["id"])
            created = datetime.fromisoformat(done["created_at"])
            started = datetime.fromisoformat(done["started_at"])
            server.append((started - created).total_seconds())
    return {"observed": observed, "server": server}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def http_floor(base_url: str, requests: int) -> float:
    """Median time of ``GET /healthz`` from one keep-alive client (s): the cost of HTTP alone."""
    times = []
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for _ in range(requests):
            start = time.perf_counter()
            client.get("/healthz").raise_for_status()
            times.append(time.perf_counter() - start)
    return statistics.median(times[10:])


def _server_predict_time(base_url: str) -> tuple[float, float]:
    """``(sum, count)`` of the API's ``kru_predict_duration_seconds{operation="predict"}``."""
    values = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=30).text.splitlines():
        for suffix in ("sum", "count"):
            if line.startswith(f'kru_predict_duration_seconds_{suffix}{{operation="predict"}}'):
                values[suffix] = float(line.rsplit(" ", 1)[1])
    return values.get("sum", 0.0), values.get("count", 0.0)


def predict_latency(
    base_url: str, model_id: str, sequence: list[int], *, clients: int, requests: int
) -> dict[str, float]:
    """p50 / p99 latency (s), throughput (requests/s) and the server's mean model time (s, from
    its ``/metrics``) with ``clients`` concurrent clients."""
    body = {"inputs": [sequence]}
    url = f"/v1/models/{model_id}/predict"
    latencies: list[float] = []
    lock = threading.Lock()
    per_client = max(1, requests // clients)
    barrier = threading.Barrier(clients)

    def run() -> None:
        mine = []
        with httpx.Client(base_url=base_url, timeout=60) as client:
            for _ in range(5):  # warm the connection
                client.post(url, json=body).raise_for_status()
            barrier.wait()
            for _ in range(per_client):
                start = time.perf_counter()
                client.post(url, json=body).raise_for_status()
                mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    sum_before, count_before = _server_predict_time(base_url)
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    sum_after, count_after = _server_predict_time(base_url)
    return {
        "server": (sum_after - sum_before) / max(1.0, count_after - count_before),
        "p50": _percentile(latencies, 0.50),
        "p99": _percentile(latencies, 0.99),
        "throughput": len(latencies) / elapsed,
        "n": len(latencies),
    }


def in_process_predict(checkpoint: Path, sequence: list[int], repeats: int) -> float:
    """Median time of ``LoadedModel.predict`` on the same input in this process (s)."""
    import torch

    from kru_core.inference import LoadedModel

    torch.set_num_threads(1)
    model = LoadedModel.from_checkpoint(checkpoint)
    for _ in range(5):
        model.predict([sequence])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict([sequence])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_sequence(delay: int) -> list[int]:
    data = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    return [*data, *([0] * (delay - 1)), 9, *([0] * 10)]


# --- main ---------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="submit-to-running trials")
    parser.add_argument("--requests", type=int, default=320, help="predict requests per level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--api-threads", type=int, default=1, help="torch threads of the API")
    parser.add_argument("--skip-embedded", action="store_true", help="Redis + PostgreSQL only")
    args = parser.parse_args(argv)

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, API torch threads "
          f"{args.api_threads}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kru-bench-") as tmp:
        root = Path(tmp)
        (root / "redis").mkdir()
        with (
            redis_postgres_env(root / "redis" / "data") as env,
            running_service(env, root / "redis", api_threads=args.api_threads) as base_url,
        ):
            redis_times = submit_to_running(base_url, args.trials)
            with httpx.Client(base_url=base_url, timeout=30) as client:
                job = _wait_finished(client, client.post("/v1/jobs", json=PREDICT_JOB).json()["id"])
                model_id = job["model_id"]
            sequence = copy_sequence(PREDICT_DELAY)
            assert len(sequence) == 100
            levels = {
                n: predict_latency(base_url, model_id, sequence, clients=n, requests=args.requests)
                for n in args.clients
            }
            floor = http_floor(base_url, requests=200)
            checkpoint = root / "redis" / "data" / "jobs" / job["id"]
            model_time = in_process_predict(checkpoint, sequence, repeats=200)

        embedded_times = None
        if not args.skip_embedded:
            (root / "embedded").mkdir()
            env = {"KRU_DATA_DIR": str(root / "embedded" / "data")}
            with running_service(env, root / "embedded", api_threads=args.api_threads) as url:
                embedded_times = submit_to_running(url, args.trials)

    print("\nSubmit to running (warm worker), seconds over", args.trials, "trials")
    print("| broker and store | observed p50 | observed max | server p50 | server max |")
    print("|---|---|---|---|---|")
    rows = [("Redis + PostgreSQL", redis_times)]
    if embedded_times is not None:
        rows.append(("embedded (SQLite, SQLAlchemy transport)", embedded_times))
    for name, times in rows:
        obs, srv = times["observed"], times["server"]
        print(f"| {name} | {statistics.median(obs):.3f} | {max(obs):.3f} | "
              f"{statistics.median(srv):.3f} | {max(srv):.3f} |")  # fmt: skip

    print(f"\nPredict, one 100-step sequence, KRU hidden 128 on CPU; in-process model time "
          f"{_ms(model_time)} ms, GET /healthz {_ms(floor)} ms")  # fmt: skip
    print("| clients | requests | p50 ms | p99 ms | requests/s | server model time ms (mean) |")
    print("|---|---|---|---|---|---|")
    for n, level in levels.items():
        print(f"| {n} | {level['n']} | {_ms(level['p50'])} | {_ms(level['p99'])} | "
              f"{level['throughput']:.0f} | {_ms(level['server'])} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
