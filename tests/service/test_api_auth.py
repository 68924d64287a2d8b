"""API keys: with ``KRU_API_KEYS`` set, every route but health needs ``Authorization: Bearer``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.auth import key_matches
from app.main import create_app
from worker.settings import Settings

KEYS = "first-key-0123456789,second-key-abcdef"
OPEN_PATHS = {"/healthz", "/readyz", "/metrics"}
SOME_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("kru"), api_keys=KEYS, reaper_interval=0)
    with TestClient(create_app(settings)) as c:
        yield c


def protected_operations(client: TestClient) -> list[tuple[str, str]]:
    spec = client.get("/openapi.json").json()
    operations = []
    for path, methods in spec["paths"].items():
        for method in methods:
            concrete = path.replace("{job_id}", SOME_ID)
            concrete = concrete.replace("{dataset_id}", SOME_ID).replace("{model_id}", SOME_ID)
            operations.append((method.upper(), path, concrete))
    return operations


def test_every_v1_route_is_protected_and_health_is_open(client: TestClient) -> None:
    operations = protected_operations(client)
    assert len(operations) == 24  # every route of docs/api.md
    for method, template, path in operations:
        if template in OPEN_PATHS:
            assert client.request(method, path).status_code == 200, template
            continue
        assert template.startswith("/v1/")
        missing = client.request(method, path)
        assert missing.status_code == 401, (template, missing.text)
        assert missing.json()["detail"] == "missing API key: send 'Authorization: Bearer <key>'"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = client.request(method, path, headers={"Authorization": "Bearer first-key"})
        assert wrong.status_code == 403, template
        assert wrong.json()["detail"] == "invalid API key"
        other_scheme = client.request(method, path, headers={"Authorization": f"Basic {KEYS}"})
        assert other_scheme.status_code == 401, template


@pytest.mark.parametrize("key", ["first-key-0123456789", "second-key-abcdef"])
def test_a_valid_key_passes(client: TestClient, key: str) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    assert client.get(f"/v1/jobs/{SOME_ID}", headers=headers).status_code == 404
    submitted = client.post("/v1/jobs", json={"train": {"steps": 5}}, headers=headers)
    assert submitted.status_code == 202


def test_auth_runs_before_body_validation(client: TestClient) -> None:
    """A client without a key learns nothing about the payload it sent."""
    response = client.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 401


def test_docs_stay_open(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_key_comparison() -> None:
    assert key_matches("abc", ["x", "abc"])
    assert not key_matches("ab", ["abc"])
    assert not key_matches("abcd", ["abc"])
    assert not key_matches("abc", [])


def test_open_api_logs_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(Settings(data_dir=tmp_path / "kru", reaper_interval=0))
    with caplog.at_level(logging.WARNING, logger="app.main"), TestClient(app) as c:
        assert c.get("/v1/jobs").status_code == 200
    assert any("KRU_API_KEYS is empty" in r.getMessage() for r in caplog.records)
