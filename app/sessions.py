"""Streaming prediction sessions: a model's hidden state carried over between chunks.

A session lives in the session store (:mod:`worker.session_store`): by default a row of the job
store's ``sessions`` table (SQLite in the embedded default, PostgreSQL in deployments), or Redis
with ``KRU_SESSION_STORE=redis://...``; either way the state survives an API restart and every
API replica continues any session. Each chunk's step is exactly-once by its ``position`` (the
steps already consumed): the write is conditional on the position read, so of two replicas
advancing the same session from the same position one wins and the other answers ``409`` (or,
for the same inputs, the winner's answer). A retry of the last chunk (same position, same
inputs) returns the stored answer without advancing.

Sessions idle past their TTL are gone (``404``); at most ``KRU_MAX_SESSIONS`` live at once
(:class:`TooManySessions`, ``429``). Each API process keeps the records it last wrote
(:data:`CACHE_SIZE` of them): a session's next chunk then skips the read, and the conditional
write still decides (a session another replica moved on, deleted or let expire is read again).
The forward passes of session steps are batched across sessions like predictions
(:class:`app.predictor.Predictor`, kind ``session``), and the writes of steps that finish
together go to the store at once (:class:`GroupCommit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from starlette.concurrency import run_in_threadpool

from app.schemas import MAX_JSON_INT, JsonInt
from kru_core.errors import InputError
from kru_core.inference import state_from_bytes, state_to_bytes
from worker import context, service
from worker.errors import Conflict, NotFound
from worker.models import utcnow
from worker.session_store import SessionRecord, SessionStore, Step
from worker.session_store import TooManySessions as TooManySessions  # raised by create_session
from worker.settings import MAX_SESSION_TTL_SECONDS

#: Session rows an API process remembers after writing them.
CACHE_SIZE = 4096


class PositionConflict(Conflict):
    """A chunk's ``position`` is not the session's (``409``, naming the current one)."""

    def __init__(self, detail: str, position: int) -> None:
        super().__init__(detail)
        self.position = position


# --- schemas ----------------------------------------------------------------------------------

_CHUNK_SCHEMA = {
    "anyOf": [
        {
            "type": "array",
            "minItems": 1,
            "items": {"anyOf": [{"type": "integer"}, {"type": "number"}]},
            "description": "tokens (ints), or one number per step for 1-feature models",
        },
        {
            "type": "array",
            "minItems": 1,
            "items": {"type": "array", "minItems": 1, "items": {"type": "number"}},
            "description": "feature vectors",
        },
        {"type": "string", "minLength": 1, "description": "text models: characters"},
    ]
}
Chunk = Annotated[
    Annotated[list[Any], Field(min_length=1)] | Annotated[str, Field(min_length=1)],
    WithJsonSchema(_CHUNK_SCHEMA),
]


class SessionCreate(BaseModel):
    """Options of a new session (the body is optional)."""

    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"ttl_seconds": 600}]}
    )

    ttl_seconds: float | None = Field(
        None,
        gt=0,
        le=MAX_SESSION_TTL_SECONDS,
        allow_inf_nan=False,
        description="seconds the session lives idle; null: KRU_SESSION_TTL",
    )


class SessionInfo(BaseModel):
    """A streaming session."""

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "id": "3c1f9a0e5b7d4c2a8e6f0b1d3a5c7e9f",
                    "model_id": "5d2c9e0a7b1f4e3a8c6d2b0f9e7a5c3d",
                    "position": 0,
                    "ttl_seconds": 600.0,
                    "created_at": "2026-01-05T10:05:00Z",
                    "expires_at": "2026-01-05T10:15:00Z",
                }
            ]
        },
    )

    id: str
    model_id: str
    position: int = Field(description="steps consumed so far: the next chunk's position")
    ttl_seconds: float = Field(description="idle seconds before the session expires")
    created_at: datetime
    expires_at: datetime = Field(description="when it expires unless a chunk comes first")


class SessionPredictRequest(BaseModel):
    """One chunk of a streamed sequence."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"inputs": [3, 1, 4, 1, 5], "position": 0}]},
    )

    inputs: Chunk = Field(
        description="the chunk's steps: tokens, feature vectors, or a string (text models)"
    )
    position: JsonInt = Field(
        ge=0, le=MAX_JSON_INT, description="steps already sent (the session's position)"
    )


class SessionPredictResponse(BaseModel):
    """The predictions of one chunk."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": "3c1f9a0e5b7d4c2a8e6f0b1d3a5c7e9f",
                    "position": 5,
                    "predictions": [0, 0, 0, 0, 0],
                }
            ]
        }
    )

    session_id: str
    position: int = Field(description="the session's position after this chunk")
    predictions: list[Any] = Field(
        description="per-step models: one label per step of the chunk; sequence models: one "
        "value, the prediction after the chunk's last step (of everything sent so far)"
    )


# --- store ------------------------------------------------------------------------------------


def _store() -> SessionStore:
    return context.current().sessions


def _info(row: SessionRecord) -> dict[str, Any]:
    return {
        "id": row.id,
        "model_id": row.model_id,
        "position": row.position,
        "ttl_seconds": row.ttl_seconds,
        "created_at": row.created_at,
        "expires_at": row.expires_at,
    }


def digest(inputs: Any) -> str:
    """A chunk's fingerprint (SHA-256 of its canonical JSON): a retry must send the same."""
    return hashlib.sha256(json.dumps(inputs, separators=(",", ":")).encode()).hexdigest()


