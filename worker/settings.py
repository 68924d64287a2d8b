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
import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kru_core.config import check_device_name

#: The longest a streaming session may live idle (its own ``ttl_seconds`` and the default).
MAX_SESSION_TTL_SECONDS = 7 * 24 * 3600

DATABASE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg")
SESSION_STORE_SCHEMES = ("redis", "rediss")
BROKER_SCHEMES = ("sqla+sqlite", "sqla+postgresql", "sqla+postgresql+psycopg", "redis", "rediss")
#: The quotas ``KRU_KEY_QUOTAS`` may override per key, and the setting of each one's default.
KEY_QUOTA_FIELDS = {
    "max_active_jobs": "max_active_jobs_per_key",
    "max_worker_seconds": "max_worker_seconds_per_key",
    "max_dataset_bytes": "max_dataset_bytes_per_key",
    "max_published_jobs": "max_published_jobs_per_key",
}


class Settings(BaseSettings):
    """Every setting, with its ``KRU_`` variable name (``data_dir`` is ``KRU_DATA_DIR``).

    Storage and broker:
        data_dir: checkpoints, datasets and (by default) the SQLite files. Made absolute.
        database_url: the job store; default ``sqlite:///<data_dir>/kru.db``. PostgreSQL:
            ``postgresql://user:pass@host/db`` (driver psycopg 3).
        broker_url: the Celery broker; default kombu's SQLAlchemy transport on
            ``sqla+sqlite:///<data_dir>/broker.db`` (no server). Deployments: ``redis://...``.
        session_store: where streaming sessions live: empty (the default) for the job
            store's database, or ``redis://...`` (:mod:`worker.session_store`).
        queue_name: the Celery queue training jobs go to.
        visibility_timeout: seconds before Redis redelivers an unacknowledged message; must
            exceed ``max_job_seconds`` or a long job is delivered twice.

    API:
        api_keys: comma-separated keys for ``Authorization: Bearer``; empty: the API is open.
        max_request_bytes, max_upload_bytes: request body limits (JSON, dataset uploads).
        max_sequences_per_request, max_sequence_length: prediction request limits.
        model_cache_size: loaded models kept by the predictor.
        max_request_cost: sequences x steps x the model's per-step multiply-adds allowed in one
            predict, session or generate request (422 above it).
        batch_max_size, batch_max_delay_ms: dynamic micro-batching: concurrent requests for a
            model are merged into one forward pass of at most this many sequences, the first
            waiting at most this many milliseconds for more (0: only those already queued).
        batch_queue_size: requests waiting per model; more are answered 503 (Retry-After).
        predict_timeout: seconds a predict or session request waits for its answer (504).
        inline_forward_ms: a forward pass expected to take at most this many milliseconds
            runs on the API's event loop instead of a worker thread (0: always a thread).
        max_sessions: streaming sessions open at once (429 above it).
        session_ttl: seconds a streaming session lives idle, unless it asks otherwise.

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
        consume_timeout: an idle worker exits (status 75, to be restarted) when a published job
            has waited this long in the queue: its consumer is lost (:mod:`worker.watchdog`;
            0 disables it).
        event_retention_days: days after a job's end before its progress events are deleted and
            its training metric points thinned (:mod:`worker.retention`; 0 keeps them forever).
        log_level: logging level of the entry points.

    Limits and quotas (docs/deploy.md "Limits and quotas"):
        max_job_memory_bytes: a job's estimated training memory (:mod:`kru_core.cost`) above it
            is refused at submit (422), and the worker's address space is limited to it plus
            what the process already uses while a CPU job trains; 0: the device's memory
            (CUDA), else half the host's.
        worker_flops: flop/s a worker trains at, to estimate a job's time (refused above
            ``max_job_seconds``).
        max_active_jobs_per_key: queued + running jobs per API key (429 above it).
        max_worker_seconds_per_key: worker-seconds per API key over the last 24 h (429).
        max_dataset_bytes_per_key: stored dataset bytes per API key (429).
        max_published_jobs_per_key: a key's jobs waiting in the broker at once; its others
            wait in the store and are published as these start (fair serving across keys).
        key_quotas: per-key overrides, JSON ``{"<key name>": {"max_active_jobs": 50, ...}}``.
        min_free_disk_bytes: an upload that would leave less free disk is refused (507).
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
    session_store: str = ""
    queue_name: str = Field("kru", pattern=r"^[A-Za-z0-9_.\-]{1,100}$")
    visibility_timeout: int = Field(2 * 24 * 3600, ge=60)

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    max_request_bytes: int = Field(1 << 20, ge=1024)
    max_upload_bytes: int = Field(64 << 20, ge=1024)
    max_sequences_per_request: int = Field(256, ge=1)
    max_sequence_length: int = Field(10_000, ge=1)
    model_cache_size: int = Field(8, ge=1)
    max_request_cost: float = Field(2e11, gt=0)
    batch_max_size: int = Field(64, ge=1, le=4096)
    batch_max_delay_ms: float = Field(0.0, ge=0, le=1000)
    batch_queue_size: int = Field(256, ge=1)
    predict_timeout: float = Field(30.0, gt=0)
    inline_forward_ms: float = Field(1.0, ge=0, le=100)
    max_sessions: int = Field(10_000, ge=1)
    session_ttl: float = Field(600.0, gt=0, le=MAX_SESSION_TTL_SECONDS)

    device: str = "auto"
    max_steps_per_job: int = Field(1_000_000, ge=1)
    max_job_seconds: float = Field(24 * 3600, gt=0)
    max_attempts: int = Field(3, ge=1, le=100)
    heartbeat_interval: float = Field(2.0, gt=0)
    heartbeat_timeout: float = Field(60.0, gt=0)
    progress_interval: float = Field(1.0, ge=0)
    reaper_interval: float = Field(15.0, ge=0)
    consume_timeout: float = Field(60.0, ge=0)
    event_retention_days: float = Field(30.0, ge=0)
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")

    max_job_memory_bytes: int = Field(0, ge=0)
    worker_flops: float = Field(1e11, gt=0)
    max_active_jobs_per_key: int = Field(20, ge=1)
    max_worker_seconds_per_key: float = Field(24 * 3600, gt=0)
    max_dataset_bytes_per_key: int = Field(1 << 30, ge=0)
    max_published_jobs_per_key: int = Field(2, ge=1)
    key_quotas: dict[str, dict[str, float]] = Field(default_factory=dict)
    min_free_disk_bytes: int = Field(1 << 30, ge=0)

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

    @field_validator("key_quotas")
    @classmethod
    def _check_key_quotas(cls, value: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for key, quotas in value.items():
            unknown = set(quotas) - set(KEY_QUOTA_FIELDS)
            if unknown:
                raise ValueError(
                    f"key {key!r}: unknown quota {sorted(unknown)}; expected some of "
                    f"{list(KEY_QUOTA_FIELDS)}"
                )
            if any(v < 0 for v in quotas.values()):
                raise ValueError(f"key {key!r}: quotas must be >= 0")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if (problem := check_device_name(value)) is not None:
            raise ValueError(problem)
        return value

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
        if self.session_store:
            _check_scheme("session_store", self.session_store, SESSION_STORE_SCHEMES)
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
            if isinstance(value, list):
                text = ",".join(value)
            elif isinstance(value, dict):
                text = json.dumps(value)
            else:
                text = str(value)
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
