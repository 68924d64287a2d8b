"""Where streaming sessions live: the job store's database, or Redis (``KRU_SESSION_STORE``).

A session is a model's hidden state between the chunks of one streamed sequence
(:mod:`app.sessions` has the HTTP side: schemas, the exactly-once rule, the per-process cache).
Both stores keep the same record (:class:`SessionRecord`) and give the same guarantees:

* it survives an API restart and every API replica sees it (the database of ``KRU_DATABASE_URL``,
  or a Redis server with its append-only file);
* an advance is **conditional** on the session still being at the position the chunk started
  from (one writer of two wins; :meth:`SqlSessionStore.advance_many`);
* at most ``KRU_MAX_SESSIONS`` live at once (:class:`TooManySessions`), counted atomically;
* a session idle past its TTL is gone (the database: rows past ``expires_at`` are invisible and
  deleted when sessions are created; Redis: the key's own expiry).

:class:`SqlSessionStore` (the default; SQLite in the embedded default, PostgreSQL in
deployments) writes a row of the ``sessions`` table (:class:`worker.models.StreamSession`).
:class:`RedisSessionStore` (``KRU_SESSION_STORE=redis://...``) keeps a hash per session and
two sorted sets of expiries (all sessions, and each model's), changed only by Lua scripts, so that
every step is one round trip and atomic. Sessions expire on the API's clock in the database and on
Redis's in Redis; both are relative TTLs, so the clocks of the nodes do not matter.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import delete, func, select, text, update

from worker.db import Store
from worker.ids import new_id
from worker.models import StreamSession, utcnow

#: PostgreSQL advisory lock of session creation (the KRU_MAX_SESSIONS count).
_CREATE_LOCK = 0x6B72_7513
#: Redis keys: one hash per session, the expiries of all sessions and of each model's.
REDIS_PREFIX = "kru:session:"
REDIS_ALL = "kru:sessions"
REDIS_BY_MODEL = "kru:model-sessions:"


class TooManySessions(Exception):
    """``KRU_MAX_SESSIONS`` sessions are open: answered ``429`` with ``Retry-After``."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


def _too_many(count: int, max_sessions: int, wait_seconds: float) -> TooManySessions:
    return TooManySessions(
        f"{count} sessions are open (the limit is KRU_MAX_SESSIONS={max_sessions}): "
        "delete finished ones (DELETE /v1/sessions/{id})",
        max(1, int(wait_seconds) + 1),
    )


@dataclass
class SessionRecord:
    """A session as stored (a copy: safe to keep between requests).

    Attributes:
        id, model_id: the session and its model.
        position: steps consumed so far (the next chunk's ``position``).
        state: the hidden state after them (``kru_core.inference.state_to_bytes``), None at 0.
        last_position, last_digest, last_answer: the last chunk (its start, fingerprint and
            answer), for a retry of it.
        ttl_seconds, created_at, expires_at: its lifetime (UTC).
        decoded: the state as tensors, where the API process that wrote it still has them
            (:mod:`app.sessions` caches the records it writes); not stored.
    """

    id: str
    model_id: str
    position: int
    ttl_seconds: float
    created_at: datetime
    expires_at: datetime
    state: bytes | None = None
    last_position: int | None = None
    last_digest: str | None = None
    last_answer: dict[str, Any] | None = None
    decoded: Any = field(default=None, repr=False, compare=False)


@dataclass
class Step:
    """One chunk's result to store: session ``id`` moves from ``position`` by ``steps``."""

    id: str
    position: int
    steps: int
    ttl_seconds: float
    state: bytes
    digest: str
    answer: dict[str, Any]

    def applied(self, record: SessionRecord, decoded: Any, now: datetime) -> SessionRecord:
        """``record`` after this step, as the store now has it (the state kept ``decoded``)."""
        return replace(
            record,
            position=self.position + self.steps,
            state=None,
            decoded=decoded,
            last_position=self.position,
            last_digest=self.digest,
            last_answer=self.answer,
            expires_at=now + timedelta(seconds=self.ttl_seconds),
        )


