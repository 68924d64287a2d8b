"""``Client`` (synchronous) and ``AsyncClient``: the kru HTTP API as typed Python calls.

Both speak HTTP only (httpx); they never import the server's packages. Idempotent calls (every
GET, and cancel) are retried with exponential backoff on ``503`` and connection errors; a job
submission, an upload, a prediction or a generation is never retried (it could run twice).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx

from kru_client.errors import KruApiError, ServiceUnavailable, error_from
from kru_client.models import (
    Dataset,
    Event,
    GenerateRequest,
    GenerateResponse,
    Job,
    JobSpec,
    MetricPoint,
    Model,
    PredictRequest,
    PredictResponse,
)

PAGE = 100


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _job_body(config: dict[str, Any] | JobSpec, name: str | None) -> dict[str, Any]:
    body = config.to_json() if isinstance(config, JobSpec) else dict(config)
    if name is not None:
        body["name"] = name
    return body


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = None
        raise error_from(response.status_code, body, response.text[:200])
    if response.status_code == 204:
        return None
    return response.json()


def _upload(path_or_bytes: str | Path | bytes, kind: str | None) -> dict[str, Any]:
    if isinstance(path_or_bytes, bytes):
        name = "data.jsonl" if kind in (None, "jsonl") else "data.txt"
        content = path_or_bytes
    else:
        path = Path(path_or_bytes)
        name, content = path.name, path.read_bytes()
    return {"files": {"file": (name, content)}, "data": {"kind": kind} if kind else {}}


class _SseParser:
    """Lines of a ``text/event-stream`` to :class:`Event` objects."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.event: str | None = None
        self.data: list[str] = []
        self.id: int | None = None

    def feed(self, line: str) -> Event | None:
        if line == "":
            if self.event is None and not self.data:
                return None
            event = Event(
                id=self.id, event=self.event or "message", data=json.loads("\n".join(self.data))
            )
            self.reset()
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        elif name == "id":
            self.id = int(value)
        return None


class _EventStream:
    """The I/O-free part of ``events`` that :class:`Client` and :class:`AsyncClient` share.

    It builds the request that opens (or resumes, with ``Last-Event-ID``) a job's event stream,
    turns the stream's lines into the events to pass on (each once, in order; :attr:`ended` after
    ``end``) and decides, on a lost connection, how long to wait before resuming or when to give
    up.
    """

    def __init__(self, client: _ClientBase, job_id: str, after: int) -> None:
        self.client = client
        self.job_id = job_id
        self.after = after
        self.failures = 0
        self.ended = False
        self._parser = _SseParser()

    def request(self) -> dict[str, Any]:
        """The ``stream()`` arguments of a (new) connection: it resumes after the last event."""
        self._parser = _SseParser()
        return {
            "method": "GET",
            "url": f"/v1/jobs/{self.job_id}/events",
            "headers": {"Last-Event-ID": str(self.after), "Accept": "text/event-stream"},
            "timeout": httpx.Timeout(self.client._http.timeout.connect, read=None),
        }

    def refused(self, response: httpx.Response) -> None:
        """Raise for an error response (its body read): a ``503`` is retried like a lost
        connection, any other error raises its :class:`KruApiError`."""
        if response.status_code != 503:
            _check(response)
        raise httpx.RemoteProtocolError("503")

    def feed(self, line: str) -> Event | None:
        """The event that ``line`` completes, unless there is none or it was already passed on."""
        event = self._parser.feed(line)
        if event is None:
            return None
        self.failures = 0
        if event.id is not None:
            if event.id <= self.after:
                return None
            self.after = event.id
        self.ended = event.event == "end"
        return event

    def lost(self, exc: Exception) -> float:
        """The seconds to wait before resuming after a lost connection; ``ServiceUnavailable``
        once more than the client's ``retries`` attempts in a row failed."""
        self.failures += 1
        if self.failures > self.client.retries:
            raise ServiceUnavailable(f"event stream of {self.job_id} lost: {exc}") from exc
        return self.client.backoff * 2 ** (self.failures - 1)


