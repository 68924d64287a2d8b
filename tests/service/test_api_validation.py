"""Bad input over HTTP: each case gets its 4xx with a stable ``detail`` and stores nothing.

The real app (``TestClient``) on the embedded default (SQLite store, SQLAlchemy broker); no worker
is needed: nothing here should ever reach one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from worker import service
from worker.settings import Settings

MAX_REQUEST_BYTES = 16 * 1024
MAX_UPLOAD_BYTES = 8 * 1024


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "kru",
        max_request_bytes=MAX_REQUEST_BYTES,
        max_upload_bytes=MAX_UPLOAD_BYTES,
        max_steps_per_job=5000,
        reaper_interval=0,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def assert_nothing_stored(settings: Settings) -> None:
    assert service.list_jobs().total == 0
    assert service.list_datasets().total == 0
    datasets = settings.datasets_dir
    assert not datasets.exists() or not any(datasets.iterdir())


def assert_error(response, status: int, detail: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["detail"] == detail
    if field is not None:
        assert body["field"] == field
        assert body["errors"][0]["field"] == field
    return body


# --------------------------------------------------------------------------------------------
# POST /v1/jobs

JOB_CASES = [
    pytest.param(
        b'{"task": ', "malformed JSON: Expecting value at position 9", "body", id="malformed-json"
    ),
    pytest.param(
        b"[1, 2]",
        "body: Input should be a valid dictionary or object to extract fields from",
        "body",
        id="not-an-object",
    ),
    pytest.param(b'{"bogus": 1}', "bogus: unknown field", "bogus", id="unknown-field"),
    pytest.param(
        b'{"train": {"learning_rate": 0.1}}',
        "train.learning_rate: unknown field",
        "train.learning_rate",
        id="unknown-nested-field",
    ),
    pytest.param(
        b'{"train": {"steps": "100"}}',
        "train.steps: Input should be a valid integer",
        "train.steps",
        id="string-for-int",
    ),
    pytest.param(
        b'{"train": {"steps": 10.5}}',
        "train.steps: Input should be a valid integer",
        "train.steps",
        id="float-for-int",
    ),
    pytest.param(
        b'{"model": {"complex": 1}}',
        "model.complex: Input should be a valid boolean",
        "model.complex",
        id="int-for-bool",
    ),
    pytest.param(
        b'{"model": "kru"}',
        "model: Input should be a valid dictionary or object to extract fields from",
        "model",
        id="string-for-section",
    ),
    pytest.param(
        b'{"train": {"lr": 0}}',
        "train.lr: Input should be greater than 0",
        "train.lr",
        id="lr-zero",
    ),
    pytest.param(
        b'{"train": {"lr": NaN}}',
        "train.lr: Input should be a finite number",
        "train.lr",
        id="lr-nan",
    ),
    pytest.param(
        b'{"train": {"batch_size": 100000}}',
        "train.batch_size: Input should be less than or equal to 4096",
        "train.batch_size",
        id="batch-too-large",
    ),
    pytest.param(
        b'{"model": {"hidden_size": 0}}',
        "model.hidden_size: Input should be greater than or equal to 1",
        "model.hidden_size",
        id="hidden-zero",
    ),
    pytest.param(
        b'{"task": {"kind": "copy", "delay": -3}}',
        "task.delay: Input should be greater than or equal to 1",
        "task.delay",
        id="negative-delay",
    ),
    pytest.param(
        b'{"model": {"factors": [[2, 3, 4]]}}',
        "model.factors.0: List should have at most 2 items after validation, not 3",
        "model.factors.0",
        id="factor-triple",
    ),
    pytest.param(
        b'{"train": {"device": "tpu"}}',
        "train.device: String should match pattern '^(auto|cpu|cuda|cuda:[0-9]+)$'",
        "train.device",
        id="unknown-device",
    ),
    pytest.param(
        b'{"task": {"kind": "sorting"}}',
        "task.kind: Input should be 'copy', 'adding', 'mnist', 'dataset' or 'text'",
        "task.kind",
        id="unknown-task",
    ),
    pytest.param(
        b'{"model": {"cell": "gru"}}',
        "model.cell: Input should be 'kru', 'kru_lstm', 'rnn' or 'lstm'",
        "model.cell",
        id="unknown-cell",
    ),
    pytest.param(
        b'{"model": {"cell": "kru", "complex": true, "activation": "tanh"}}',
        "model.activation: tanh needs real states: set model.complex to false",
        "model.activation",
        id="cross-field-rule",
    ),
    pytest.param(
        b'{"task": {"kind": "dataset"}}',
        "task.dataset_id: required for task kind 'dataset'",
        "task.dataset_id",
        id="dataset-without-id",
    ),
    pytest.param(
        b'{"train": {"steps": 6000}}',
        "train.steps: expected at most 5000 steps, got 6000",
        "train.steps",
        id="steps-over-server-limit",
    ),
    pytest.param(
        b'{"task": {"kind": "dataset", "dataset_id": "0123456789abcdef0123456789abcdef"}}',
        "task.dataset_id: dataset '0123456789abcdef0123456789abcdef' not found",
        "task.dataset_id",
        id="unknown-dataset-id",
    ),
]


@pytest.mark.parametrize(("body", "detail", "field"), JOB_CASES)
def test_bad_job_config_is_422_and_stores_nothing(
    client: TestClient, settings: Settings, body: bytes, detail: str, field: str
) -> None:
    response = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert_error(response, 422, detail, field)
    assert_nothing_stored(settings)


def test_every_problem_is_listed(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs", json={"bogus": 1, "train": {"lr": -1, "steps": "x"}, "task": {"kind": "?"}}
    )
    fields = {e["field"] for e in response.json()["errors"]}
    assert fields == {"bogus", "train.lr", "train.steps", "task.kind"}


def test_json_without_content_type_is_422(client: TestClient, settings: Settings) -> None:
    response = client.post(
        "/v1/jobs", content=b'{"train": {"steps": 10}}', headers={"content-type": "text/plain"}
    )
    assert response.status_code == 422
    assert response.json()["field"] == "body"
    assert_nothing_stored(settings)


def test_oversized_body_is_413_before_parsing(client: TestClient, settings: Settings) -> None:
    body = json.dumps({"name": "x", "pad": "y" * MAX_REQUEST_BYTES}).encode()
    response = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert_error(response, 413, f"request body too large: the limit is {MAX_REQUEST_BYTES} bytes")
    assert_nothing_stored(settings)


def test_oversized_streamed_body_without_length_is_413(
    client: TestClient, settings: Settings
) -> None:
    """A chunked body has no Content-Length: the middleware counts the bytes as they come."""

    def chunks() -> Iterator[bytes]:
        yield b'{"name": "'
        for _ in range(40):
            yield b"z" * 1024
        yield b'"}'

    response = client.post(
        "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_error(response, 413, f"request body too large: the limit is {MAX_REQUEST_BYTES} bytes")
    assert_nothing_stored(settings)


# --------------------------------------------------------------------------------------------
# Unknown ids and state conflicts

UNKNOWN = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("method", "path", "detail"),
    [
        ("GET", f"/v1/jobs/{UNKNOWN}", f"job '{UNKNOWN}' not found"),
        ("GET", f"/v1/jobs/{UNKNOWN}/metrics", f"job '{UNKNOWN}' not found"),
        ("GET", f"/v1/jobs/{UNKNOWN}/events", f"job '{UNKNOWN}' not found"),
        ("POST", f"/v1/jobs/{UNKNOWN}/cancel", f"job '{UNKNOWN}' not found"),
        ("GET", f"/v1/datasets/{UNKNOWN}", f"dataset '{UNKNOWN}' not found"),
        ("GET", f"/v1/models/{UNKNOWN}", f"model '{UNKNOWN}' not found"),
        ("GET", "/v1/jobs/not..an..id", "job 'not..an..id' not found"),
        ("GET", "/v1/models/%00", "model '\\x00' not found"),
    ],
)
def test_unknown_ids_are_404(client: TestClient, method: str, path: str, detail: str) -> None:
    assert_error(client.request(method, path), 404, detail)


@pytest.mark.parametrize("route", ["predict", "generate"])
def test_predict_on_unknown_model_is_404(client: TestClient, route: str) -> None:
    body = {"inputs": [[1, 2]]} if route == "predict" else {"prompt": "a"}
    response = client.post(f"/v1/models/{UNKNOWN}/{route}", json=body)
    assert_error(response, 404, f"model '{UNKNOWN}' not found")


def test_cancel_of_a_finished_job_is_409(client: TestClient) -> None:
    """No worker runs here: the job stays queued, so its cancel is immediate."""
    job = client.post("/v1/jobs", json={"task": {"delay": 5}, "train": {"steps": 10}}).json()
    assert job["status"] == "queued"
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    again = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert "cancelled" in again.json()["detail"]
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=done", "status"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("offset=-1", "offset"),
    ],
)
def test_bad_list_query_is_422(client: TestClient, query: str, field: str) -> None:
    response = client.get(f"/v1/jobs?{query}")
    assert response.status_code == 422
    assert response.json()["field"] == field


# --------------------------------------------------------------------------------------------
# POST /v1/datasets


def upload(client: TestClient, name: str, content: bytes, **form: str):
    return client.post("/v1/datasets", files={"file": (name, content)}, data=form)


def test_dataset_with_bad_lines_lists_each_line(client: TestClient, settings: Settings) -> None:
    content = b"\n".join(
        [
            b'{"input": [1, 2, 3], "target": 1}',
            b'{"input": [1, 2], "target": }',
            b'{"input": [1, 2, 3], "target": 0}',
            b'{"inputs": [1], "target": 0}',
        ]
    )
    response = upload(client, "bad.jsonl", content)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == "file"
    assert [e["line"] for e in body["errors"]] == [2, 4]
    assert body["detail"] == (
        "file: 2 errors in dataset: line 2: invalid JSON: Expecting value at column 29; "
        'line 4: missing "input"'
    )
    assert_nothing_stored(settings)


@pytest.mark.parametrize(
    ("name", "content", "detail"),
    [
        pytest.param("empty.jsonl", b"", "file: the file is empty", id="empty"),
        pytest.param(
            "latin1.txt",
            "caf\xe9".encode("latin-1"),
            "file: not UTF-8 text (the first bad byte is on line 1): upload a JSONL or text file",
            id="not-utf8",
        ),
        pytest.param(
            "a.jsonl",
            b"[1, 2, 3]\n",
            'file: 1 error in dataset: line 1: expected an object {"input": ..., "target": ...}, '
            "got a list",
            id="line-not-an-object",
        ),
    ],
)
def test_bad_dataset_file_is_422(
    client: TestClient, settings: Settings, name: str, content: bytes, detail: str
) -> None:
    assert_error(upload(client, name, content), 422, detail, "file")
    assert_nothing_stored(settings)


def test_binary_upload_is_one_not_utf8_error(client: TestClient, settings: Settings) -> None:
    content = (
        b"header line\n" + bytes(range(256)) * 30
    )  # binary; its first byte >= 0x80 follows one newline of it
    response = upload(client, "blob.bin", content)
    assert_error(
        response,
        422,
        "file: not UTF-8 text (the first bad byte is on line 3): upload a JSONL or text file",
        "file",
    )
    assert response.json()["errors"] == [{"field": "file", "line": 3, "message": "not UTF-8 text"}]
    assert len(response.content) < 1000
    assert_nothing_stored(settings)


def test_upload_error_list_is_capped(client: TestClient, settings: Settings) -> None:
    content = b"\n".join([b'{"input": [1], "target": 0}', *[b"{bad"] * 250])
    response = upload(client, "bad.jsonl", content)
    assert response.status_code == 422, response.text
    body = response.json()
    assert [e["line"] for e in body["errors"]] == list(range(2, 102))
    assert body["errors_total"] == 250
    assert body["detail"].startswith("file: 250 errors in dataset: line 2: invalid JSON")
    assert_nothing_stored(settings)


def test_unknown_dataset_kind_is_422(client: TestClient, settings: Settings) -> None:
    response = upload(client, "a.txt", b"hello", kind="csv")
    assert_error(response, 422, "kind: Input should be 'jsonl' or 'text'", "kind")
    assert_nothing_stored(settings)


def test_upload_without_file_is_422(client: TestClient, settings: Settings) -> None:
    response = client.post("/v1/datasets", data={"kind": "text"})
    assert_error(response, 422, "file: Field required", "file")
    assert_nothing_stored(settings)


def test_oversized_upload_is_413(client: TestClient, settings: Settings) -> None:
    content = b"a" * (MAX_UPLOAD_BYTES + 128 * 1024)
    response = upload(client, "big.txt", content)
    assert response.status_code == 413
    assert response.json()["detail"].startswith("request body too large")
    assert_nothing_stored(settings)


def test_upload_just_over_the_file_limit_is_refused(client: TestClient, settings: Settings) -> None:
    """Within the multipart allowance of the body limit, the file itself is still checked."""
    response = upload(client, "big.txt", b"a" * (MAX_UPLOAD_BYTES + 1))
    detail = f"file: expected at most {MAX_UPLOAD_BYTES} bytes, got {MAX_UPLOAD_BYTES + 1}"
    assert_error(response, 422, detail, "file")
    assert_nothing_stored(settings)