class SessionStore(Protocol):
    """What :mod:`app.sessions` needs of a store."""

    def create(self, model_id: str, *, ttl_seconds: float, max_sessions: int) -> SessionRecord:
        """A new session at position 0; :class:`TooManySessions` when ``max_sessions`` live."""
        ...

    def get(self, session_id: str) -> SessionRecord | None:
        """The live session, or None (unknown, deleted or expired)."""
        ...

    def delete(self, session_id: str) -> bool:
        """Delete a live session; False when there was none."""
        ...

    def advance_many(self, steps: Sequence[Step]) -> list[bool]:
        """Store several steps at once, each only if its session is live and still at its
        ``position``: for each, whether it was stored."""
        ...

    def count(self) -> int:
        """Sessions live now."""
        ...

    def count_on_model(self, model_id: str) -> int:
        """Sessions live now on ``model_id`` (a model in use is not deleted)."""
        ...

    def delete_on_model(self, model_id: str) -> int:
        """Delete every session on ``model_id``, live or expired (its model is gone); about how
        many live ones there were (for a log line: concurrent writes may move it)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


# --- the database ----------------------------------------------------------------------------


_STORED = [f.name for f in fields(SessionRecord) if f.name != "decoded"]


def _record(row: StreamSession) -> SessionRecord:
    return SessionRecord(**{name: getattr(row, name) for name in _STORED})


class SqlSessionStore:
    """Sessions as rows of the job store's ``sessions`` table (the default)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def create(self, model_id: str, *, ttl_seconds: float, max_sessions: int) -> SessionRecord:
        """See :class:`SessionStore`; the count and the insert are one transaction."""
        now = utcnow()
        with self.store.writing() as db:
            if not self.store.is_sqlite:  # SQLite: BEGIN IMMEDIATE already serialises writers
                db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CREATE_LOCK})
            db.execute(delete(StreamSession).where(StreamSession.expires_at <= now))
            count = db.scalar(select(func.count()).select_from(StreamSession)) or 0
            if count >= max_sessions:
                soonest = db.scalar(select(func.min(StreamSession.expires_at)))
                wait = (soonest - now).total_seconds() if soonest is not None else 1.0
                raise _too_many(count, max_sessions, wait)
            row = StreamSession(
                id=new_id(),
                model_id=model_id,
                position=0,
                state=None,
                ttl_seconds=ttl_seconds,
                created_at=now,
                updated_at=now,
                expires_at=now + timedelta(seconds=ttl_seconds),
            )
            db.add(row)
            db.flush()
            return _record(row)

    def get(self, session_id: str) -> SessionRecord | None:
        """See :class:`SessionStore`."""
        with self.store.reading() as db:
            row = db.get(StreamSession, session_id)
            if row is None or row.expires_at <= utcnow():
                return None
            return _record(row)

    def delete(self, session_id: str) -> bool:
        """See :class:`SessionStore`."""
        with self.store.writing() as db:
            result = db.execute(
                delete(StreamSession).where(
                    StreamSession.id == session_id, StreamSession.expires_at > utcnow()
                )
            )
            return result.rowcount == 1

    def advance_many(self, steps: Sequence[Step]) -> list[bool]:
        """See :class:`SessionStore`: one transaction for all (a group commit)."""
        now = utcnow()
        won = []
        with self.store.writing() as db:
            for step in steps:
                result = db.execute(
                    update(StreamSession)
                    .where(
                        StreamSession.id == step.id,
                        StreamSession.position == step.position,
                        StreamSession.expires_at > now,
                    )
                    .values(
                        position=step.position + step.steps,
                        state=step.state,
                        last_position=step.position,
                        last_digest=step.digest,
                        last_answer=step.answer,
                        updated_at=now,
                        expires_at=now + timedelta(seconds=step.ttl_seconds),
                    )
                )
                won.append(result.rowcount == 1)
        return won

    def count(self) -> int:
        """See :class:`SessionStore`."""
        with self.store.reading() as db:
            query = select(func.count()).where(StreamSession.expires_at > utcnow())
            return db.scalar(query) or 0

    def count_on_model(self, model_id: str) -> int:
        """See :class:`SessionStore`."""
        with self.store.reading() as db:
            query = select(func.count()).where(
                StreamSession.model_id == model_id, StreamSession.expires_at > utcnow()
            )
            return db.scalar(query) or 0

    def delete_on_model(self, model_id: str) -> int:
        """See :class:`SessionStore`."""
        now = utcnow()
        with self.store.writing() as db:
            live = db.scalar(
                select(func.count()).where(
                    StreamSession.model_id == model_id, StreamSession.expires_at > now
                )
            )
            db.execute(delete(StreamSession).where(StreamSession.model_id == model_id))
            return live or 0

    def close(self) -> None:
        """Nothing of its own: the job store's pool is the context's."""


