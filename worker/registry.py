"""The worker registry: each worker process heartbeats a row of ``workers`` (host, device, torch
and CUDA versions, the job it runs), so ``GET /v1/workers`` can show who trains where.

A :class:`WorkerRegistry` thread runs in every worker process (:func:`worker.runner.run_worker`):
it writes its row every ``heartbeat_interval`` seconds and deletes it at a graceful stop. A row
whose heartbeat is older than ``heartbeat_timeout`` (a killed worker) is not listed, and is
deleted by the next live worker's heartbeat. Heartbeats are written and judged on the database's
clock (:class:`worker.db.db_clock`), like the jobs', so the nodes' clocks do not matter.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import delete, select

from worker.db import db_clock
from worker.models import WorkerRow, utcnow

if TYPE_CHECKING:
    from worker.context import Context
    from worker.db import Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    """What a worker trains on: ``device`` (``cpu``, ``cuda:0``), the GPU's name and memory."""

    device: str
    device_name: str | None
    memory_bytes: int | None
    torch_version: str
    cuda_version: str | None


@dataclass(frozen=True)
class WorkerView:
    """A live worker (``GET /v1/workers``)."""

    name: str
    host: str
    pid: int
    device: str
    device_name: str | None
    memory_bytes: int | None
    torch_version: str
    cuda_version: str | None
    job_id: str | None
    started_at: datetime
    heartbeat_at: datetime


def device_info(setting: str) -> DeviceInfo:
    """The device a worker with ``KRU_DEVICE=setting`` trains on (``auto``: the first GPU when
    there is one, else the CPU)."""
    import torch

    device = setting
    if setting == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    elif setting == "cuda":
        device = "cuda:0"
    name = memory = None
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        name, memory = props.name, int(props.total_memory)
    elif device == "cpu":
        name = _cpu_name()
    return DeviceInfo(device, name, memory, torch.__version__, torch.version.cuda)


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return None


def beat(
    store: Store, *, name: str, info: DeviceInfo, job_id: str | None, started_at: datetime
) -> None:
    """Write the worker's row (insert or update), its heartbeat on the database's clock."""
    with store.writing() as db:
        row = db.get(WorkerRow, name)
        if row is None:
            host, _, pid = name.rpartition(":")
            row = WorkerRow(
                name=name,
                host=host or socket.gethostname(),
                pid=int(pid) if pid.isdigit() else os.getpid(),
                started_at=started_at,
            )
            db.add(row)
        row.device = info.device
        row.device_name = info.device_name
        row.memory_bytes = info.memory_bytes
        row.torch_version = info.torch_version
        row.cuda_version = info.cuda_version
        row.job_id = job_id
        row.heartbeat_at = db_clock()  # type: ignore[assignment]


def forget(store: Store, name: str) -> None:
    """Delete the worker's row (a graceful stop)."""
    with store.writing() as db:
        db.execute(delete(WorkerRow).where(WorkerRow.name == name))


def live_workers(store: Store, *, timeout_s: float) -> list[WorkerView]:
    """Workers whose heartbeat is younger than ``timeout_s`` (the database's clock), by name."""
    with store.reading() as db:
        rows = db.scalars(
            select(WorkerRow)
            .where(WorkerRow.heartbeat_at >= db_clock(timeout_s))
            .order_by(WorkerRow.name)
        ).all()
        views = [
            WorkerView(
                r.name,
                r.host,
                r.pid,
                r.device,
                r.device_name,
                r.memory_bytes,
                r.torch_version,
                r.cuda_version,
                r.job_id,
                r.started_at,
                r.heartbeat_at,
            )
            for r in rows
        ]
    return views


def prune(store: Store, *, timeout_s: float) -> None:
    """Delete the rows of workers whose heartbeat is older than ``timeout_s``."""
    with store.writing() as db:
        db.execute(delete(WorkerRow).where(WorkerRow.heartbeat_at < db_clock(timeout_s)))


class WorkerRegistry(threading.Thread):
    """Heartbeats this worker process's row until :meth:`stop`, which deletes it.

    Args:
        ctx: the process context (store, settings).
        name: the worker's name (``host:pid``, as in a job's ``worker``).
        current_job: the id of the job this process runs now, or ``None``.
    """

    def __init__(self, ctx: Context, *, name: str, current_job: object) -> None:
        super().__init__(name="kru-registry", daemon=True)
        self.ctx = ctx
        self.worker_name = name
        self.current_job = current_job
        self.started_at = utcnow()
        self._stopped = threading.Event()
        self.info: DeviceInfo | None = None

    def run(self) -> None:
        settings = self.ctx.settings
        try:
            self.info = device_info(settings.device)
        except Exception:
            logger.exception("registry: cannot read the device")
            return
        while True:
            try:
                beat(
                    self.ctx.store,
                    name=self.worker_name,
                    info=self.info,
                    job_id=self.current_job(),  # type: ignore[operator]
                    started_at=self.started_at,
                )
                prune(self.ctx.store, timeout_s=settings.heartbeat_timeout * 10)
            except Exception as exc:  # the database may come back
                logger.warning("registry: heartbeat failed: %s", exc)
            if self._stopped.wait(settings.heartbeat_interval):
                return

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=5)
        try:
            forget(self.ctx.store, self.worker_name)
        except Exception as exc:
            logger.warning("registry: could not remove this worker's row: %s", exc)
