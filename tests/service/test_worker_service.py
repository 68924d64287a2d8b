"""``worker.service`` without a worker: submit, list, cancel a queued job, datasets, health."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kru_core.config import JobConfig
from worker import service
from worker.errors import Conflict, Invalid, NotFound
from worker.views import FINISHED_STATUSES

if TYPE_CHECKING:
    from conftest import ServiceEnv

GOOD_JSONL = b'{"input": [1, 2, 3], "target": 1}\n{"input": [4, 5], "target": 0}\n'


def test_submit_get_list_and_cancel_a_queued_job(
    service_env: ServiceEnv, small_copy_config: Callable[..., JobConfig]
) -> None:
    first = service.submit_job(small_copy_config(steps=30), name="first")
    second = service.submit_job(small_copy_config(steps=40))
    assert first.status == "queued" and first.attempts == 0 and first.name == "first"
    assert first.config["name"] == "first" and first.config["train"]["steps"] == 30
    assert first.progress.step == 0 and first.progress.total_steps == 30
    assert first.progress.fraction == 0.0 and first.model_id is None and first.error is None
    assert first.created_at.tzinfo is not None

    page = service.list_jobs(limit=10)
    assert [j.id for j in page.items] == [second.id, first.id]  # newest first
    assert page.total == 2
    assert service.list_jobs(status="queued", limit=1, offset=1).items[0].id == first.id
    assert service.list_jobs(status="running").total == 0
    assert service.job_counts_by_status() == {
        "queued": 2,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }

    cancelled = service.cancel_job(first.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(Conflict, match="already cancelled"):
        service.cancel_job(first.id)
    events = service.job_events(first.id)
    assert [e.data["status"] for e in events] == ["queued", "cancelled"]
    assert service.job_events(first.id, after=events[0].id) == events[1:]
    assert service.job_metrics(first.id) == []


def test_unknown_ids_and_bad_arguments(sqlite_env: ServiceEnv) -> None:
    for call in (
        service.get_job,
        service.cancel_job,
        service.job_metrics,
        service.job_events,
        service.get_dataset,
        service.get_model,
    ):
        with pytest.raises(NotFound, match="not found"):
            call("0123456789abcdef0123456789abcdef")
    with pytest.raises(NotFound):
        service.get_job("../../etc/passwd")
    with pytest.raises(Invalid) as info:
        service.list_jobs(status="done")
    assert info.value.field == "status"
    with pytest.raises(Invalid) as info:
        service.list_models(limit=0)
    assert info.value.field == "limit"
    with pytest.raises(Invalid) as info:
        service.list_datasets(offset=-1)
    assert info.value.field == "offset"
    assert {"succeeded", "failed", "cancelled"} == FINISHED_STATUSES


def test_job_limits_and_dataset_references(
    sqlite_env: ServiceEnv, small_copy_config: Callable[..., JobConfig]
) -> None:
    service.init(sqlite_env.with_overrides(max_steps_per_job=100))
    with pytest.raises(Invalid) as info:
        service.submit_job(small_copy_config(steps=101))
    assert info.value.field == "train.steps"
    text = service.create_dataset("tiny.txt", b"hello world\n" * 20)
    base = {"model": {"cell": "kru", "hidden_size": 8}, "train": {"steps": 10}}
    with pytest.raises(Invalid) as info:
        service.submit_job(
            JobConfig.from_dict({**base, "task": {"kind": "dataset", "dataset_id": "f" * 32}})
        )
    assert info.value.field == "task.dataset_id" and "not found" in info.value.detail
    with pytest.raises(Invalid, match="needs a jsonl dataset, got a text dataset"):
        service.submit_job(
            JobConfig.from_dict({**base, "task": {"kind": "dataset", "dataset_id": text.id}})
        )
    job = service.submit_job(
        JobConfig.from_dict({**base, "task": {"kind": "text", "dataset_id": text.id}})
    )
    assert job.status == "queued"
    assert service.list_jobs().total == 1  # nothing stored for the refused ones


def test_datasets_are_validated_and_stored_under_their_own_id(sqlite_env: ServiceEnv) -> None:
    datasets_dir = sqlite_env.settings.datasets_dir
    jsonl = service.create_dataset("../../etc/passwd.jsonl", GOOD_JSONL)
    assert jsonl.kind == "jsonl" and jsonl.filename == "passwd.jsonl"
    assert jsonl.summary["examples"] == 2 and jsonl.summary["kind"] == "classification"
    assert jsonl.size_bytes == len(GOOD_JSONL) and len(jsonl.sha256) == 64
    stored = sorted(p.name for p in datasets_dir.iterdir())
    assert stored == [f"{jsonl.id}.jsonl"]
    assert (datasets_dir / stored[0]).read_bytes() == GOOD_JSONL
    assert not (Path("/etc") / "passwd.jsonl").exists()

    text = service.create_dataset("notes.md", "Привет, мир\n".encode() * 3)
    assert text.kind == "text" and text.summary["characters"] == 36
    assert service.get_dataset(text.id) == text
    assert [d.id for d in service.list_datasets().items] == [text.id, jsonl.id]

    bad = GOOD_JSONL + b'{"input": [1], "target": "x"}\nnot json\n\n{"input": []}\n'
    with pytest.raises(Invalid) as info:
        service.create_dataset("bad.jsonl", bad)
    assert info.value.field == "file"
    assert [n for n, _ in info.value.errors] == [3, 4, 6]
    assert "line 3" in info.value.detail and "line 6" in info.value.detail
    with pytest.raises(Invalid, match="empty"):
        service.create_dataset("empty.txt", b"")
    with pytest.raises(Invalid) as info:
        service.create_dataset("latin1.txt", "café".encode("latin-1"))
    assert info.value.field == "file"
    with pytest.raises(Invalid) as info:
        service.create_dataset("x.bin", b"abc", kind="parquet")
    assert info.value.field == "kind"
    service.init(sqlite_env.with_overrides(max_upload_bytes=1024))
    with pytest.raises(Invalid, match="at most 1024 bytes"):
        service.create_dataset("big.txt", b"a" * 1025)
    assert service.list_datasets().total == 2
    assert sorted(p.name for p in datasets_dir.iterdir()) == sorted(
        [f"{jsonl.id}.jsonl", f"{text.id}.txt"]
    )  # nothing half-stored


def test_health_checks_and_json_round_trip(service_env: ServiceEnv) -> None:
    service.check_database()
    service.check_broker()
    job = service.submit_job(
        JobConfig.from_dict({"task": {"kind": "adding", "length": 10}, "train": {"steps": 5}})
    )
    assert json.loads(json.dumps(service.get_job(job.id).config)) == job.config
