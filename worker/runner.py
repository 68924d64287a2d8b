"""Process entry points: ``kru worker`` (:func:`run_worker`) and ``kru serve`` (:func:`run_serve`).

A worker is a Celery worker with ``--pool solo`` and concurrency 1: the job runs in the worker's
main process, which never forks, so CUDA is safe to use there; one worker per GPU. SIGTERM (or a
first Ctrl-C) is Celery's warm shutdown: the running job stops at its next step, saves a
checkpoint, goes back to the queue and is enqueued again, and the worker exits.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from worker import context, execution, schema
from worker.logs import configure_logging
from worker.reaper import Reaper
from worker.registry import WorkerRegistry
from worker.settings import Settings, get_settings
from worker.watchdog import ConsumeWatchdog

logger = logging.getLogger(__name__)

#: How long ``kru serve`` waits for its worker to checkpoint and exit before killing it.
WORKER_STOP_TIMEOUT_S = 60.0


def run_worker(settings: Settings | None = None, *, parent_pid: int | None = None) -> int:
    """Run a worker until it is stopped (SIGTERM, Ctrl-C); return its exit status.

    Args:
        settings: default ``get_settings()``.
        parent_pid: stop (warm) when this process is gone; ``kru serve`` passes its own pid.
    """
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    try:
        ctx = context.init(settings)
    except schema.SchemaOutdated as exc:
        logger.critical("worker not started: %s", exc)
        return 1
    from celery import signals

    signals.worker_shutting_down.connect(_on_shutting_down, weak=False)
    reaper = Reaper(ctx)
    reaper.start()
    # Its row in the workers table: host, device, torch/CUDA versions, the job (GET /v1/workers).
    registry = WorkerRegistry(
        ctx, name=execution.WORKER_NAME, current_job=lambda: execution.activity.job_id
    )
    registry.start()
    # A worker that stops consuming (a lost Celery consumer after a broker outage) exits
    # non-zero to be restarted: docker-compose's restart policy, kru serve's supervisor.
    watchdog = ConsumeWatchdog(ctx)
    watchdog.start()
    if parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    argv = [
        "worker",
        "--pool=solo",
        "--concurrency=1",
        f"--loglevel={settings.log_level}",
        f"--hostname=kru-{os.getpid()}@{socket.gethostname()}",
        f"--queues={settings.queue_name}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    logger.info("worker starting: queue %s, broker %s", settings.queue_name, _safe(settings))
    code = 0
    try:
        ctx.celery.worker_main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    finally:
        watchdog.stop()
        reaper.stop()
        registry.stop()
        context.close()
        logger.info("worker stopped")
    return code


def _on_shutting_down(**_: object) -> None:
    execution.shutdown_requested.set()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    logger.warning("parent process %d is gone; shutting down", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)


def _safe(settings: Settings) -> str:
    url = settings.broker_url
    if "@" in url:  # hide credentials
        scheme, rest = url.split("://", 1)
        url = f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def stop_gracefully(
    proc: subprocess.Popen[bytes] | None,
    timeout: float,
    kill: Callable[[subprocess.Popen[bytes]], None],
) -> None:
    """Stop a worker process the way a supervisor does: SIGTERM (Celery's warm shutdown: the
    running job checkpoints and is requeued), wait up to ``timeout`` s, then ``kill(proc)``.
    Nothing to do for a process that has exited (or ``None``: never started)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill(proc)


class WorkerSupervisor:
    """Runs one worker subprocess (``python -m worker``) and restarts it whenever it exits
    (killed, or ended by its consume watchdog with status 75), with a backoff of 1 s doubling
    up to 30 s while it keeps dying within a minute."""

    def __init__(self, settings: Settings) -> None:
        self.env = {**os.environ, **settings.to_env()}
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    def start(self) -> None:
        self._spawn()
        self._monitor = threading.Thread(target=self._watch, name="kru-worker-watch", daemon=True)
        self._monitor.start()

    def _spawn(self) -> None:
        # A new session: a terminal Ctrl-C reaches only kru serve, which then stops the worker
        # exactly once (a second SIGINT would be Celery's cold shutdown).
        cmd = [sys.executable, "-m", "worker", "--parent-pid", str(os.getpid())]
        self.proc = subprocess.Popen(cmd, env=self.env, start_new_session=True)
        logger.info("started worker process %d", self.proc.pid)

    def _watch(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            proc = self.proc
            assert proc is not None
            started = time.monotonic()
            code = proc.wait()
            if self._stopping.is_set():
                return
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 30.0)
            logger.error(
                "worker process %d exited with %s; restarting in %g s", proc.pid, code, delay
            )
            if self._stopping.wait(delay):
                return
            self._spawn()

    def stop(self, timeout: float = WORKER_STOP_TIMEOUT_S) -> None:
        """SIGTERM the worker (it checkpoints and requeues its job), wait, then kill it."""
        self._stopping.set()

        def kill(proc: subprocess.Popen[bytes]) -> None:
            logger.error("worker process %d did not stop in %g s; killing it", proc.pid, timeout)
            self.kill()

        stop_gracefully(self.proc, timeout, kill)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_serve(
    host: str,
    port: int,
    settings: Settings | None = None,
    *,
    app_factory: Callable[[Settings], Any],
) -> int:
    """Run the API (uvicorn, in this process) and one worker subprocess until Ctrl-C or SIGTERM,
    then stop both: the API first, then the worker (its job checkpoints and is requeued).

    Args:
        host, port: where the API listens.
        settings: default ``get_settings()``; the worker subprocess gets the same.
        app_factory: builds the ASGI app from settings (``app.main.create_app``; passed in so
            that ``worker`` never imports ``app``).
    """
    import uvicorn

    settings = settings or get_settings()
    configure_logging(settings.log_level)
    # The embedded default upgrades its schema by itself, before the worker subprocess starts.
    context.init(settings, upgrade_schema=True)
    supervisor = WorkerSupervisor(settings)
    supervisor.start()
    signals_seen: list[int] = []

    def on_signal(sig: int, _frame: FrameType | None) -> None:
        # uvicorn re-raises the signal that stopped it; this keeps it from killing us before the
        # worker is stopped. A second one while stopping kills the worker.
        signals_seen.append(sig)
        if len(signals_seen) > 1:
            supervisor.kill()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        config = uvicorn.Config(
            app_factory(settings), host=host, port=port, log_level=settings.log_level.lower()
        )
        uvicorn.Server(config).run()
    finally:
        logger.info("stopping the worker")
        supervisor.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
