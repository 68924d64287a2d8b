"""Settings: defaults, ``KRU_*`` variables, and bad values refused at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.celery_app import create_celery_app
from worker.settings import Settings


def test_defaults_live_in_the_data_dir(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "d")
    assert s.database_url == f"sqlite:///{tmp_path}/d/kru.db"
    assert s.broker_url == f"sqla+sqlite:///{tmp_path}/d/broker.db"
    assert s.is_embedded_broker and s.api_keys == []
    assert s.jobs_dir == tmp_path / "d" / "jobs"


def test_environment_variables_and_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KRU_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("KRU_API_KEYS", " a1 ,b2,, ")
    monkeypatch.setenv("KRU_DATABASE_URL", "postgresql://kru:secret@db/kru")
    monkeypatch.setenv("KRU_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("KRU_MAX_ATTEMPTS", "5")
    s = Settings()
    assert s.api_keys == ["a1", "b2"] and s.max_attempts == 5
    assert s.database_url == "postgresql+psycopg://kru:secret@db/kru"
    assert "a1" not in repr(s)
    for key in list(s.to_env()):
        monkeypatch.delenv(key, raising=False)
    for key, value in s.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings() == s


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"device": "gpu"}, "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ({"database_url": "mysql://x/y"}, "database_url: expected a URL with a scheme"),
        ({"broker_url": "amqp://guest@rabbit//"}, "broker_url: expected a URL with a scheme"),
        ({"max_job_seconds": 7200, "visibility_timeout": 3600}, "must exceed max_job_seconds"),
        ({"heartbeat_interval": 10, "heartbeat_timeout": 20}, "at least 3 times"),
        ({"max_attempts": 0}, "greater than or equal to 1"),
        ({"queue_name": "a b"}, "String should match pattern"),
        ({"log_level": "LOUD"}, "String should match pattern"),
    ],
)
def test_bad_values_are_refused(tmp_path: Path, values: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(data_dir=tmp_path, **values)


def test_celery_is_configured_against_the_pitfalls(tmp_path: Path) -> None:
    redis = create_celery_app(
        Settings(
            data_dir=tmp_path,
            broker_url="redis://h:6379/0",
            queue_name="q1",
            max_job_seconds=3600,
            visibility_timeout=7200,
        )
    )
    conf = redis.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    assert conf.broker_transport_options == {"visibility_timeout": 7200}
    assert conf.result_backend_transport_options == {"visibility_timeout": 7200}
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_ignore_result and not conf.result_backend
    assert "kru.train" in redis.tasks and conf.task_routes["kru.train"] == {"queue": "q1"}
    embedded = create_celery_app(Settings(data_dir=tmp_path)).conf
    assert "visibility_timeout" not in embedded.broker_transport_options  # create_engine's
