"""Typed request and response bodies of the kru HTTP API (pydantic v2).

They mirror the API's schemas field for field (a test compares them with the app's OpenAPI).
Responses accept unknown fields (a newer server may add some); request models forbid them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED = frozenset({"succeeded", "failed", "cancelled"})

_REQUEST = ConfigDict(extra="forbid")
_RESPONSE = ConfigDict(extra="allow", protected_namespaces=())


class TaskSpec(BaseModel):
    """What to learn (``task`` of a job); fields left out keep the server's defaults."""

    model_config = _REQUEST
    kind: str | None = None
    delay: int | None = None
    length: int | None = None
    permuted: bool | None = None
    dataset_id: str | None = None
    seq_len: int | None = None
    eval_size: int | None = None


class ModelSpec(BaseModel):
    """Which network (``model`` of a job)."""

    model_config = _REQUEST
    cell: str | None = None
    hidden_size: int | None = None
    factors: list[int | list[int]] | None = None
    complex: bool | None = None
    activation: str | None = None
    backend: str | None = None
    allow_dense_factors: bool | None = None


class TrainSpec(BaseModel):
    """How to train (``train`` of a job)."""

    model_config = _REQUEST
    steps: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    factor_lr: float | None = None
    lr_schedule: str | None = None
    unitary_penalty: float | None = None
    clip_grad_norm: float | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None
    log_every: int | None = None
    seed: int | None = None
    device: str | None = None
    max_seconds: float | None = None
    keep_model_on_timeout: bool | None = None


class JobSpec(BaseModel):
    """A training job config: the ``POST /v1/jobs`` body."""

    model_config = _REQUEST
    name: str | None = None
    task: TaskSpec = Field(default_factory=TaskSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)

    def to_json(self) -> dict[str, Any]:
        """The body to send: only the fields that were set."""
        return self.model_dump(exclude_unset=True, exclude_none=False)


class JobProgress(BaseModel):
    """How far a job is."""

    model_config = _RESPONSE
    step: int
    total_steps: int
    fraction: float
    metrics: dict[str, float]


class Job(BaseModel):
    """A training job and where it stands."""

    model_config = _RESPONSE
    id: str
    name: str | None
    status: str
    config: dict[str, Any]
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: JobProgress
    model_id: str | None
    error: str | None
    cancel_requested: bool

    @property
    def finished(self) -> bool:
        """Whether the job ended (succeeded, failed or cancelled)."""
        return self.status in FINISHED


class MetricPoint(BaseModel):
    """One point of a job's metric history (metric names are extra fields)."""

    model_config = _RESPONSE
    step: int
    time: datetime
    attempt: int
    phase: str


class Dataset(BaseModel):
    """An uploaded dataset."""

    model_config = _RESPONSE
    id: str
    filename: str
    kind: str
    size_bytes: int
    sha256: str
    summary: dict[str, Any]
    created_at: datetime


# Mirrors worker/views.py's ModelView on purpose: kru_client never imports the server's packages.
class Model(BaseModel):
    """A trained model."""

    model_config = _RESPONSE
    id: str
    name: str | None
    job_id: str
    config: dict[str, Any]
    task: dict[str, Any]
    metrics: dict[str, float]
    parameter_counts: dict[str, int]
    created_at: datetime


class PredictRequest(BaseModel):
    """The ``POST /v1/models/{id}/predict`` body."""

    model_config = _REQUEST
    inputs: list[Any]
    probabilities: bool = False


class PredictResponse(BaseModel):
    """Predictions (and probabilities when asked for)."""

    model_config = _RESPONSE
    model_id: str
    predictions: list[Any]
    probabilities: list[Any] | None = None


class GenerateRequest(BaseModel):
    """The ``POST /v1/models/{id}/generate`` body."""

    model_config = _REQUEST
    prompt: str
    max_new_tokens: int = 100
    temperature: float = 1.0
    seed: int | None = None


class GenerateResponse(BaseModel):
    """Generated text (without the prompt)."""

    model_config = _RESPONSE
    model_id: str
    prompt: str
    text: str


class Event(BaseModel):
    """One Server-Sent Event of a job: ``status``, ``progress`` or the last ``end``.

    ``id`` is the stored event id (``None`` for ``end``); ``data`` its JSON data; ``job`` the
    finished job for ``end``.
    """

    id: int | None
    event: str
    data: dict[str, Any]

    @property
    def job(self) -> Job | None:
        """The finished job carried by the ``end`` event."""
        return Job.model_validate(self.data) if self.event == "end" else None


#: Response models and the API schema each mirrors (the drift test reads this).
MIRRORS: dict[str, type[BaseModel]] = {
    "TaskSpec": TaskSpec,
    "ModelSpec": ModelSpec,
    "TrainSpec": TrainSpec,
    "JobSpec": JobSpec,
    "JobProgress": JobProgress,
    "Job": Job,
    "MetricPoint": MetricPoint,
    "Dataset": Dataset,
    "Model": Model,
    "PredictRequest": PredictRequest,
    "PredictResponse": PredictResponse,
    "GenerateRequest": GenerateRequest,
    "GenerateResponse": GenerateResponse,
}
