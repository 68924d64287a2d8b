"""Small helpers of the worker tests: a tiny job's config; read a job's end, its status events,
its checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import testkit

from kru_core.config import JobConfig
from worker import service
from worker.views import FINISHED_STATUSES, JobView


def copy_config(*, steps: int = 200, delay: int = 5, **train: Any) -> JobConfig:
    """A tiny copy-task job (hidden 16): seconds of CPU, learns the task in a few hundred steps."""
    return JobConfig.from_dict(testkit.copy_job(steps=steps, delay=delay, **train))


def finished(job_id: str) -> JobView | None:
    """The job once it is ``succeeded``, ``failed`` or ``cancelled``, else None (for waits)."""
    job = service.get_job(job_id)
    return job if job.status in FINISHED_STATUSES else None


def status_events(job_id: str) -> list[dict[str, Any]]:
    """The ``data`` of the job's status events, oldest first."""
    return [e.data for e in service.job_events(job_id) if e.kind == "status"]


def saved_steps(jobs_dir: Path, job_id: str) -> list[int]:
    """The steps of the job's checkpoints on disk, in order."""
    return sorted(int(p.name.split("-")[1]) for p in (jobs_dir / job_id).glob("step-*"))