def create_session(model_id: str, *, ttl_seconds: float, max_sessions: int) -> dict[str, Any]:
    """A new session at position 0; :class:`TooManySessions` when ``max_sessions`` live;
    ``NotFound`` (and no session) when the model was deleted meanwhile."""
    store = _store()
    record = store.create(model_id, ttl_seconds=ttl_seconds, max_sessions=max_sessions)
    # The model may have been deleted since the caller found it (in a cache): a delete that
    # ran before this session existed could not remove it (worker/retention.py, delete_model).
    try:
        service.get_model(model_id)
    except BaseException:  # deleted, or not known to be there: no session left behind
        with contextlib.suppress(Exception):
            store.delete(record.id)
        raise
    return _info(record)


_cache: OrderedDict[str, SessionRecord] = OrderedDict()
_cache_lock = threading.Lock()


def _remember(row: SessionRecord) -> None:
    with _cache_lock:
        _cache[row.id] = row
        _cache.move_to_end(row.id)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)


def _forget(session_id: str) -> None:
    with _cache_lock:
        _cache.pop(session_id, None)


def cached_session(session_id: str, position: int) -> SessionRecord | None:
    """The row this process last wrote, if it is at ``position`` and not expired by its own
    clock (the write that follows is conditional on both)."""
    with _cache_lock:
        row = _cache.get(session_id)
    if row is None or row.position != position or row.expires_at <= utcnow():
        return None
    return row


def count_sessions() -> int:
    """Sessions open now (not expired)."""
    return _store().count()


def load_session(session_id: str) -> SessionRecord:
    """The session's record (state included); NotFound when unknown, deleted or expired."""
    row = _store().get(session_id)
    if row is None:
        raise NotFound(f"session {session_id!r} not found (unknown, deleted or expired)")
    return row


def get_session(session_id: str) -> dict[str, Any]:
    """The session's info; NotFound when unknown, deleted or expired."""
    return _info(load_session(session_id))


def delete_session(session_id: str) -> None:
    """Delete a session; NotFound when there is none."""
    _forget(session_id)
    if not _store().delete(session_id):
        raise NotFound(f"session {session_id!r} not found (unknown, deleted or expired)")


def replay(row: SessionRecord, position: int, chunk_digest: str) -> dict[str, Any] | None:
    """The stored answer when this chunk is a retry of the session's last one, else None;
    :class:`PositionConflict` when ``position`` is neither the current one nor that retry."""
    if row.last_position == position and row.last_digest == chunk_digest and row.last_answer:
        return row.last_answer
    if position != row.position:
        raise PositionConflict(
            f"position {position} is not the session's current position {row.position}: send "
            f"the chunk that starts at step {row.position}",
            row.position,
        )
    return None


@dataclass
class Advance:
    """One chunk's result to store: the session moves from ``position`` by ``steps``."""

    row: SessionRecord
    position: int
    steps: int
    chunk_digest: str
    state: Any
    answer: dict[str, Any]


def advance_many(advances: Sequence[Advance]) -> list[dict[str, Any] | Exception]:
    """Store the states after several chunks at once (a group commit), each write conditional
    on its session still being at its ``position`` (one writer wins). For each: the answer to
    return (the winner's, for a concurrent duplicate), or the NotFound / PositionConflict to
    raise."""
    now = utcnow()
    steps = [
        Step(
            id=item.row.id,
            position=item.position,
            steps=item.steps,
            ttl_seconds=item.row.ttl_seconds,
            state=state_to_bytes(item.state),
            digest=item.chunk_digest,
            answer=item.answer,
        )
        for item in advances
    ]
    won = _store().advance_many(steps)
    out: list[dict[str, Any] | Exception] = []
    for item, step, ok in zip(advances, steps, won, strict=True):
        if ok:
            _remember(step.applied(item.row, item.state, now))
            out.append(item.answer)
            continue
        _forget(item.row.id)
        try:  # another writer advanced it (or it expired: 404)
            current = load_session(item.row.id)
            stored = replay(current, item.position, item.chunk_digest)
            if stored is None:  # pragma: no cover - the row moved on, then back: impossible
                raise PositionConflict("the session moved on", current.position)
            out.append(stored)
        except (NotFound, PositionConflict) as exc:
            out.append(exc)
    return out


def advance(row: SessionRecord, **fields: Any) -> dict[str, Any]:
    """:func:`advance_many` of one chunk; raises its NotFound or PositionConflict."""
    result = advance_many([Advance(row, **fields)])[0]
    if isinstance(result, Exception):
        raise result
    return result


class GroupCommit:
    """Writes of session steps that arrive while a transaction runs go in the next one (SQLite
    takes one writer at a time: one transaction per chunk bound 32 sessions to the store)."""

    def __init__(self) -> None:
        self._pending: list[tuple[Advance, asyncio.Future[Any]]] = []
        self._running = False

    async def advance(self, item: Advance) -> dict[str, Any]:
        """Store ``item`` with the others waiting; its answer, or its error raised."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await run_in_threadpool(advance_many, [item for item, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._running = False


_group_commits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, GroupCommit] = (
    weakref.WeakKeyDictionary()
)


async def store_step(item: Advance) -> dict[str, Any]:
    """Store a chunk's result through this event loop's :class:`GroupCommit`."""
    loop = asyncio.get_running_loop()
    group = _group_commits.get(loop)
    if group is None:
        group = _group_commits[loop] = GroupCommit()
    return await group.advance(item)


def stored_state(row: SessionRecord) -> Any:
    """The hidden state after the session's steps (None at position 0: zeros)."""
    if row.decoded is not None:
        return row.decoded
    return state_from_bytes(row.state) if row.state is not None else None


def chunk_error(exc: InputError) -> InputError:
    """An InputError of ``inputs.0...`` (the chunk as a one-sequence request) as ``inputs...``."""
    field = exc.field
    if field == "inputs.0" or field.startswith("inputs.0."):
        field = "inputs" + field[len("inputs.0") :]
    return InputError(field, exc.message)
