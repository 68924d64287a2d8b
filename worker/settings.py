"""Settings of every kru process (API and workers), read once from ``KRU_*`` variables.

Nothing else reads ``os.environ``. Values are validated when the process starts: a bad value
stops it with a message naming the variable. ``.env.example`` lists every variable.

Example::

    >>> s = Settings(data_dir="/tmp/kru")
    >>> s.database_url
    'sqlite:////tmp/kru/kru.db'
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DATABASE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg")
BROKER_SCHEMES = ("sqla+sqlite", "sqla+postgresql", "sqla+postgresql+psycopg", "redis", "rediss")
DEVICES = ("auto", "cpu", "cuda")


class Settings(BaseSettings):
    """Every setting, with its ``KRU_`` variable name (``data_dir`` is ``KRU_DATA_DIR``).

    Storage and broker:
        data_dir: checkpoints, datasets and (by default) the SQLite files. Made absolute.
        database_url: the job store; default ``sqlite:///<data_dir>/kru.db``. PostgreSQL:
            ``postgresql://user:pass@host/db`` (driver psycopg 3).
        broker_url: the Celery broker; default kombu's SQLAlchemy transport on
            ``sqla+sqlite:///<data_dir>/broker.db`` (no server). Deployments: ``redis://...``.
        queue_name: the Celery queue training jobs go to.
        visibility_timeout: seconds before Redis redelivers an unacknowledged message; must
            exceed ``max_job_seconds`` or a long job is delivered twice.

    API:
        api_keys: comma-separated keys for ``Authorization: Bearer``; empty: the API is open.
        max_request_bytes, max_upload_bytes: request body limits (JSON, dataset uploads).
        max_sequences_per_request, max_sequence_length: prediction request limits.
        model_cache_size: loaded models kept by the predictor.

    Jobs:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a worker's device other than ``auto``
            overrides the job's ``train.device``.
        max_steps_per_job: refuse jobs with more ``train.steps``.
        max_job_seconds: wall-clock limit of one attempt (enforced in the training loop).
        max_attempts: attempts (worker lost, heartbeat stale) before a job is ``failed``.
        heartbeat_interval: seconds between a running job's heartbeats (and cancel checks).
        heartbeat_timeout: a running job whose heartbeat is older is considered lost.
        progress_interval: minimum seconds between progress writes of a running job.
        reaper_interval: seconds between two scans of the reaper (0 disables it).
        log_level: logging level of the entry points.
    """

    model_config = SettingsConfigDict(
        env_prefix="KRU_",
        env_file=".env",
        env_ignore_empty=True,
        extra="ignore",
        validate_default=True,
    )

    data_dir: Path = Path(".kru")
    database_url: str = ""
    broker_url: str = ""
    queue_name: str = Field("kru", pattern=r"^[A-Za-z0-9_.\-]{1,100}$")
    visibility_timeout: int = Field(2 * 24 * 3600, ge=60)

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    max_request_bytes: int = Field(1 << 20, ge=1024)
    max_upload_bytes: int = Field(64 << 20, ge=1024)
    max_sequences_per_request: int = Field(256, ge=1)
    max_sequence_length: int = Field(10_000, ge=1)
    model_cache_size: int = Field(8, ge=1)

    device: str = "auto"
    max_steps_per_job: int = Field(1_000_000, ge=1)
    max_job_seconds: float = Field(24 * 3600, gt=0)
    max_attempts: int = Field(3, ge=1, le=100)
    heartbeat_interval: float = Field(2.0, gt=0)
    heartbeat_timeout: float = Field(60.0, gt=0)
    progress_interval: float = Field(1.0, ge=0)
    reaper_interval: float = Field(15.0, ge=0)
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in DEVICES or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")

    @model_validator(mode="after")
    def _defaults_and_limits(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'kru.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.db'}"
        if self.database_url.startswith("postgresql://"):
            self.database_url = "postgresql+psycopg://" + self.database_url[len("postgresql://") :]
        _check_scheme("database_url", self.database_url, DATABASE_SCHEMES)
        _check_scheme("broker_url", self.broker_url, BROKER_SCHEMES)
        if self.visibility_timeout <= self.max_job_seconds:
            raise ValueError(
                f"visibility_timeout ({self.visibility_timeout} s) must exceed max_job_seconds "
                f"({self.max_job_seconds} s), or the broker redelivers long jobs"
            )
        if self.heartbeat_timeout < 3 * self.heartbeat_interval:
            raise ValueError(
                f"heartbeat_timeout ({self.heartbeat_timeout} s) must be at least 3 times "
                f"heartbeat_interval ({self.heartbeat_interval} s)"
            )
        return self

    def to_env(self) -> dict[str, str]:
        """These settings as ``KRU_*`` variables (for a subprocess that must share them)."""
        env = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            text = ",".join(value) if isinstance(value, list) else str(value)
            env[f"KRU_{name.upper()}"] = text
        return env

    @property
    def is_embedded_broker(self) -> bool:
        """True for kombu's SQLAlchemy transport (polls a database table, no server)."""
        return self.broker_url.startswith("sqla+")

    @property
    def jobs_dir(self) -> Path:
        """Where each job's checkpoints live: ``jobs_dir / <job id>``."""
        return self.data_dir / "jobs"

    @property
    def datasets_dir(self) -> Path:
        """Where uploaded datasets live, each named by its id only."""
        return self.data_dir / "datasets"


def _check_scheme(name: str, url: str, schemes: tuple[str, ...]) -> None:
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in schemes:
        raise ValueError(f"{name}: expected a URL with a scheme in {list(schemes)}, got {url!r}")


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment (and ``.env``)."""
    return Settings()
