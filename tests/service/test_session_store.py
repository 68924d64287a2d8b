"""The session stores (worker/session_store.py): the database's and Redis's, the same contract.

The store tests run against both (a SQLite job store in a temp directory, and a private
``redis-server`` that the test starts, as compose runs it: append-only file, a password). The
API over Redis (two replicas, Redis killed and restarted, the API restarted) is
test_api_serving.py's ``test_a_session_continues_on_another_api_process_and_after_a_restart``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from deploy.faults import RedisServer, redis_server

from worker import context, schema
from worker.db import Store
from worker.errors import Conflict
from worker.session_store import (
    REDIS_ALL,
    REDIS_PREFIX,
    RedisSessionStore,
    SessionStore,
    SqlSessionStore,
    Step,
    TooManySessions,
)
from worker.settings import Settings

Models = tuple[Settings, dict[str, str]]
MODEL = "a" * 32


@pytest.fixture(params=["database", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SessionStore]:
    if request.param == "database":
        db = Store(f"sqlite:///{tmp_path / 'kru.db'}")
        schema.prepare(db, upgrade_schema=True)
        yield SqlSessionStore(db)
        db.dispose()
        return
    with redis_server(tmp_path) as server:
        sessions = RedisSessionStore(server.url)
        yield sessions
        sessions.close()


def step(session_id: str, position: int, steps: int, tag: bytes = b"s") -> Step:
    return Step(
        id=session_id,
        position=position,
        steps=steps,
        ttl_seconds=60,
        state=tag * 8,
        digest=f"d{position}",
        answer={"position": position + steps, "tag": tag.decode()},
    )


def test_a_session_advances_only_from_its_position(store: SessionStore) -> None:
    created = store.create(MODEL, ttl_seconds=60, max_sessions=10)
    assert (created.model_id, created.position, created.state) == (MODEL, 0, None)
    got = store.get(created.id)
    assert got is not None and got.position == 0 and got.last_answer is None
    assert got.expires_at > got.created_at
    # two writers from position 0 in one go: the first wins, the second is refused
    assert store.advance_many([step(created.id, 0, 3, b"a"), step(created.id, 0, 5, b"b")]) == [
        True,
        False,
    ]
    got = store.get(created.id)
    assert got is not None
    assert (got.position, got.state, got.last_position, got.last_digest) == (3, b"a" * 8, 0, "d0")
    assert got.last_answer == {"position": 3, "tag": "a"}
    assert store.advance_many([step(created.id, 0, 1)]) == [False]  # stale
    assert store.advance_many([step(created.id, 3, 2)]) == [True]
    assert store.get(created.id).position == 5  # type: ignore[union-attr]
    assert store.advance_many([step("f" * 32, 0, 1)]) == [False]  # unknown
    assert store.count() == 1 and store.count_on_model(MODEL) == 1
    assert store.count_on_model("b" * 32) == 0
    assert store.delete(created.id) is True
    assert store.delete(created.id) is False
    assert store.get(created.id) is None and store.count() == 0
    assert store.count_on_model(MODEL) == 0
    assert store.advance_many([step(created.id, 5, 1)]) == [False]  # deleted


def test_a_short_session_does_not_hide_a_longer_one_on_its_model(store: SessionStore) -> None:
    """Redis's per-model set took the newest session's TTL: once a short session created after
    a long one expired, the model counted no session, and could be deleted under the long one."""
    store.create(MODEL, ttl_seconds=60, max_sessions=10)
    store.create(MODEL, ttl_seconds=0.2, max_sessions=10)
    time.sleep(0.4)
    assert store.count_on_model(MODEL) == 1


def test_deleting_a_model_s_sessions(store: SessionStore) -> None:
    """When a model is deleted its sessions go, live or expired; other models' stay."""
    live = store.create(MODEL, ttl_seconds=60, max_sessions=10)
    expired = store.create(MODEL, ttl_seconds=0.2, max_sessions=10)
    other = store.create("b" * 32, ttl_seconds=60, max_sessions=10)
    time.sleep(0.4)
    assert store.delete_on_model(MODEL) == 1  # live ones counted
    assert store.get(live.id) is None and store.get(expired.id) is None
    assert store.count_on_model(MODEL) == 0 and store.count() == 1
    assert store.get(other.id) is not None
    assert store.delete_on_model(MODEL) == 0
    assert store.advance_many([step(live.id, 0, 1)]) == [False]  # not revived


def test_sessions_are_bounded_and_expire(store: SessionStore) -> None:
    short = store.create(MODEL, ttl_seconds=0.4, max_sessions=2)
    store.create("b" * 32, ttl_seconds=60, max_sessions=2)
    with pytest.raises(TooManySessions) as full:
        store.create(MODEL, ttl_seconds=60, max_sessions=2)
    assert "KRU_MAX_SESSIONS=2" in full.value.detail and full.value.retry_after >= 1
    time.sleep(0.6)
    assert store.get(short.id) is None
    assert store.advance_many([step(short.id, 0, 1)]) == [False]  # expired: not revived
    assert store.get(short.id) is None
    assert store.count() == 1 and store.count_on_model(MODEL) == 0
    assert store.create(MODEL, ttl_seconds=60, max_sessions=2).position == 0  # room again


def test_an_advance_renews_the_ttl(store: SessionStore) -> None:
    created = store.create(MODEL, ttl_seconds=0.8, max_sessions=10)
    for position in range(3):
        time.sleep(0.4)
        assert store.advance_many([step(created.id, position, 1)]) == [True]
    time.sleep(0.4)  # 1.6 s since it was created, 0.4 s since the last chunk
    assert store.get(created.id) is not None and store.count() == 1


def test_redis_keeps_sessions_across_a_kill(tmp_path: Path) -> None:
    """SIGKILL and a restart on the append-only file: the session is where it was."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        store = RedisSessionStore(server.url)
        created = store.create(MODEL, ttl_seconds=60, max_sessions=10)
        assert store.advance_many([step(created.id, 0, 4, b"k")]) == [True]
        server.kill()
        with pytest.raises(redis.ConnectionError):
            store.get(created.id)
        server.start()
        got = store.get(created.id)
        assert got is not None and (got.position, got.state) == (4, b"k" * 8)
        assert store.advance_many([step(created.id, 4, 1)]) == [True]
        raw = redis.Redis.from_url(server.url)
        assert raw.exists(REDIS_PREFIX + created.id) and raw.zcard(REDIS_ALL) == 1
        assert 0 < raw.pttl(REDIS_PREFIX + created.id) <= 60_000
        raw.close()
        store.close()
    finally:
        server.stop()


def test_bad_session_store_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="session_store"):
        Settings(session_store="postgresql://x/y")
    assert Settings(session_store="redis://127.0.0.1:1/0").session_store.startswith("redis://")


def test_the_model_delete_check_reads_the_session_store(tmp_path: Path) -> None:
    """A model with a live session on the Redis store is not deleted (409), and is after."""
    from worker import retention

    with redis_server(tmp_path) as server:
        settings = Settings(data_dir=tmp_path / "data", session_store=server.url)
        ctx = context.init(settings, upgrade_schema=True)
        try:
            created = ctx.sessions.create(MODEL, ttl_seconds=60, max_sessions=10)
            with pytest.raises(Conflict, match="streaming session"):
                retention.check_model_unused(ctx, MODEL)
            ctx.sessions.delete(created.id)
            retention.check_model_unused(ctx, MODEL)
        finally:
            context.close()
