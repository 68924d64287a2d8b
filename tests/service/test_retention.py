"""Retention (worker/retention.py): a finished job keeps its last checkpoint and its model's;
its progress events and training metric points are thinned KRU_EVENT_RETENTION_DAYS after its
end (status events and evaluation points kept); ``DELETE /v1/jobs/{id}`` and
``DELETE /v1/models/{id}`` remove the rows and the files (409 while queued / running / in use,
404 for an unknown id or another key's). On the embedded default and on Redis + PostgreSQL,
with a real worker process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from testkit import wait_until
from worker_helpers import copy_config, finished, saved_steps

from app import sessions
from app.main import create_app
from worker import context, jobs, retention, service
from worker.errors import NotFound
from worker.models import Job, JobEvent, MetricPoint, utcnow

if TYPE_CHECKING:
    from conftest import ServiceEnv

pytestmark = pytest.mark.slow


@pytest.fixture
def client(service_env: ServiceEnv) -> Iterator[TestClient]:
    with TestClient(create_app(service_env.settings)) as test_client:
        yield test_client


def _counts(job_id: str) -> dict[str, int]:
    def count_by(key: Any) -> dict[str, int]:
        """The job's rows of ``key``'s table, counted by ``key``."""
        table = key.class_
        query = select(key, func.count()).where(table.job_id == job_id).group_by(key)
        return dict(db.execute(query).all())

    with context.current().store.reading() as db:
        events = count_by(JobEvent.kind)
        points = count_by(MetricPoint.phase)
    return {
        "status": events.get("status", 0),
        "progress": events.get("progress", 0),
        "train": points.get("train", 0),
        "eval": points.get("eval", 0),
    }


def test_finished_jobs_are_thinned_after_the_retention_time(service_env: ServiceEnv) -> None:
    """Written through the job functions a worker uses (no training needed): 1,000 training
    points and 10 evaluations, then the job's end moved 31 days back."""
    store = context.current().store
    job_id = "c" * 32
    config: dict[str, Any] = {"train": {"steps": 1000}}
    jobs.create(store, job_id=job_id, name="old", config=config)
    claim = jobs.claim(
        store, job_id, worker="w", max_attempts=3, stale_before=utcnow() - timedelta(60)
    )
    assert claim is not None
    writes = [
        {
            "step": step,
            "total_steps": 1000,
            "metrics": {"loss": 1 / step},
            "phase": "eval" if step % 100 == 0 else "train",
            "point": {"loss": 1 / step},
            "event": {"step": step},
        }
        for step in range(1, 1011)
    ]
    assert jobs.report_progress(store, claim, writes)
    assert jobs.finish(store, claim, "succeeded", step=1000)
    before = _counts(job_id)
    assert before == {"status": 3, "progress": 1010, "train": 1000, "eval": 10}

    assert retention.thin_finished(store, retention_days=30) == []  # it ended just now
    with store.writing() as db:
        db.execute(
            update(Job).where(Job.id == job_id).values(finished_at=utcnow() - timedelta(days=31))
        )
    assert retention.thin_finished(store, retention_days=0) == []  # 0: kept forever
    assert retention.thin_finished(store, retention_days=30) == [job_id]
    after = _counts(job_id)
    assert after["status"] == 3 and after["progress"] == 0 and after["eval"] == 10
    assert 100 < after["train"] <= retention.MAX_TRAIN_POINTS
    steps = [p["step"] for p in service.job_metrics(job_id) if p["phase"] == "train"]
    assert steps[0] == 1 and steps[-1] == 1010, "spread over the run, the last one kept"
    assert retention.thin_finished(store, retention_days=30) == [], "thinned once"
    assert service.get_job(job_id).status == "succeeded"


def test_checkpoints_pruned_at_the_end_and_deletes_remove_rows_and_files(
    service_env: ServiceEnv,
    client: TestClient,
    worker_process: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jobs_dir = service_env.settings.jobs_dir
    queued = service.submit_job(copy_config(steps=20))
    assert client.delete(f"/v1/jobs/{queued.id}").status_code == 409  # queued: cancel first
    assert client.post(f"/v1/jobs/{queued.id}/cancel").status_code == 200
    others = service.submit_job(copy_config(steps=20), owner="alice")
    service.cancel_job(others.id)
    response = client.delete(f"/v1/jobs/{others.id}")  # the open API's key is not alice
    assert response.status_code == 404, response.text
    service.delete_job(others.id, owner="alice")
    done = service.submit_job(copy_config(steps=200, checkpoint_every=25))
    worker_process(service_env)
    job = wait_until(lambda: finished(done.id), timeout=180, what="the job to end")
    assert job.status == "succeeded", job.error
    model = service.get_model(job.model_id)
    # 8 checkpoints were written (3 kept while training); one is left: the model's, the last.
    # (removed by the worker just after it recorded the end)
    wait_until(lambda: saved_steps(jobs_dir, done.id) == [200], timeout=10, what="pruning")
    assert model.checkpoint == (jobs_dir / done.id / "step-000000200")

    for path in (f"/v1/jobs/{'0' * 32}", f"/v1/models/{'0' * 32}"):
        response = client.delete(path)
        assert response.status_code == 404, response.text
        assert "not found" in response.json()["detail"]
    response = client.delete(f"/v1/jobs/{done.id}")
    assert response.status_code == 409 and "delete the model first" in response.json()["detail"]

    session = client.post(f"/v1/models/{model.id}/sessions", json={})
    assert session.status_code == 201, session.text
    response = client.delete(f"/v1/models/{model.id}")
    assert response.status_code == 409 and "streaming session" in response.json()["detail"]
    assert client.delete(f"/v1/sessions/{session.json()['id']}").status_code == 204

    # A session opened between the delete's in-use check and the delete (the model found in an
    # API's cache) does not outlive the model ...
    created: list[str] = []
    check = retention.check_model_unused

    def check_then_open_a_session(ctx: Any, model_id: str) -> None:
        check(ctx, model_id)
        created.append(sessions.create_session(model_id, ttl_seconds=60, max_sessions=100)["id"])

    monkeypatch.setattr(retention, "check_model_unused", check_then_open_a_session)
    assert client.delete(f"/v1/models/{model.id}").status_code == 204
    monkeypatch.undo()
    assert created and client.get(f"/v1/sessions/{created[0]}").status_code == 404
    assert context.current().sessions.count_on_model(model.id) == 0
    # ... nor does one opened after the delete by an API that still has the model cached
    with pytest.raises(NotFound):
        sessions.create_session(model.id, ttl_seconds=60, max_sessions=100)
    assert context.current().sessions.count_on_model(model.id) == 0
    assert client.get(f"/v1/models/{model.id}").status_code == 404
    assert client.post(f"/v1/models/{model.id}/predict", json={"inputs": [[1]]}).status_code == 404
    assert not (jobs_dir / done.id / "step-000000200").exists()
    assert client.get(f"/v1/jobs/{done.id}").json()["model_id"] is None

    assert client.delete(f"/v1/jobs/{done.id}").status_code == 204
    assert client.get(f"/v1/jobs/{done.id}").status_code == 404
    assert client.get(f"/v1/jobs/{done.id}/metrics").status_code == 404
    assert not (jobs_dir / done.id).exists()
    assert _counts(done.id) == {"status": 0, "progress": 0, "train": 0, "eval": 0}
    assert client.delete(f"/v1/jobs/{queued.id}").status_code == 204  # cancelled: finished
    assert client.delete(f"/v1/jobs/{done.id}").status_code == 404
