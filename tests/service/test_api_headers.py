"""Issue 11, headers and errors: no query string in the access log, one Authorization header,
every error in the documented shape with echoed values cut, too-long integers named by field."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.auth import REPEATED_HEADER_DETAIL, bare_key_name, parse_api_keys
from app.errors import MAX_ECHO_CHARS, echo
from app.logs import QueryStringFilter
from app.main import create_app
from worker.settings import Settings

SECRET = "secret1-0123456789"
OTHER = "bob:secret2-abcdef"
HEADERS = {"Authorization": f"Bearer {SECRET}"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("kru"), api_keys=f"{SECRET},{OTHER}", reaper_interval=0
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_the_filter_leaves_other_records_alone() -> None:
    record = logging.LogRecord("uvicorn.access", 20, "", 0, "%s", ("plain",), None)
    assert QueryStringFilter().filter(record) and record.args == ("plain",)


@pytest.mark.parametrize("order", ["valid first", "invalid first"])
def test_a_repeated_authorization_header_is_a_400(client: TestClient, order: str) -> None:
    values = [f"Bearer {SECRET}", "Bearer wrong"]
    if order == "invalid first":
        values.reverse()
    headers = [("Authorization", v) for v in values]
    response = client.get("/v1/jobs", headers=headers)
    assert response.status_code == 400
    assert response.json() == {"detail": REPEATED_HEADER_DETAIL, "field": "Authorization"}


def test_one_authorization_header_still_passes(client: TestClient) -> None:
    assert client.get("/v1/jobs", headers=HEADERS).status_code == 200
    bob = {"Authorization": "Bearer secret2-abcdef"}
    assert client.get("/v1/jobs", headers=bob).status_code == 200


def test_keys_have_names() -> None:
    keys = parse_api_keys(["alice:s1", "bare-secret", "a:b:c"])
    assert [(k.name, k.secret) for k in keys] == [
        ("alice", "s1"),
        (bare_key_name("bare-secret"), "bare-secret"),
        ("a", "b:c"),
    ]
    assert bare_key_name("bare-secret").startswith("key-") and "bare" not in repr(keys[1])
    with pytest.raises(ValueError, match="unique"):
        parse_api_keys(["alice:s1", "alice:s2"])


def test_a_long_filename_is_a_422_in_the_error_shape(client: TestClient) -> None:
    name = "a" * 5000 + ".jsonl"
    response = client.post("/v1/datasets", headers=HEADERS, files={"file": (name, b"{}\n")})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == "body"
    assert body["detail"].startswith("malformed multipart body:")
    assert "header size" in body["detail"]
    assert len(response.text) < 1000


def test_a_5000_digit_seed_is_named_by_its_field(client: TestClient) -> None:
    body = '{"train": {"steps": 3, "seed": ' + "7" * 5000 + "}}"
    response = client.post(
        "/v1/jobs", headers={**HEADERS, "content-type": "application/json"}, content=body
    )
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "train.seed"
    assert response.json()["detail"] == "train.seed: integer out of range (a number of 5000 digits)"


def test_a_large_but_convertible_seed_is_a_range_error(client: TestClient) -> None:
    body = '{"train": {"steps": 3, "seed": ' + "7" * 100 + "}}"
    response = client.post(
        "/v1/jobs", headers={**HEADERS, "content-type": "application/json"}, content=body
    )
    assert response.status_code == 422
    assert response.json()["field"] == "train.seed"


def test_a_5000_character_id_is_echoed_cut(client: TestClient) -> None:
    for path in ("/v1/jobs/", "/v1/datasets/", "/v1/models/"):
        response = client.get(path + "x" * 5000, headers=HEADERS)
        assert response.status_code == 404
        detail = response.json()["detail"]
        assert "(5000 characters)" in detail and len(detail) < 2 * MAX_ECHO_CHARS + 40


def test_echo() -> None:
    assert echo("abc") == "'abc'"
    assert echo("z" * 100, 4) == "'zzzz'… (100 characters)"
