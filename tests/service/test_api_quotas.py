"""Issue 11: quotas per API key (429 naming the limit, Retry-After when it frees), datasets
deduplicated per key, DELETE /v1/datasets/{id} (409 while used), the free-disk check (507)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.main import create_app
from worker import context, jobs, quotas, service
from worker.models import Job, utcnow
from worker.settings import Settings

ALICE = {"Authorization": "Bearer alice-secret"}
BOB = {"Authorization": "Bearer bob-secret"}
CAROL = {"Authorization": "Bearer carol-secret"}
SMALL = {"model": {"hidden_size": 8}, "train": {"steps": 5, "device": "cpu"}}
ROWS = b"".join(b'{"input": [1, 2, 3], "target": %d}\n' % (i % 2) for i in range(10))


def settings_for(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "api_keys": "alice:alice-secret,bob:bob-secret,carol:carol-secret",
        "reaper_interval": 0,
        "max_active_jobs_per_key": 3,
        "max_dataset_bytes_per_key": 2 * len(ROWS) + 60,
        "key_quotas": {"carol": {"max_active_jobs": 1, "max_worker_seconds": 30}},
    }
    return Settings(data_dir=data_dir, **{**values, **overrides})


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tmp_path / "kru"))) as c:
        yield c


def upload(client: TestClient, headers: dict[str, str], content: bytes, name: str = "d.jsonl"):
    return client.post("/v1/datasets", headers=headers, files={"file": (name, content)})


def test_active_jobs_per_key(client: TestClient) -> None:
    for _ in range(3):
        assert client.post("/v1/jobs", headers=ALICE, json=SMALL).status_code == 202
    over = client.post("/v1/jobs", headers=ALICE, json=SMALL)
    assert over.status_code == 429, over.text
    assert over.json()["field"] == "max_active_jobs_per_key"
    assert "KRU_MAX_ACTIVE_JOBS_PER_KEY=3" in over.json()["detail"]
    assert int(over.headers["Retry-After"]) > 0
    # another key is not affected; a per-key override applies to its key only
    assert client.post("/v1/jobs", headers=BOB, json=SMALL).status_code == 202
    assert client.post("/v1/jobs", headers=CAROL, json=SMALL).status_code == 202
    assert client.post("/v1/jobs", headers=CAROL, json=SMALL).status_code == 429
    owners = {j.owner for j in _rows()}
    assert owners == {"alice", "bob", "carol"}
    # a cancelled job frees its place; only its own key can cancel it
    first = service.list_jobs(limit=500).items[-1]
    assert client.post(f"/v1/jobs/{first.id}/cancel", headers=BOB).status_code == 404
    assert client.post(f"/v1/jobs/{first.id}/cancel", headers=ALICE).status_code == 200
    assert client.post("/v1/jobs", headers=ALICE, json=SMALL).status_code == 202


def _rows() -> list[Job]:
    with context.current().store.reading() as db:
        return list(db.query(Job).all())


def test_worker_seconds_per_key_say_when_they_free(client: TestClient) -> None:
    view = service.submit_job(service_config(), owner="carol")
    now = utcnow()
    store = context.current().store
    with store.writing() as db:  # a job of carol's that ran 100 s, ending 50 s ago
        db.execute(
            update(Job.__table__)
            .where(Job.__table__.c.id == view.id)
            .values(
                status="succeeded",
                started_at=now - timedelta(seconds=150),
                finished_at=now - timedelta(seconds=50),
            )
        )
    over = client.post("/v1/jobs", headers=CAROL, json=SMALL)
    assert over.status_code == 429, over.text
    assert over.json()["field"] == "max_worker_seconds_per_key"
    assert "used 100 worker-seconds in the last 24 h" in over.json()["detail"]
    # below 30 s once the window has slid past the job's first 70 s: 24 h - 80 s from now
    retry = int(over.headers["Retry-After"])
    assert 24 * 3600 - 90 <= retry <= 24 * 3600 - 70, retry
    used, frees_in = quotas.worker_seconds(context.current(), "carol", 30, now=now)
    assert used == pytest.approx(100, abs=1) and frees_in == pytest.approx(24 * 3600 - 80, abs=2)


def test_a_job_larger_than_the_keys_worker_seconds_is_refused(client: TestClient) -> None:
    big = {
        "model": {"cell": "lstm", "hidden_size": 1024},
        "train": {"steps": 100, "batch_size": 64},
    }  # about 2e11 flop a step: 195 s at KRU_WORKER_FLOPS 1e11, carol has 30 a day
    over = client.post("/v1/jobs", headers=CAROL, json=big)
    assert over.status_code == 429, over.text
    assert over.json()["field"] == "max_worker_seconds_per_key"
    assert over.json()["detail"].startswith("this job alone needs about 19")
    assert "Retry-After" not in over.headers
    assert client.post("/v1/jobs", headers=ALICE, json=big).status_code == 202


def service_config():  # a config the service takes directly
    from kru_core.config import JobConfig

    return JobConfig.from_dict(SMALL)


def test_datasets_are_deduplicated_per_key_and_bounded_per_key(client: TestClient) -> None:
    first = upload(client, ALICE, ROWS)
    assert first.status_code == 201, first.text
    again = upload(client, ALICE, ROWS, name="other-name.jsonl")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    bobs = upload(client, BOB, ROWS)  # per key: bob's copy is bob's
    assert bobs.status_code == 201 and bobs.json()["id"] != first.json()["id"]
    second = upload(client, ALICE, ROWS + b'{"input": [1], "target": 0}\n')
    assert second.status_code == 201
    over = upload(client, ALICE, ROWS + b'{"input": [2], "target": 1}\n')
    assert over.status_code == 429, over.text
    assert over.json()["field"] == "max_dataset_bytes_per_key"
    assert "DELETE /v1/datasets/{id}" in over.json()["detail"]
    assert "Retry-After" not in over.headers  # only deleting frees it
    assert service.list_datasets().total == 3

    deleted = client.delete(f"/v1/datasets/{first.json()['id']}", headers=ALICE)
    assert deleted.status_code == 204
    assert client.get(f"/v1/datasets/{first.json()['id']}", headers=ALICE).status_code == 404
    assert upload(client, ALICE, ROWS + b'{"input": [2], "target": 1}\n').status_code == 201


def test_delete_a_dataset(client: TestClient) -> None:
    data = upload(client, ALICE, ROWS).json()
    # another key's dataset cannot be deleted (nor told apart from an unknown one)
    assert client.delete(f"/v1/datasets/{data['id']}", headers=BOB).status_code == 404
    body = {**SMALL, "task": {"kind": "dataset", "dataset_id": data["id"]}}
    job = client.post("/v1/jobs", headers=ALICE, json=body).json()
    busy = client.delete(f"/v1/datasets/{data['id']}", headers=ALICE)
    assert busy.status_code == 409 and job["id"] in busy.json()["detail"], busy.text
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE)
    assert client.delete(f"/v1/datasets/{data['id']}", headers=ALICE).status_code == 204
    assert not list(context.current().settings.datasets_dir.glob(f"{data['id']}*"))
    assert client.delete(f"/v1/datasets/{data['id']}", headers=ALICE).status_code == 404
    refused = client.post("/v1/jobs", headers=ALICE, json=body)
    assert refused.status_code == 422 and refused.json()["field"] == "task.dataset_id"


def test_an_upload_that_would_fill_the_disk_is_a_507(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "kru", min_free_disk_bytes=10**18)
    with TestClient(create_app(settings)) as client:
        response = upload(client, ALICE, ROWS)
        assert response.status_code == 507, response.text
        assert response.json()["field"] == "file"
        assert "KRU_MIN_FREE_DISK_BYTES" in response.json()["detail"]
        assert service.list_datasets().total == 0


def test_jobs_are_published_at_most_n_per_key(tmp_path: Path) -> None:
    """No worker: a key's jobs beyond max_published_jobs wait unpublished, others' are
    published at once; publish_fair takes one job of each key in turn."""
    with TestClient(create_app(settings_for(tmp_path / "kru", max_active_jobs_per_key=50))) as c:
        for _ in range(6):
            assert c.post("/v1/jobs", headers=ALICE, json=SMALL).status_code == 202
        assert c.post("/v1/jobs", headers=BOB, json=SMALL).status_code == 202
        rows = sorted(_rows(), key=lambda j: j.created_at)
        published = [j.owner for j in rows if j.enqueued_at is not None]
        assert published == ["alice", "alice", "bob"]
        assert quotas.publish_fair(context.current()) == []  # no room: nothing started
        held = [j.id for j in rows if j.enqueued_at is None]
        assert len(held) == 4 and jobs.queued(context.current().store, published_only=True)


def test_the_client_sees_dedup_delete_and_quotas(tmp_path: Path) -> None:
    """kru_client against a real API process: a repeated upload is the stored dataset, delete,
    and a quota is a TooManyRequests naming the limit."""
    from api_server import running_api

    from kru_client import Client
    from kru_client.errors import NotFound, TooManyRequests

    settings = settings_for(tmp_path / "kru")
    with (
        running_api(settings, tmp_path / "api.log") as api,
        Client(api.base_url, api_key="alice-secret") as client,
    ):
        first = client.upload_dataset(ROWS)
        assert client.upload_dataset(ROWS).id == first.id
        client.delete_dataset(first.id)
        with pytest.raises(NotFound):
            client.get_dataset(first.id)
        for _ in range(3):
            client.submit_job(SMALL)
        with pytest.raises(TooManyRequests, match=r"KRU_MAX_ACTIVE_JOBS_PER_KEY=3"):
            client.submit_job(SMALL)
