"""Predictions and generation over HTTP, and every way a request can fail to fit its model.

Three tiny models (copy: tokens, adding: 2 features per step, text: characters) are trained once
for the module by a real worker subprocess; the requests then go through the real app. Each bad
request is a ``422`` naming the offending value, and nothing is stored.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import FAST, REPO, WorkerProcess
from fastapi.testclient import TestClient

from app.main import create_app
from kru_core.config import JobConfig
from worker import service
from worker.settings import Settings

pytestmark = pytest.mark.slow

MAX_SEQUENCES = 4
MAX_LENGTH = 64
TEXT = "the cat sat on the mat. the rat ate the hat. " * 40

TRAIN = {"steps": 20, "batch_size": 8, "eval_every": 10, "checkpoint_every": 10, "device": "cpu"}
JOBS = {
    "copy": {"task": {"kind": "copy", "delay": 5, "eval_size": 16}},
    "adding": {"task": {"kind": "adding", "length": 10, "eval_size": 16}},
    "text": {"task": {"kind": "text", "seq_len": 20, "eval_size": 16}},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, dict[str, str]]]:
    """``(settings, {"copy": model id, "adding": ..., "text": ...})`` on the embedded default."""
    tmp = tmp_path_factory.mktemp("predict")
    settings = Settings(data_dir=tmp / "kru", **FAST)
    service.init(settings)
    dataset = service.create_dataset("tiny.txt", TEXT.encode())
    job_ids = {}
    for kind, spec in JOBS.items():
        data = {**spec, "model": {"cell": "kru", "hidden_size": 8}, "train": TRAIN}
        if kind == "text":
            data["task"] = {**data["task"], "dataset_id": dataset.id}
        job_ids[kind] = service.submit_job(JobConfig.from_dict(data)).id
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    log_path = tmp / "worker.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker"],
        cwd=REPO,
        env={**os.environ, **settings.to_env(), "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    worker = WorkerProcess(proc, log_path, settings, log)
    try:
        deadline = time.monotonic() + 180
        for kind, job_id in job_ids.items():
            while (job := service.get_job(job_id)).finished_at is None:
                assert time.monotonic() < deadline, f"the {kind} job did not finish in 180 s"
                time.sleep(0.1)
            assert job.status == "succeeded", (job.error, worker.log()[-3000:])
    finally:
        worker.close()
    model_ids = {kind: service.get_job(job_id).model_id for kind, job_id in job_ids.items()}
    yield settings, model_ids  # type: ignore[misc]
    service.shutdown()


@pytest.fixture
def client(models: tuple[Settings, dict[str, str]]) -> Iterator[TestClient]:
    settings = models[0].model_copy(
        update={"max_sequences_per_request": MAX_SEQUENCES, "max_sequence_length": MAX_LENGTH}
    )
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def ids(models: tuple[Settings, dict[str, str]]) -> dict[str, str]:
    return models[1]


def post_body(client: TestClient, url: str, body: bytes | dict):
    """POST ``body`` to ``url``: a dict as JSON, bytes as they are (JSON that must not parse)."""
    if isinstance(body, bytes):
        return client.post(url, content=body, headers={"content-type": "application/json"})
    return client.post(url, json=body)


def predict(client: TestClient, model_id: str, body: bytes | dict):
    return post_body(client, f"/v1/models/{model_id}/predict", body)


def assert_422(response, field: str, detail: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert (body["field"], body["detail"]) == (field, detail)


def test_good_predictions(client: TestClient, ids: dict[str, str]) -> None:
    copy = predict(client, ids["copy"], {"inputs": [[1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 0, 0], [3]]})
    assert copy.status_code == 200, copy.text
    assert [len(p) for p in copy.json()["predictions"]] == [12, 1]  # one label per step

    adding = predict(client, ids["adding"], {"inputs": [[[0.5, 1], [0.25, 1], [0.0, 0]]]})
    assert adding.status_code == 200, adding.text
    assert isinstance(adding.json()["predictions"][0], float)  # one value per sequence

    text = predict(client, ids["text"], {"inputs": ["the cat", [0, 1, 2]]})
    assert text.status_code == 200, text.text
    assert [len(p) for p in text.json()["predictions"]] == [7, 3]

    probs = predict(client, ids["copy"], {"inputs": [[1, 2]], "probabilities": True}).json()
    assert (
        len(probs["probabilities"][0]) == 2 and len(probs["probabilities"][0][0]) == 9
    )  # outputs 0..8


#: ``(model kind, request body, the field the 422 names, its detail)``; a detail of None: see
#: each test.
BadRequest = tuple[str, bytes | dict, str, str | None]

BAD_PREDICTIONS: list[BadRequest] = [
    ("copy", {"inputs": [[1, 2, 10]]}, "inputs.0.2", "expected a token in [0, 9], got 10"),
    ("copy", {"inputs": [[1], [-1]]}, "inputs.1.0", "expected a token in [0, 9], got -1"),
    (
        "copy",
        {"inputs": [[1, 2.5]]},
        "inputs.0.1",
        "expected a token (an integer in [0, 9]), got 2.5: this model takes lists of tokens",
    ),
    (
        "copy",
        {"inputs": [[[0.5, 1.0]]]},
        "inputs.0.0",
        "expected a token (an integer in [0, 9]), got [0.5, 1.0]: this model takes lists of tokens",
    ),
    (
        "copy",
        {"inputs": ["hello"]},
        "inputs.0",
        "expected a list of tokens: only text models take strings",
    ),
    (
        "copy",
        {"inputs": [[1]] * (MAX_SEQUENCES + 1)},
        "inputs",
        f"expected at most {MAX_SEQUENCES} sequences, got {MAX_SEQUENCES + 1}",
    ),
    (
        "copy",
        {"inputs": [[1] * (MAX_LENGTH + 1)]},
        "inputs.0",
        f"expected at most {MAX_LENGTH} steps, got {MAX_LENGTH + 1}",
    ),
    ("copy", {"inputs": []}, "inputs", "List should have at least 1 item after validation, not 0"),
    (
        "copy",
        {"inputs": [[]]},
        "inputs.0",
        "List should have at least 1 item after validation, not 0",
    ),
    ("copy", {"inputs": [[1]], "input": [[1]]}, "input", "unknown field"),
    (
        "adding",
        {"inputs": [[[0.5, 1.0], [0.5]]]},
        "inputs.0.1",
        "expected 2 features per step, got 1",
    ),
    (
        "adding",
        {"inputs": [[0.5, 1.0]]},
        "inputs.0.0",
        "expected a feature vector (a list of 2 numbers), got 0.5: this model takes lists of "
        "feature vectors",
    ),
    (
        "adding",
        b'{"inputs": [[[0.5, 1.0], [NaN, 0.0]]]}',
        "inputs.0.1.0",
        "expected a finite number, got nan",
    ),
    (
        "adding",
        b'{"inputs": [[[Infinity, 1.0]]]}',
        "inputs.0.0.0",
        "expected a finite number, got inf",
    ),
    (
        "adding",
        {"inputs": ["ab"]},
        "inputs.0",
        "expected a list of feature vectors: only text models take strings",
    ),
    (
        "text",
        {"inputs": ["the cat!"]},
        "inputs.0.7",
        "character '!' is not in the model's vocabulary",
    ),
    ("text", {"inputs": [[0, 999]]}, "inputs.0.1", None),
]


@pytest.mark.parametrize("case", BAD_PREDICTIONS)
def test_bad_prediction_input_is_422(
    client: TestClient, ids: dict[str, str], case: BadRequest
) -> None:
    kind, body, field, detail = case
    jobs_before = service.list_jobs().total
    models_before = service.list_models().total
    response = predict(client, ids[kind], body)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["field"] == field
    if detail is None:  # the text vocabulary size depends on the text
        assert error["detail"].startswith(f"{field}: expected a token in [0, ")
    else:
        assert error["detail"] == f"{field}: {detail}"
    assert service.list_jobs().total == jobs_before
    assert service.list_models().total == models_before


def test_generate(client: TestClient, ids: dict[str, str]) -> None:
    url = f"/v1/models/{ids['text']}/generate"
    body = {"prompt": "the ", "max_new_tokens": 30, "temperature": 0.8, "seed": 7}
    first = client.post(url, json=body)
    assert first.status_code == 200, first.text
    text = first.json()["text"]
    assert len(text) == 30 and set(text) <= set(TEXT)
    assert client.post(url, json=body).json()["text"] == text  # seeded: reproducible
    greedy = client.post(url, json={**body, "temperature": 0})
    assert greedy.status_code == 200 and len(greedy.json()["text"]) == 30


@pytest.mark.parametrize(
    "case",
    [
        (
            "copy",
            {"prompt": "the"},
            "model_id",
            "generate needs a text model, this one was trained on task 'copy': use /predict",
        ),
        (
            "adding",
            {"prompt": "the"},
            "model_id",
            "generate needs a text model, this one was trained on task 'adding': use /predict",
        ),
        (
            "text",
            {"prompt": "the Cat", "max_new_tokens": 5},
            "prompt.4",
            "character 'C' is not in the model's vocabulary",
        ),
        ("text", {"prompt": ""}, "prompt", "String should have at least 1 character"),
        (
            "text",
            {"prompt": "t" * (MAX_LENGTH + 1)},
            "prompt",
            f"expected at most {MAX_LENGTH} characters, got {MAX_LENGTH + 1}",
        ),
        (
            "text",
            {"prompt": "the", "max_new_tokens": MAX_LENGTH + 1},
            "max_new_tokens",
            f"expected at most {MAX_LENGTH}, got {MAX_LENGTH + 1}",
        ),
        ("text", {"prompt": "the", "max_new_tokens": 0}, "max_new_tokens", None),
        ("text", {"prompt": "the", "temperature": -1}, "temperature", None),
        ("text", b'{"prompt": "the", "temperature": NaN}', "temperature", None),
    ],
)
def test_bad_generate_request_is_422(
    client: TestClient, ids: dict[str, str], case: BadRequest
) -> None:
    kind, body, field, detail = case
    response = post_body(client, f"/v1/models/{ids[kind]}/generate", body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    if detail is not None:
        assert response.json()["detail"] == f"{field}: {detail}"


def test_models_are_listed_and_cached(client: TestClient, ids: dict[str, str]) -> None:
    listed = client.get("/v1/models").json()
    assert {m["id"] for m in listed["items"]} == set(ids.values())
    assert all("checkpoint" not in m for m in listed["items"])
    predictor = client.app.state.predictor  # type: ignore[attr-defined]
    for model_id in ids.values():
        client.post(f"/v1/models/{model_id}/predict", json={"inputs": [[0]]})
    assert len(predictor.cache) == 3
