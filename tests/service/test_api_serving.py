"""Serving at scale (issue 13): bad input that used to get through, dynamic micro-batching, the
per-request limits (cost, deadline, queue bound, disconnect), and streaming sessions.

The tiny copy / adding / text models are trained once by a real worker (the ``models`` fixture of
test_api_predict.py); requests go through the real app, concurrent ones over one event loop
(``httpx.AsyncClient`` on the app), as uvicorn would run them.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import httpx
import pytest
import redis
import torch
from api_server import running_api
from deploy.faults import RedisServer
from fastapi.testclient import TestClient
from test_api_predict import MAX_LENGTH, models  # noqa: F401 - the module's trained models

from app.main import create_app
from app.predictor import ClientDisconnected, Job
from app.sessions import count_sessions
from kru_client import Client
from worker import service
from worker.session_store import REDIS_PREFIX
from worker.settings import Settings

pytestmark = pytest.mark.slow

Models = tuple[Settings, dict[str, str]]


@pytest.fixture
def ids(models: Models) -> dict[str, str]:  # noqa: F811
    return models[1]


def make_client(models: Models, **overrides: Any) -> TestClient:  # noqa: F811
    settings = models[0].model_copy(update={"max_sequence_length": MAX_LENGTH, **overrides})
    return TestClient(create_app(settings))


@pytest.fixture
def client(models: Models) -> Iterator[TestClient]:  # noqa: F811
    with make_client(models, batch_max_delay_ms=50.0) as c:
        yield c


def gather(client: TestClient, requests: list[tuple[str, str, Any]]) -> list[httpx.Response]:
    """Send ``(method, url, json)`` requests concurrently to the client's app, in one loop."""

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await asyncio.gather(*(c.request(m, u, json=b) for m, u, b in requests))

    return asyncio.run(run())


