"""Paths are never taken from the client: uploads are stored under their own id, whatever their
name, and no request field can name a file on the server."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from worker.settings import Settings

HOSTILE_NAMES = [
    "../../etc/passwd",
    "../../../../../../etc/passwd",
    "/etc/passwd",
    "..\\..\\windows\\system.ini",
    "....//....//etc/passwd",
    "%2e%2e%2fetc%2fpasswd",
    ".bashrc",
    "a\x00b.txt",
    "nested/dir/../../x.jsonl",
]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "deep" / "kru"


@pytest.fixture
def client(data_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(data_dir=data_dir, reaper_interval=0))) as c:
        yield c


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_upload_is_stored_under_its_own_id(
    client: TestClient, data_dir: Path, tmp_path: Path, name: str
) -> None:
    etc_passwd = Path("/etc/passwd")
    before = hashlib.sha256(etc_passwd.read_bytes()).hexdigest() if etc_passwd.exists() else None
    outside_before = files_under(tmp_path) - files_under(data_dir)
    jsonl = name.endswith(".jsonl")
    content = b'{"input": [1, 2], "target": 0}\n' if jsonl else b"root:x:0:0:root:/root:/bin/sh\n"

    response = client.post("/v1/datasets", files={"file": (name, content)})
    assert response.status_code == 201, response.text
    dataset = response.json()

    datasets_dir = data_dir / "datasets"
    stored = sorted(p.name for p in datasets_dir.iterdir())
    assert stored == [f"{dataset['id']}.{'jsonl' if jsonl else 'txt'}"]
    assert (datasets_dir / stored[0]).read_bytes() == content
    assert files_under(tmp_path) - files_under(data_dir) == outside_before  # nothing escaped
    assert "/" not in dataset["filename"] and "\\" not in dataset["filename"]
    assert "\x00" not in dataset["filename"] and not dataset["filename"].startswith(".")
    if before is not None:
        assert hashlib.sha256(etc_passwd.read_bytes()).hexdigest() == before
    assert client.get(f"/v1/datasets/{dataset['id']}").json() == dataset


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"task": {"kind": "text", "dataset_id": "../../etc/passwd"}}, "task.dataset_id"),
        ({"task": {"kind": "dataset", "dataset_id": "/etc/passwd"}}, "task.dataset_id"),
        ({"train": {"out_dir": "/tmp/x"}}, "train.out_dir"),
        ({"checkpoint": "/etc"}, "checkpoint"),
        ({"model": {"checkpoint": "../x"}}, "model.checkpoint"),
    ],
)
def test_no_job_field_names_a_path(client: TestClient, body: dict, field: str) -> None:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert client.get("/v1/jobs").json()["total"] == 0


@pytest.mark.parametrize(
    "path",
    [
        "/v1/datasets/..%2F..%2Fetc%2Fpasswd",
        "/v1/models/..%2F..%2Fetc/predict",
        "/v1/jobs/%2Fetc%2Fpasswd",
    ],
)
def test_ids_that_look_like_paths_are_unknown(client: TestClient, path: str) -> None:
    response = client.request("POST" if path.endswith("predict") else "GET", path, json={})
    assert response.status_code == 404, response.text