# --- Redis -----------------------------------------------------------------------------------

# KEYS: the session's hash, all sessions' expiries, the model's. ARGV: id, model id, ttl (ms),
# max sessions, created_at (ISO; expiries are on Redis's clock, read in the script). Returns
# {1, count, expiry ms} or, when full, {0, count, ms until the soonest expiry}.
_CREATE = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ms)
local count = redis.call('ZCARD', KEYS[2])
if count >= tonumber(ARGV[4]) then
  local soonest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return {0, count, tonumber(soonest[2]) - ms}
end
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'model_id', ARGV[2], 'position', 0, 'ttl_ms', ttl,
           'created_at', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], ms + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ms)
redis.call('ZADD', KEYS[3], ms + ttl, ARGV[1])
if redis.call('PTTL', KEYS[3]) < ttl then redis.call('PEXPIRE', KEYS[3], ttl) end
return {1, count + 1, ms + ttl}
"""

# KEYS: the hash, all sessions' expiries. ARGV: id, expected position, new position, state,
# last digest, last answer (JSON), the per-model prefix. Returns the new expiry (ms), 0 if the
# session is gone, -1 if it moved on.
_ADVANCE = """
local position = redis.call('HGET', KEYS[1], 'position')
if not position then return 0 end
if position ~= ARGV[2] then return -1 end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl_ms'))
local model = redis.call('HGET', KEYS[1], 'model_id')
redis.call('HSET', KEYS[1], 'position', ARGV[3], 'state', ARGV[4], 'last_position', ARGV[2],
           'last_digest', ARGV[5], 'last_answer', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], ms + ttl, ARGV[1])
local by_model = ARGV[7] .. model
redis.call('ZADD', by_model, ms + ttl, ARGV[1])
if redis.call('PTTL', by_model) < ttl then redis.call('PEXPIRE', by_model, ttl) end
return ms + ttl
"""

# KEYS: the hash, all sessions' expiries. ARGV: id, the per-model prefix.
_DELETE = """
local model = redis.call('HGET', KEYS[1], 'model_id')
redis.call('ZREM', KEYS[2], ARGV[1])
if not model then return 0 end
redis.call('ZREM', ARGV[2] .. model, ARGV[1])
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: the model's sorted set of expiries, all sessions' expiries. ARGV: the hash prefix.
# Deletes every session of the model and its set; returns how many were live.
_DELETE_ON_MODEL = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local live = redis.call('ZCOUNT', KEYS[1], '(' .. ms, '+inf')
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  redis.call('DEL', ARGV[1] .. id)
  redis.call('ZREM', KEYS[2], id)
end
redis.call('DEL', KEYS[1])
return live
"""

# KEYS: a sorted set of expiries. Returns how many are live (expired members are dropped).
_COUNT = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
return redis.call('ZCARD', KEYS[1])
"""


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


