"""What :mod:`worker.service` returns: frozen dataclasses with the fields of the HTTP API.

Times are timezone-aware UTC ``datetime`` objects; configs, metrics and summaries are plain JSON
data (``dict``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list, newest first.

    Attributes:
        items: the page.
        total: items matching the filter, over all pages.
        limit, offset: the page's bounds as requested.
    """

    items: list[T]
    total: int
    limit: int
    offset: int


@dataclass(frozen=True)
class ProgressView:
    """Where a job is: ``step`` of ``total_steps``, ``fraction`` in [0, 1], the last metrics."""

    step: int
    total_steps: int
    fraction: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class JobView:
    """A training job (``GET /v1/jobs/{id}``).

    Attributes:
        id: the job id (32 hex characters).
        name: the user's name for it, or ``None``.
        status: ``queued``, ``running``, ``succeeded``, ``failed`` or ``cancelled``.
        config: the validated training config (``JobConfig.to_dict()``; ``name`` included).
        attempts: how many times a worker has started it (2 after one lost worker; a run that a
            worker handed back at a graceful shutdown is not counted).
        created_at, started_at, finished_at: UTC times; the last two ``None`` until reached.
        progress: step, total steps, fraction and last metrics.
        model_id: the registered model once ``succeeded``, else ``None``.
        error: a readable reason once ``failed``, else ``None``.
        cancel_requested: a cancel was asked and the worker has not stopped yet.
        worker: the worker holding (or that last held) the job.
    """

    id: str
    name: str | None
    status: JobStatus
    config: dict[str, Any]
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: ProgressView
    model_id: str | None
    error: str | None
    cancel_requested: bool
    worker: str | None


@dataclass(frozen=True)
class EventView:
    """One job event, for Server-Sent Events (``id`` increases; resume with ``after=id``).

    ``kind`` is ``"status"`` (``data``: ``status``, ``attempt``, and where they apply ``worker``,
    ``resumed_from_step``, ``reason`` (why a job went back to ``queued``), ``cancel_requested``,
    ``error``, ``model_id``) or ``"progress"`` (``data``: ``step``, ``total_steps``,
    ``fraction``, ``metrics``, ``phase`` = ``train``/``eval``/``checkpoint``).
    """

    id: int
    job_id: str
    kind: Literal["status", "progress"]
    data: dict[str, Any]
    time: datetime


@dataclass(frozen=True)
class DatasetView:
    """An uploaded dataset (``GET /v1/datasets/{id}``).

    Attributes:
        id: the dataset id; the file is stored under this id, never under ``filename``.
        filename: the client's file name, for display only (sanitised).
        kind: ``"jsonl"`` (for task ``dataset``) or ``"text"`` (for task ``text``).
        size_bytes: stored size.
        sha256: hex digest of the content.
        summary: what inspection found (examples or characters, target kind, vocabulary or
            feature size, lengths, ...), as returned by ``kru_core``'s inspection.
        created_at: upload time (UTC).
    """

    id: str
    filename: str
    kind: Literal["jsonl", "text"]
    size_bytes: int
    sha256: str
    summary: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class ModelView:
    """A trained model (``GET /v1/models/{id}``): the final checkpoint of a succeeded job.

    Attributes:
        id: the model id.
        name: the source job's name, or ``None``.
        job_id: the source job.
        config: the training config.
        task: task info of the checkpoint (``task_kind``, ``target_kind``, ``vocab_size`` or
            ``input_size``, ``output_size``, ``per_step``, vocabulary for text models).
        metrics: final evaluation metrics.
        parameter_counts: ``{"total": .., "recurrent": .., ...}``.
        checkpoint: absolute path of the checkpoint directory (for the predictor only; never
            shown to clients).
        created_at: registration time (UTC).
    """

    id: str
    name: str | None
    job_id: str
    config: dict[str, Any]
    task: dict[str, Any]
    metrics: dict[str, float]
    parameter_counts: dict[str, int]
    checkpoint: Path
    created_at: datetime