def close(a: Any, b: Any) -> bool:
    """Equal labels, and floats equal to float32 rounding."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    return a == b


# --- bad input that used to get through -----------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-38, 1e-300, 5e-324, 1e-6])
def test_tiny_temperatures_sample_the_likeliest(
    client: TestClient, ids: dict[str, str], temperature: float
) -> None:
    url = f"/v1/models/{ids['text']}/generate"
    body = {"prompt": "the ", "max_new_tokens": 5, "seed": 1}
    tiny = client.post(url, json={**body, "temperature": temperature})
    assert tiny.status_code == 200, tiny.text
    greedy = client.post(url, json={**body, "temperature": 0}).json()["text"]
    if temperature < 1e-30:  # all mass on the maximum: greedy (unless the logits tie)
        assert tiny.json()["text"] == greedy


def test_finite_input_with_non_finite_output_is_422(
    client: TestClient, ids: dict[str, str]
) -> None:
    url = f"/v1/models/{ids['adding']}/predict"
    huge = client.post(url, json={"inputs": [[[1e308, 1], [0.2, 1]]]})
    assert huge.status_code == 422, huge.text
    assert huge.json()["field"] == "inputs.0.0.0"
    assert "float32" in huge.json()["detail"]
    # A model whose arithmetic overflows for finite inputs (its readout scaled up): the
    # sequence is named, the others of the batch are not affected.
    model = client.app.state.predictor.cache.get(ids["adding"])  # type: ignore[attr-defined]
    with torch.no_grad():
        model.model.readout.weight.mul_(1e38)
    edge = client.post(url, json={"inputs": [[[0.0, 0]], [[3e30, 1], [1, 1]]]})
    assert edge.status_code == 422, edge.text
    assert edge.json()["field"] == "inputs.1"
    assert "not finite" in edge.json()["detail"]


def test_probabilities_on_a_regression_model_is_422(
    client: TestClient, ids: dict[str, str]
) -> None:
    response = client.post(
        f"/v1/models/{ids['adding']}/predict",
        json={"inputs": [[[0.5, 1]]], "probabilities": True},
    )
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "probabilities"


def test_a_boolean_token_is_one_error(client: TestClient, ids: dict[str, str]) -> None:
    response = client.post(f"/v1/models/{ids['copy']}/predict", json={"inputs": [[1, True, 3]]})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == "inputs.0.1"
    assert [e["field"] for e in body["errors"]] == ["inputs.0.1"]
    mixed = client.post(
        f"/v1/models/{ids['adding']}/predict", json={"inputs": [[[0.5, 1], 3]]}
    ).json()
    assert [e["field"] for e in mixed["errors"]] == ["inputs.0.1"]


def test_event_stream_schema_documents_the_events(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/v1/jobs/{job_id}/events"]["get"]
    event = operation["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert event["properties"]["event"]["enum"] == ["status", "progress", "end"]
    assert event["required"] == ["event", "data"]


# --- micro-batching ---------------------------------------------------------------------------


def test_concurrent_predictions_are_batched_and_identical_to_unbatched(
    client: TestClient, ids: dict[str, str]
) -> None:
    bodies = []
    for i in range(12):
        bodies.append(("copy", {"inputs": [[1 + i % 8, 2, 3, 0, 0, 9][: 2 + i % 5]]}))
        bodies.append(("adding", {"inputs": [[[0.1 * i, 1], [0.5, 0], [0.25, 1]][: 1 + i % 3]]}))
        bodies.append(("text", {"inputs": ["the cat sat"[: 1 + i], [0, 1]]}))
    bodies.append(("copy", {"inputs": [[1, 2]], "probabilities": True}))
    predictor = client.app.state.predictor  # type: ignore[attr-defined]
    unbatched = [predictor.predict(ids[k], b["inputs"], **_probs(b)) for k, b in bodies]
    responses = gather(client, [("POST", f"/v1/models/{ids[k]}/predict", b) for k, b in bodies])
    for response, expected in zip(responses, unbatched, strict=True):
        assert response.status_code == 200, response.text
        got = response.json()
        assert close(got["predictions"], expected["predictions"])
        assert close(got.get("probabilities"), expected.get("probabilities"))
    metrics = client.get("/metrics").text
    count = _metric(metrics, 'kru_batch_size_count{kind="predict"}')
    total = _metric(metrics, 'kru_batch_size_sum{kind="predict"}')
    assert total == sum(len(b["inputs"]) for _, b in bodies)
    assert count < len(bodies) / 2, "requests were not merged"
    assert _metric(metrics, 'kru_batch_queue_wait_seconds_count{kind="predict"}') == len(bodies)


def _probs(body: dict[str, Any]) -> dict[str, Any]:
    return {"probabilities": body.get("probabilities", False)}


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_bad_request_does_not_fail_its_batch(client: TestClient, ids: dict[str, str]) -> None:
    url = f"/v1/models/{ids['copy']}/predict"
    good, bad = {"inputs": [[1, 2, 3]]}, {"inputs": [[1, 99]]}
    responses = gather(client, [("POST", url, b) for b in (good, bad, good, bad, good)])
    assert [r.status_code for r in responses] == [200, 422, 200, 422, 200]


def test_an_exception_fails_only_its_batch(
    client: TestClient, ids: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor = client.app.state.predictor  # type: ignore[attr-defined]
    url = f"/v1/models/{ids['copy']}/predict"
    client.post(url, json={"inputs": [[1]]})
    model = predictor.cache.get(ids["copy"])
    original = model.forward_batch
    calls = []

    def once_broken(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated kernel failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward_batch", once_broken)
    failed = gather(client, [("POST", url, {"inputs": [[1, 2]]})] * 3)
    assert {r.status_code for r in failed} == {500}
    assert "simulated kernel failure" in failed[0].json()["detail"]
    assert client.post(url, json={"inputs": [[1, 2]]}).status_code == 200


def test_short_passes_run_on_the_event_loop_and_long_ones_in_a_thread(
    models: Models,  # noqa: F811
    ids: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """KRU_INLINE_FORWARD_MS: a pass expected (at the model's last rate) within it runs on the
    event loop; the first pass of a model, and longer ones, in a worker thread. Same answers."""
    url = f"/v1/models/{ids['copy']}/predict"
    short, long = [[1, 2, 3]], [[1, 2, 3] * (MAX_LENGTH // 3)]
    answers: dict[float, list[Any]] = {}
    threads: dict[float, list[str]] = {}
    for limit in (0.0, 10.0):
        with make_client(models, inline_forward_ms=limit) as client:
            predictor = client.app.state.predictor  # type: ignore[attr-defined]
            client.post(url, json={"inputs": short})  # loads the model: its first pass
            model = predictor.cache.get(ids["copy"])
            original = model.forward_batch
            names: list[str] = []

            def recorded(
                *args: Any, _names: list[str] = names, _f: Any = original, **kw: Any
            ) -> Any:
                _names.append(threading.current_thread().name)
                return _f(*args, **kw)

            monkeypatch.setattr(model, "forward_batch", recorded)
            answers[limit] = []
            for inputs in (short, long):
                # a known rate, 1 ms a step: the short pass is expected to take 3 ms, the long 63
                predictor.record_pass(ids["copy"], "predict", 1.0, 1000)
                answers[limit].append(client.post(url, json={"inputs": inputs}).json())
            threads[limit] = names
    assert answers[0.0] == answers[10.0]
    assert all(name.startswith("kru-forward") for name in threads[0.0]), threads
    short_thread, long_thread = threads[10.0]
    assert not short_thread.startswith("kru-forward"), threads  # the event loop's own thread
    assert long_thread.startswith("kru-forward"), threads


def test_a_model_s_first_pass_and_a_busy_model_s_pass_run_in_a_thread(
    models: Models,  # noqa: F811
    ids: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Never inline: before any rate is known (the first pass), nor while another call holds
    the model (the loop would wait on its lock); answers unchanged."""
    url = f"/v1/models/{ids['copy']}/predict"
    with make_client(models, inline_forward_ms=100.0) as client:
        predictor = client.app.state.predictor  # type: ignore[attr-defined]
        model = predictor.cache.get(ids["copy"])  # loaded, no pass yet
        original = model.forward_batch
        names: list[str] = []

        def recorded(*args: Any, **kwargs: Any) -> Any:
            names.append(threading.current_thread().name)
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "forward_batch", recorded)
        assert predictor.expected_seconds(ids["copy"], "predict", 3) == math.inf
        first = client.post(url, json={"inputs": [[1, 2, 3]]}).json()
        assert 0 < predictor.expected_seconds(ids["copy"], "predict", 3) < math.inf
        with model._lock:  # another call (a generation, a session pass) holds the model
            busy = asyncio.run(_post_while_held(client, url, model))
        assert busy == first
        kinds = ["thread" if n.startswith("kru-forward") else "loop" for n in names]
        # first pass: a thread; busy: tried inline (refused at once), then a thread
        assert kinds == ["thread", "loop", "thread"], names