class _ClientBase:
    """The arguments and state that :class:`Client` and :class:`AsyncClient` share."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        *,
        retries: int = 4,
        backoff: float = 0.25,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self._http = self._connect(headers=_headers(api_key), timeout=timeout)

    def _connect(self, *, headers: dict[str, str], timeout: float) -> Any:
        """The httpx client (sync or async) the calls go through."""
        raise NotImplementedError


class Client(_ClientBase):
    """A synchronous client of a kru API.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer``; ``None`` for an open API.
        timeout: seconds per request (the event stream waits without limit between events).
        retries: attempts after the first for idempotent calls on 503 or connection errors.
        backoff: the first retry's delay in seconds; each next one doubles it.
    """

    _http: httpx.Client

    def _connect(self, *, headers: dict[str, str], timeout: float) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, *, idempotent: bool, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
                if response.status_code != 503 or not idempotent or attempt >= self.retries:
                    return _check(response)
            except httpx.TransportError as exc:
                if not idempotent or attempt >= self.retries:
                    raise ServiceUnavailable(f"cannot reach {self.base_url}: {exc}") from exc
            time.sleep(self.backoff * 2**attempt)
            attempt += 1

    # -- jobs -----------------------------------------------------------------------------

    def submit_job(self, config: dict[str, Any] | JobSpec, name: str | None = None) -> Job:
        """Submit a training job (a dict or a :class:`JobSpec`); it starts ``queued``."""
        body = _job_body(config, name)
        return Job.model_validate(self._request("POST", "/v1/jobs", idempotent=False, json=body))

    def get_job(self, job_id: str) -> Job:
        """The job as it stands."""
        return Job.model_validate(self._request("GET", f"/v1/jobs/{job_id}", idempotent=True))

    def list_jobs(self, status: str | None = None) -> Iterator[Job]:
        """Every job (newest first), page after page; only those with ``status`` if given."""
        offset = 0
        while True:
            params: dict[str, Any] = {"limit": PAGE, "offset": offset}
            if status:
                params["status"] = status
            page = self._request("GET", "/v1/jobs", idempotent=True, params=params)
            for item in page["items"]:
                yield Job.model_validate(item)
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5) -> Job:
        """Poll until the job has finished; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job.finished:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
            time.sleep(poll)

    def events(self, job_id: str, last_event_id: int = 0) -> Iterator[Event]:
        """The job's events until its ``end`` event (SSE).

        A dropped connection is resumed with ``Last-Event-ID``: every event comes once, in
        order.
        """
        stream = _EventStream(self, job_id, last_event_id)
        while True:
            try:
                with self._http.stream(**stream.request()) as response:
                    if response.status_code >= 400:
                        response.read()
                        stream.refused(response)
                    for line in response.iter_lines():
                        if (event := stream.feed(line)) is not None:
                            yield event
                        if stream.ended:
                            return
            except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
                time.sleep(stream.lost(exc))
            # the stream ended without ``end`` (the server restarted): resume

    def metrics(self, job_id: str, *, rows: bool = False) -> list[MetricPoint] | list[dict]:
        """The job's metric history, oldest first; ``rows``: plain dicts (one per point)."""
        points = self._request("GET", f"/v1/jobs/{job_id}/metrics", idempotent=True)
        return points if rows else [MetricPoint.model_validate(p) for p in points]

    def cancel(self, job_id: str) -> Job:
        """Cancel the job (a running one stops at its next step); ``Conflict`` if finished."""
        path = f"/v1/jobs/{job_id}/cancel"
        return Job.model_validate(self._request("POST", path, idempotent=True))

    # -- datasets -------------------------------------------------------------------------

    def upload_dataset(self, path_or_bytes: str | Path | bytes, kind: str | None = None) -> Dataset:
        """Upload a JSONL or text dataset (a path or bytes)."""
        kwargs = _upload(path_or_bytes, kind)
        return Dataset.model_validate(
            self._request("POST", "/v1/datasets", idempotent=False, **kwargs)
        )

    def get_dataset(self, dataset_id: str) -> Dataset:
        """Describe a dataset."""
        path = f"/v1/datasets/{dataset_id}"
        return Dataset.model_validate(self._request("GET", path, idempotent=True))

    def list_datasets(self) -> Iterator[Dataset]:
        """Every dataset, newest first."""
        for item in self._pages("/v1/datasets"):
            yield Dataset.model_validate(item)

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete one of the key's datasets (``Conflict`` while a queued or running job uses
        it)."""
        self._request("DELETE", f"/v1/datasets/{dataset_id}", idempotent=True)

    # -- models ---------------------------------------------------------------------------

    def list_models(self) -> Iterator[Model]:
        """Every model, newest first."""
        for item in self._pages("/v1/models"):
            yield Model.model_validate(item)

    def get_model(self, model_id: str) -> Model:
        """Describe a model."""
        return Model.model_validate(self._request("GET", f"/v1/models/{model_id}", idempotent=True))

    def predict(
        self, model_id: str, inputs: list[Any], probabilities: bool = False
    ) -> PredictResponse:
        """Run sequences through a model."""
        body = PredictRequest(inputs=inputs, probabilities=probabilities).model_dump()
        path = f"/v1/models/{model_id}/predict"
        return PredictResponse.model_validate(
            self._request("POST", path, idempotent=False, json=body)
        )

    def generate(
        self,
        model_id: str,
        prompt: str,
        max_new_tokens: int = 100,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> GenerateResponse:
        """Generate text from a character-level model."""
        body = GenerateRequest(
            prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        ).model_dump()
        path = f"/v1/models/{model_id}/generate"
        return GenerateResponse.model_validate(
            self._request("POST", path, idempotent=False, json=body)
        )

    def session(self, model_id: str, ttl_seconds: float | None = None) -> Session:
        """Open a streaming session on a model: send a sequence chunk by chunk, the model's
        hidden state carried over (``POST /v1/models/{id}/sessions``)."""
        body = {} if ttl_seconds is None else {"ttl_seconds": ttl_seconds}
        path = f"/v1/models/{model_id}/sessions"
        return Session(self, self._request("POST", path, idempotent=False, json=body))

    def get_session(self, session_id: str) -> Session:
        """An open session, to continue it from its position (``GET /v1/sessions/{id}``; another
        process may have opened it); ``NotFound`` when it is unknown, deleted or expired."""
        return Session(self, self._request("GET", f"/v1/sessions/{session_id}", idempotent=True))

    def _pages(self, path: str) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            page = self._request(
                "GET", path, idempotent=True, params={"limit": PAGE, "offset": offset}
            )
            yield from page["items"]
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return


class Session:
    """A streaming session (from :meth:`Client.session`); it tracks the position.

    Each chunk is sent with the steps already sent; the server applies a chunk exactly once, and
    answers a repeat of the last chunk with the same predictions, so :meth:`predict` retries a
    chunk on ``503`` and connection errors like an idempotent call.

    Example::

        with client.session(model_id) as session:
            for chunk in ([1, 2, 3], [4, 5], [0, 0, 9]):
                print(session.predict(chunk))    # one label per step (per-step models)
    """

    def __init__(self, client: Client, info: dict[str, Any]) -> None:
        self._client = client
        self.id: str = info["id"]
        self.model_id: str = info["model_id"]
        self.position: int = info["position"]
        self.expires_at: str = info["expires_at"]

    def predict(self, chunk: list[Any] | str) -> list[Any]:
        """The predictions of the chunk's steps (per-step models), or ``[value]`` after its
        last step (sequence models); the position advances by the chunk's steps."""
        body = {"inputs": chunk, "position": self.position}
        path = f"/v1/sessions/{self.id}/predict"
        answer = self._client._request("POST", path, idempotent=True, json=body)
        self.position = answer["position"]
        return answer["predictions"]

    def info(self) -> dict[str, Any]:
        """The server's view: ``id``, ``model_id``, ``position``, ``created_at``,
        ``expires_at``."""
        return self._client._request("GET", f"/v1/sessions/{self.id}", idempotent=True)

    def close(self) -> None:
        """Delete the session (its state is dropped)."""
        response = self._client._http.request("DELETE", f"/v1/sessions/{self.id}")
        if response.status_code != 204:  # no body to read on success
            _check(response)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """The asynchronous twin of :class:`Client` (same arguments, same methods, awaited)."""

    _http: httpx.AsyncClient

    def _connect(self, *, headers: dict[str, str], timeout: float) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=64),
        )

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, *, idempotent: bool, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
                if response.status_code != 503 or not idempotent or attempt >= self.retries:
                    return _check(response)
            except httpx.TransportError as exc:
                if not idempotent or attempt >= self.retries:
                    raise ServiceUnavailable(f"cannot reach {self.base_url}: {exc}") from exc
            await asyncio.sleep(self.backoff * 2**attempt)
            attempt += 1

    async def submit_job(self, config: dict[str, Any] | JobSpec, name: str | None = None) -> Job:
        """See :meth:`Client.submit_job`."""
        body = _job_body(config, name)
        return Job.model_validate(
            await self._request("POST", "/v1/jobs", idempotent=False, json=body)
        )

    async def get_job(self, job_id: str) -> Job:
        """See :meth:`Client.get_job`."""
        return Job.model_validate(await self._request("GET", f"/v1/jobs/{job_id}", idempotent=True))

    async def list_jobs(self, status: str | None = None) -> AsyncIterator[Job]:
        """See :meth:`Client.list_jobs`."""
        params = {"status": status} if status else {}
        async for item in self._pages("/v1/jobs", params):
            yield Job.model_validate(item)

    async def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5) -> Job:
        """See :meth:`Client.wait`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.get_job(job_id)
            if job.finished:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
            await asyncio.sleep(poll)

    async def events(self, job_id: str, last_event_id: int = 0) -> AsyncIterator[Event]:
        """See :meth:`Client.events`."""
        stream = _EventStream(self, job_id, last_event_id)
        while True:
            try:
                async with self._http.stream(**stream.request()) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        stream.refused(response)
                    async for line in response.aiter_lines():
                        if (event := stream.feed(line)) is not None:
                            yield event
                        if stream.ended:
                            return
            except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
                await asyncio.sleep(stream.lost(exc))

    async def metrics(self, job_id: str, *, rows: bool = False) -> list[MetricPoint] | list[dict]:
        """See :meth:`Client.metrics`."""
        points = await self._request("GET", f"/v1/jobs/{job_id}/metrics", idempotent=True)
        return points if rows else [MetricPoint.model_validate(p) for p in points]

    async def cancel(self, job_id: str) -> Job:
        """See :meth:`Client.cancel`."""
        path = f"/v1/jobs/{job_id}/cancel"
        return Job.model_validate(await self._request("POST", path, idempotent=True))

    async def upload_dataset(
        self, path_or_bytes: str | Path | bytes, kind: str | None = None
    ) -> Dataset:
        """See :meth:`Client.upload_dataset`."""
        kwargs = _upload(path_or_bytes, kind)
        return Dataset.model_validate(
            await self._request("POST", "/v1/datasets", idempotent=False, **kwargs)
        )

    async def get_dataset(self, dataset_id: str) -> Dataset:
        """See :meth:`Client.get_dataset`."""
        path = f"/v1/datasets/{dataset_id}"
        return Dataset.model_validate(await self._request("GET", path, idempotent=True))

    async def list_datasets(self) -> AsyncIterator[Dataset]:
        """See :meth:`Client.list_datasets`."""
        async for item in self._pages("/v1/datasets", {}):
            yield Dataset.model_validate(item)

    async def delete_dataset(self, dataset_id: str) -> None:
        """See :meth:`Client.delete_dataset`."""
        await self._request("DELETE", f"/v1/datasets/{dataset_id}", idempotent=True)

    async def list_models(self) -> AsyncIterator[Model]:
        """See :meth:`Client.list_models`."""
        async for item in self._pages("/v1/models", {}):
            yield Model.model_validate(item)

    async def get_model(self, model_id: str) -> Model:
        """See :meth:`Client.get_model`."""
        path = f"/v1/models/{model_id}"
        return Model.model_validate(await self._request("GET", path, idempotent=True))

    async def predict(
        self, model_id: str, inputs: list[Any], probabilities: bool = False
    ) -> PredictResponse:
        """See :meth:`Client.predict`."""
        body = PredictRequest(inputs=inputs, probabilities=probabilities).model_dump()
        path = f"/v1/models/{model_id}/predict"
        return PredictResponse.model_validate(
            await self._request("POST", path, idempotent=False, json=body)
        )

    async def generate(
        self,
        model_id: str,
        prompt: str,
        max_new_tokens: int = 100,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> GenerateResponse:
        """See :meth:`Client.generate`."""
        body = GenerateRequest(
            prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        ).model_dump()
        path = f"/v1/models/{model_id}/generate"
        return GenerateResponse.model_validate(
            await self._request("POST", path, idempotent=False, json=body)
        )

    async def _pages(self, path: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        offset = 0
        while True:
            query = {**params, "limit": PAGE, "offset": offset}
            page = await self._request("GET", path, idempotent=True, params=query)
            for item in page["items"]:
                yield item
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return


__all__ = ["AsyncClient", "Client", "KruApiError"]
