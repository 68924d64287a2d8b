"""Schema-driven fuzzing: schemathesis generates requests from the app's own OpenAPI document.

Valid and invalid bodies, query strings, path ids and headers for every operation; every response
must be no 500, a documented status code and content type, and match its documented schema.
The number of cases tried is printed at the end (``-s``) and recorded in ``docs/deploy.md``.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.main import create_app
from worker.settings import Settings

MAX_EXAMPLES = 40  # per operation and phase; about a minute for the 16 operations on 2 cores

# schemathesis.pytest.from_fixture does not run under pytest 9, so the app is built at import;
# its lifespan (the job store) runs in the fixture below.
API_KEY = "fuzz-key-0123456789"
_DATA_DIR = Path(tempfile.gettempdir()) / f"kru-fuzz-{uuid.uuid4().hex}"  # made by the lifespan
app = create_app(
    Settings(
        data_dir=_DATA_DIR,
        max_request_bytes=64 * 1024,
        max_upload_bytes=32 * 1024,
        reaper_interval=0,
        api_keys=API_KEY,
        # Let the documented ranges be the only limits (the server's own cap on train.steps is
        # lower by default and covered in test_api_validation).
        max_steps_per_job=10_000_000,
    )
)
# Not from_asgi: it fetches the document through a TestClient whose lifespan would then close
# the job store of whichever app runs when that client is garbage-collected.
schema = schemathesis.openapi.from_dict(app.openapi())
schema.app = app
cases_tried: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def running_app() -> Iterator[None]:
    with TestClient(app):
        yield
    shutil.rmtree(_DATA_DIR, ignore_errors=True)
    print(f"\nschemathesis: {sum(cases_tried.values())} cases over {len(cases_tried)} operations")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases on every run: a CI failure reproduces
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors_and_responses_match_the_schema(case: schemathesis.Case) -> None:
    cases_tried[case.operation.label] += 1
    excluded = []
    if case.operation.label in ("POST /v1/jobs", "POST /v1/datasets"):
        # A schema cannot say "valid JSONL" or state kru_core's cross-field rules (tanh needs
        # real states, a dataset task needs an existing dataset of its kind): schema-valid
        # requests may rightly be refused there, with a 422 naming the field.
        excluded.append(positive_data_acceptance)
    case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"}, excluded_checks=excluded)