async def _post_while_held(client: TestClient, url: str, model: Any) -> Any:
    """POST ``url`` on the client's app while the test holds ``model``'s lock, releasing it
    once the request has been refused inline (so the thread's pass can run)."""
    transport = httpx.ASGITransport(app=client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        request = asyncio.ensure_future(http.post(url, json={"inputs": [[1, 2, 3]]}))
        await asyncio.sleep(0.2)
        model._lock.release()
        try:
            return (await request).json()
        finally:
            model._lock.acquire()


#: ``slow_copy(delay, **settings)``: see the fixture.
SlowCopy = Callable[..., AbstractContextManager[tuple[TestClient, str, list[int]]]]


@pytest.fixture
def slow_copy(
    models: Models,  # noqa: F811
    ids: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> SlowCopy:
    """``with slow_copy(delay, **settings) as (client, url, calls)``: a client of an app with
    these settings whose copy model (``url``: its predict route, answered once) then takes
    ``delay`` s per batch; ``calls``: the size of each batch computed since."""

    @contextmanager
    def open_client(delay: float, **settings: Any) -> Iterator[tuple[TestClient, str, list[int]]]:
        # every pass in a worker thread: the fast first pass must not make the slow ones inline
        with make_client(models, **{"inline_forward_ms": 0.0, **settings}) as client:
            url = f"/v1/models/{ids['copy']}/predict"
            client.post(url, json={"inputs": [[1]]})
            model = client.app.state.predictor.cache.get(ids["copy"])  # type: ignore[attr-defined]
            original = model.forward_batch
            calls: list[int] = []

            def slow(sequences: Any, **kwargs: Any) -> Any:
                calls.append(len(sequences))
                time.sleep(delay)
                return original(sequences, **kwargs)

            monkeypatch.setattr(model, "forward_batch", slow)
            yield client, url, calls

    return open_client


def test_full_queue_is_503_with_retry_after(slow_copy: SlowCopy) -> None:
    with slow_copy(0.3, batch_queue_size=2, batch_max_size=1) as (client, url, _):
        responses = gather(client, [("POST", url, {"inputs": [[1, 2]]})] * 6)
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and 503 in codes, codes
        busy = next(r for r in responses if r.status_code == 503)
        assert int(busy.headers["Retry-After"]) >= 1
        assert "KRU_BATCH_QUEUE_SIZE=2" in busy.json()["detail"]


def test_deadline_is_504_and_the_work_is_dropped(slow_copy: SlowCopy) -> None:
    with slow_copy(0.5, predict_timeout=0.2, batch_max_size=1) as (client, url, calls):
        responses = gather(client, [("POST", url, {"inputs": [[1, 2]]})] * 4)
        assert [r.status_code for r in responses].count(504) >= 3
        assert "KRU_PREDICT_TIMEOUT=0.2" in next(
            r.json()["detail"] for r in responses if r.status_code == 504
        )
        time.sleep(1.0)
        assert len(calls) <= 2, "requests past their deadline were still computed"


def test_a_disconnected_client_is_dropped_from_the_queue(
    slow_copy: SlowCopy, ids: dict[str, str]
) -> None:
    with slow_copy(0.3, batch_max_size=1) as (client, _, calls):
        predictor = client.app.state.predictor  # type: ignore[attr-defined]
        model = predictor.cache.get(ids["copy"])

        async def scenario() -> list[Any]:
            first = asyncio.ensure_future(predictor.run(ids["copy"], Job(model.encode([[1]]))))
            gone = asyncio.Event()
            second = asyncio.ensure_future(
                predictor.run(ids["copy"], Job(model.encode([[2]])), disconnected=gone.wait)
            )
            await asyncio.sleep(0.01)
            gone.set()  # the second client hangs up while the first batch runs
            return await asyncio.gather(first, second, return_exceptions=True)

        first, second = asyncio.run(scenario())
        assert isinstance(second, ClientDisconnected)
        assert not isinstance(first, Exception)
        time.sleep(0.5)
        assert calls == [1], "the disconnected client's work was computed"


def test_cost_limit_is_422_naming_it(models: Models, ids: dict[str, str]) -> None:  # noqa: F811
    with make_client(models, max_request_cost=1000.0) as client:
        response = client.post(f"/v1/models/{ids['copy']}/predict", json={"inputs": [[1] * 60]})
        assert response.status_code == 422, response.text
        assert response.json()["field"] == "inputs"
        assert "KRU_MAX_REQUEST_COST" in response.json()["detail"]
        generate = client.post(
            f"/v1/models/{ids['text']}/generate", json={"prompt": "the", "max_new_tokens": 60}
        )
        assert generate.status_code == 422 and "KRU_MAX_REQUEST_COST" in generate.text


# --- sessions ---------------------------------------------------------------------------------

WHOLE = {
    "copy": [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0],
    "adding": [[0.1 * (i % 7), float(i in (3, 11))] for i in range(17)],
    "text": "the cat sat on the mat. the rat",
}
CHUNKS = [3, 1, 5, 2, 100]  # the last one takes the rest


def chunked(sequence: Any) -> list[Any]:
    parts, start = [], 0
    for size in CHUNKS:
        if start < len(sequence):
            parts.append(sequence[start : start + size])
            start += size
    return parts


def stream(http: Any, session_id: str, sequence: Any, start: int = 0) -> list[Any]:
    out, position = [], start
    for part in chunked(sequence):
        response = http.post(
            f"/v1/sessions/{session_id}/predict", json={"inputs": part, "position": position}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["position"] == position + len(part)
        position = body["position"]
        out.append(body["predictions"])
    return out


@pytest.mark.parametrize("kind", sorted(WHOLE))
def test_a_chunked_sequence_gets_the_predictions_of_the_whole(
    client: TestClient, ids: dict[str, str], kind: str
) -> None:
    whole = client.post(f"/v1/models/{ids[kind]}/predict", json={"inputs": [WHOLE[kind]]})
    assert whole.status_code == 200, whole.text
    expected = whole.json()["predictions"][0]
    created = client.post(f"/v1/models/{ids[kind]}/sessions", json={"ttl_seconds": 60})
    assert created.status_code == 201, created.text
    info = created.json()
    assert set(info) >= {"id", "model_id", "position", "created_at", "expires_at"}
    assert (info["model_id"], info["position"]) == (ids[kind], 0)
    parts = stream(client, info["id"], WHOLE[kind])
    if kind == "adding":  # a sequence-level model: the value after each chunk's last step
        prefix_ends = [
            sum(len(p) for p in chunked(WHOLE[kind])[: i + 1]) for i in range(len(parts))
        ]
        prefixes = [WHOLE[kind][:n] for n in prefix_ends]
        after = client.post(f"/v1/models/{ids[kind]}/predict", json={"inputs": prefixes}).json()
        assert close([p[0] for p in parts], after["predictions"])
        assert close(parts[-1][0], expected)
    else:
        assert [label for part in parts for label in part] == expected
    assert client.get(f"/v1/sessions/{info['id']}").json()["position"] == len(WHOLE[kind])


def test_session_positions_are_exactly_once(client: TestClient, ids: dict[str, str]) -> None:
    session = client.post(f"/v1/models/{ids['copy']}/sessions").json()
    url = f"/v1/sessions/{session['id']}/predict"
    first = client.post(url, json={"inputs": [1, 2, 3], "position": 0})
    assert first.status_code == 200, first.text
    again = client.post(url, json={"inputs": [1, 2, 3], "position": 0})  # a retry
    assert again.status_code == 200 and again.json() == first.json()
    assert client.get(f"/v1/sessions/{session['id']}").json()["position"] == 3
    other = client.post(url, json={"inputs": [4], "position": 0})  # not a retry: other inputs
    assert other.status_code == 409 and "current position 3" in other.json()["detail"]
    ahead = client.post(url, json={"inputs": [4], "position": 7})
    assert ahead.status_code == 409 and "current position 3" in ahead.json()["detail"]
    bad = client.post(url, json={"inputs": [4, 99], "position": 3})
    assert bad.status_code == 422 and bad.json()["field"] == "inputs.1", bad.text
    assert client.post(url, json={"inputs": [4], "position": 3}).json()["position"] == 4
    assert client.delete(f"/v1/sessions/{session['id']}").status_code == 204
    assert client.get(f"/v1/sessions/{session['id']}").status_code == 404
    assert client.post(url, json={"inputs": [4], "position": 4}).status_code == 404


def test_concurrent_steps_of_sessions_are_batched(client: TestClient, ids: dict[str, str]) -> None:
    sessions = [client.post(f"/v1/models/{ids['text']}/sessions").json() for _ in range(8)]
    text = WHOLE["text"]
    expected = client.post(
        f"/v1/models/{ids['text']}/predict", json={"inputs": [text[: 5 + i] for i in range(8)]}
    ).json()["predictions"]
    first = gather(
        client,
        [("POST", f"/v1/sessions/{s['id']}/predict", {"inputs": text[:3], "position": 0})
         for s in sessions],
    )  # fmt: skip
    second = gather(
        client,
        [("POST", f"/v1/sessions/{s['id']}/predict", {"inputs": text[3 : 5 + i], "position": 3})
         for i, s in enumerate(sessions)],
    )  # fmt: skip
    for i in range(8):
        assert first[i].json()["predictions"] + second[i].json()["predictions"] == expected[i]
    metrics = client.get("/metrics").text
    assert _metric(metrics, 'kru_batch_size_count{kind="session"}') < 16 / 2


def test_sessions_expire_and_are_bounded(models: Models, ids: dict[str, str]) -> None:  # noqa: F811
    service.init(models[0])
    limit = count_sessions() + 2  # the module's other tests left theirs open
    with make_client(models, max_sessions=limit) as client:
        url = f"/v1/models/{ids['copy']}/sessions"
        short = client.post(url, json={"ttl_seconds": 0.5}).json()
        client.post(url, json={"ttl_seconds": 60})
        full = client.post(url)
        assert full.status_code == 429 and f"KRU_MAX_SESSIONS={limit}" in full.json()["detail"]
        assert int(full.headers["Retry-After"]) >= 1
        time.sleep(0.7)
        assert client.get(f"/v1/sessions/{short['id']}").status_code == 404
        assert client.post(url).status_code == 201  # the expired one no longer counts
        assert client.post(url, json={"ttl_seconds": -1}).status_code == 422


@pytest.mark.parametrize("store", ["database", "redis"])
def test_a_session_continues_on_another_api_process_and_after_a_restart(
    models: Models,  # noqa: F811
    ids: dict[str, str],
    tmp_path: Any,
    store: str,
) -> None:
    """Two API processes share the session; then the API restarts. With ``KRU_SESSION_STORE``
    on a private Redis, Redis is killed (SIGKILL) and restarted in between as well."""
    server = None
    settings = models[0]
    if store == "redis":
        server = RedisServer(tmp_path / "redis")
        server.start()
        settings = settings.model_copy(update={"session_store": server.url})
    try:
        _continue_a_session(settings, ids, tmp_path, server)
    finally:
        if server is not None:
            server.stop()


def _continue_a_session(
    settings: Settings, ids: dict[str, str], tmp_path: Any, server: RedisServer | None
) -> None:
    sequence = WHOLE["copy"]
    expected_all: list[int] = []
    with TestClient(create_app(settings)) as local:
        expected_all = local.post(
            f"/v1/models/{ids['copy']}/predict", json={"inputs": [sequence]}
        ).json()["predictions"][0]
    parts = chunked(sequence)
    got: list[int] = []
    with (
        running_api(settings, tmp_path / "a.log") as a,
        running_api(settings, tmp_path / "b.log") as b,
        a.client() as ca,
        b.client() as cb,
    ):
        session = ca.post(f"/v1/models/{ids['copy']}/sessions").json()
        url = f"/v1/sessions/{session['id']}/predict"
        position = 0
        for i, part in enumerate(parts[:3]):
            http = ca if i % 2 == 0 else cb  # alternate replicas
            body = http.post(url, json={"inputs": part, "position": position}).json()
            got += body["predictions"]
            position = body["position"]
        # b remembers the row it wrote at position 4, which a has moved on since: its
        # conditional write refuses, and b answers from the store
        stale = cb.post(url, json={"inputs": [7], "position": 4})
        assert stale.status_code == 409, stale.text
        assert f"current position {position}" in stale.json()["detail"]
        # the same chunk sent to the other replica as a retry: the same answer
        retry = cb.post(url, json={"inputs": parts[2], "position": position - len(parts[2])})
        assert retry.json()["predictions"] == body["predictions"]
        # the model is in use: not deleted while the session is open
        in_use = ca.delete(f"/v1/models/{ids['copy']}")
        assert in_use.status_code == 409 and "streaming session" in in_use.json()["detail"]
    if server is not None:  # the session is in Redis (its append-only file survives a SIGKILL)
        raw = redis.Redis.from_url(server.url)
        assert raw.hget(REDIS_PREFIX + session["id"], "position") == b"%d" % position
        raw.close()
        server.kill()
        server.start()
    with running_api(settings, tmp_path / "c.log") as c, c.client() as cc:  # restarted
        assert cc.get(f"/v1/sessions/{session['id']}").json()["position"] == position
        for part in parts[3:-1]:
            body = cc.post(url, json={"inputs": part, "position": position}).json()
            got += body["predictions"]
            position = body["position"]
        # kru_client: a new session streams the whole sequence; a chunk resent after its answer
        # was lost (the position not advanced on the client) gets the same answer
        with Client(c.base_url) as client, client.session(ids["copy"]) as stream:
            streamed = []
            for part in parts:
                streamed += stream.predict(part)
            stream.position -= len(parts[-1])
            assert stream.predict(parts[-1]) == streamed[-len(parts[-1]) :]
            assert stream.info()["position"] == len(sequence)
        body = cc.post(url, json={"inputs": parts[-1], "position": position}).json()
        got += body["predictions"]
    assert got == expected_all
    assert streamed == expected_all


def test_concurrent_duplicate_chunks_advance_once(client: TestClient, ids: dict[str, str]) -> None:
    session = client.post(f"/v1/models/{ids['copy']}/sessions").json()
    url = f"/v1/sessions/{session['id']}/predict"
    results = []
    lock = threading.Lock()

    def send(inputs: list[int]) -> None:
        response = client.post(url, json={"inputs": inputs, "position": 0})
        with lock:
            results.append((inputs, response.status_code, response.json()))

    threads = [threading.Thread(target=send, args=([1, 2] if i % 2 else [3, 4],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = {tuple(i) for i, code, _ in results if code == 200}
    assert len(winners) == 1, results  # one chunk won; its duplicates got its answer
    assert all(code == 409 for i, code, _ in results if tuple(i) not in winners)
    assert client.get(f"/v1/sessions/{session['id']}").json()["position"] == 2


def test_a_client_that_hangs_up_over_http_gets_its_work_dropped(
    models: Models,  # noqa: F811
    ids: dict[str, str],
    tmp_path: Any,
) -> None:
    """Through uvicorn: a request whose client closes the connection while it waits behind a
    long forward pass is never computed (the batch-size histogram counts the passes)."""
    heavy = {"inputs": [[1, 2, 3, 4, 5, 6, 7, 8, 0, 9] * 1000] * 100}  # 1,000,000 steps
    url = f"/v1/models/{ids['copy']}/predict"
    settings = models[0].model_copy(update={"max_request_bytes": 8 << 20})
    with running_api(settings, tmp_path / "api.log") as api, api.client() as http:
        assert http.post(url, json={"inputs": [[1]]}).status_code == 200  # loaded
        first = threading.Thread(target=lambda: http.post(url, json=heavy, timeout=120))
        first.start()
        with api.client() as watch:  # wait until the heavy forward pass has started
            deadline = time.monotonic() + 60
            while _metric(watch.get("/metrics").text, 'kru_batch_size_count{kind="predict"}') < 2:
                assert time.monotonic() < deadline, "the heavy request never reached the model"
                time.sleep(0.05)
        port = int(api.base_url.rsplit(":", 1)[1])
        raw = json.dumps({"inputs": [[3]]}).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(raw)}\r\n\r\n".encode()
                + raw
            )
            time.sleep(0.2)  # queued behind the heavy one; then the client hangs up
        first.join(120)
        with api.client() as other:
            assert other.post(url, json={"inputs": [[2]]}).status_code == 200
        metrics = http.get("/metrics").text
    passes = _metric(metrics, 'kru_batch_size_count{kind="predict"}')
    sequences = _metric(metrics, 'kru_batch_size_sum{kind="predict"}')
    assert (passes, sequences) == (3, 1 + 100 + 1), metrics
    assert 'status="499"' in metrics