class RedisSessionStore:
    """Sessions in Redis (``KRU_SESSION_STORE=redis://...``): see the module's docstring.

    Example (against a running Redis)::

        store = RedisSessionStore("redis://127.0.0.1:6379/1")
        record = store.create("m" * 32, ttl_seconds=60, max_sessions=100)
    """

    def __init__(self, url: str) -> None:
        import redis  # here, not at the top: the embedded default never loads it

        self.client: Any = redis.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
        )
        self._create = self.client.register_script(_CREATE)
        self._advance = self.client.register_script(_ADVANCE)
        self._delete = self.client.register_script(_DELETE)
        self._count = self.client.register_script(_COUNT)
        self._delete_on_model = self.client.register_script(_DELETE_ON_MODEL)

    def create(self, model_id: str, *, ttl_seconds: float, max_sessions: int) -> SessionRecord:
        """See :class:`SessionStore`; the count and the insert are one script."""
        session_id = new_id()
        created = utcnow()
        ttl_ms = max(1, round(ttl_seconds * 1000))
        ok, count, value = self._create(
            keys=[REDIS_PREFIX + session_id, REDIS_ALL, REDIS_BY_MODEL + model_id],
            args=[session_id, model_id, ttl_ms, max_sessions, created.isoformat()],
        )
        if not ok:
            raise _too_many(int(count), max_sessions, int(value) / 1000)
        expires = created + timedelta(milliseconds=ttl_ms)
        return SessionRecord(session_id, model_id, 0, ttl_seconds, created, expires)

    def get(self, session_id: str) -> SessionRecord | None:
        """See :class:`SessionStore`."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(REDIS_PREFIX + session_id)
        pipe.pttl(REDIS_PREFIX + session_id)
        fields, ttl_left = pipe.execute()
        if not fields or ttl_left <= 0:
            return None
        f = {k.decode(): v for k, v in fields.items()}
        last_position = f.get("last_position")
        last_answer = f.get("last_answer")
        return SessionRecord(
            id=session_id,
            model_id=f["model_id"].decode(),
            position=int(f["position"]),
            state=f.get("state"),
            last_position=int(last_position) if last_position is not None else None,
            last_digest=f["last_digest"].decode() if "last_digest" in f else None,
            last_answer=json.loads(last_answer) if last_answer is not None else None,
            ttl_seconds=int(f["ttl_ms"]) / 1000,
            created_at=datetime.fromisoformat(f["created_at"].decode()),
            expires_at=utcnow() + timedelta(milliseconds=int(ttl_left)),
        )

    def delete(self, session_id: str) -> bool:
        """See :class:`SessionStore`."""
        keys = [REDIS_PREFIX + session_id, REDIS_ALL]
        return bool(self._delete(keys=keys, args=[session_id, REDIS_BY_MODEL]))

    def advance_many(self, steps: Sequence[Step]) -> list[bool]:
        """See :class:`SessionStore`: one pipeline of one script call per step."""
        pipe = self.client.pipeline(transaction=False)
        for step in steps:
            self._advance(
                keys=[REDIS_PREFIX + step.id, REDIS_ALL],
                args=[
                    step.id,
                    step.position,
                    step.position + step.steps,
                    step.state,
                    step.digest,
                    json.dumps(step.answer, separators=(",", ":")),
                    REDIS_BY_MODEL,
                ],
                client=pipe,
            )
        return [int(result) > 0 for result in pipe.execute()]

    def count(self) -> int:
        """See :class:`SessionStore`."""
        return int(self._count(keys=[REDIS_ALL]))

    def count_on_model(self, model_id: str) -> int:
        """See :class:`SessionStore`."""
        return int(self._count(keys=[REDIS_BY_MODEL + model_id]))

    def delete_on_model(self, model_id: str) -> int:
        """See :class:`SessionStore`: one script."""
        keys = [REDIS_BY_MODEL + model_id, REDIS_ALL]
        return int(self._delete_on_model(keys=keys, args=[REDIS_PREFIX]))

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()


def open_session_store(url: str | None, store: Store) -> SessionStore:
    """The store of ``KRU_SESSION_STORE``: None (the job store's database) or ``redis://``."""
    if url:
        return RedisSessionStore(url)
    return SqlSessionStore(store)
