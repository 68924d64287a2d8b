"""Issue 11, the jobs that were accepted but could never do what they say: refused at submit
with a 422 naming the field (admission by cost, dense factors, max_seconds' minimum)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from kru_core.config import MAX_FACTOR_SIZE
from worker import service
from worker.settings import Settings

GIB = 2**30


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("kru"), reaper_interval=0, max_job_memory_bytes=8 * GIB
    )
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        (  # a KRU of N=8192 for a million steps: days of the only worker
            {"model": {"cell": "kru", "hidden_size": 8192}, "train": {"steps": 1_000_000}},
            "train.steps",
            "more than KRU_MAX_JOB_SECONDS (86400 s): at most about",
        ),
        (  # the 243 GB allocation, refused before it is tried
            {
                "model": {"cell": "lstm", "hidden_size": 8192},
                "train": {"steps": 1_000_000, "batch_size": 4096},
            },
            "train.batch_size",
            "(mostly activations for backpropagation); a worker admits 8 GiB",
        ),
        (  # a dense RNN in disguise
            {"model": {"hidden_size": 8192, "factors": [8192]}},
            "model.factors.0",
            f"expected factor sizes of at most {MAX_FACTOR_SIZE}, got 8192",
        ),
        (  # the same through the default factorization of a prime hidden size
            {"model": {"hidden_size": 8191}},
            "model.hidden_size",
            "hidden size 8191 factors into [8191]",
        ),
        (  # succeeded at step 0 before
            {"train": {"steps": 3, "max_seconds": 1e-300}},
            "train.max_seconds",
            "greater than or equal to 1",
        ),
    ],
    ids=["kru-8192-1M-steps", "lstm-8192-batch-4096", "factor-8192", "prime-8191", "max-seconds"],
)
def test_jobs_that_cannot_fit_are_refused_naming_the_field(
    client: TestClient, body: dict[str, Any], field: str, fragment: str
) -> None:
    before = service.list_jobs().total
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["field"] == field and fragment in error["detail"], error
    assert service.list_jobs().total == before  # nothing stored


def test_what_fits_is_accepted(client: TestClient) -> None:
    small = {"model": {"hidden_size": 64}, "train": {"steps": 10, "device": "cpu"}}
    assert client.post("/v1/jobs", json=small).status_code == 202
    dense = {"model": {"hidden_size": 128, "factors": [128], "allow_dense_factors": True}}
    assert client.post("/v1/jobs", json={**dense, "train": {"steps": 10}}).status_code == 202
