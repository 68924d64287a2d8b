"""Request and response bodies of the HTTP API (pydantic v2); they are the OpenAPI docs.

Request bodies forbid unknown fields and are strict (``"5"`` is not an integer, ``1`` is not a
boolean). The training-config models mirror :mod:`kru_core.config`: same fields, same defaults
(read from the dataclasses), same ranges, so the docs show them and most mistakes are caught with
the offending field before :meth:`kru_core.config.JobConfig.from_dict` runs its own checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, Self, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, WithJsonSchema

from kru_core.config import (
    DEVICE_PATTERN,
    LOG_POINTS,
    MAX_FACTOR_SIZE,
    RANGES,
    Activation,
    Backend,
    CellKind,
    JobConfig,
    LrSchedule,
    ModelConfig,
    OptimizerKind,
    TaskConfig,
    TaskKind,
    TrainConfig,
)
from worker.ids import ID_PATTERN
from worker.service import MAX_PAGE
from worker.views import JobStatus

#: The item type of a :class:`Page`.
Item = TypeVar("Item")

_STRICT = ConfigDict(extra="forbid", strict=True)


def example_config(example: dict[str, Any], **config: Any) -> ConfigDict:
    """A model's ``model_config``: the ``config`` options and ``example`` as the example value
    of its JSON Schema (shown in the OpenAPI docs)."""
    return ConfigDict(**config, json_schema_extra={"examples": [example]})


# Integers a JSON client can round-trip exactly (JavaScript, and JSON Schema validators that
# compare through floats); seeds above it are refused although kru_core takes up to 2**63 - 1.
MAX_JSON_INT = 2**53 - 1


def _integral_float_to_int(value: Any) -> Any:
    """JSON has one number type: ``2.0`` is the integer 2 (as in JSON Schema); ``2.5`` is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer in strict request models: strings and fractional numbers are refused, ``2.0`` passes.
JsonInt = Annotated[int, BeforeValidator(_integral_float_to_int)]
JsonPositiveInt = Annotated[JsonInt, Field(gt=0)]


def _bounded_int(**bounds: float) -> Any:
    """``JsonInt`` with bounds, for an Optional field: bounds on ``JsonInt | None`` would be
    documented as ``ge``/``le`` instead of JSON Schema's ``minimum``/``maximum`` (pydantic), so
    they go inside, before the validator."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral_float_to_int)]


_SECTIONS = {TaskConfig: "task", ModelConfig: "model", TrainConfig: "train"}


def _field(cls: type, name: str, **kwargs: Any) -> Any:
    """A ``Field`` with the default of ``cls.name`` and its range from
    :data:`kru_core.config.RANGES` (``kwargs`` add to them or narrow them, e.g. ``le``)."""
    bounds = RANGES[f"{_SECTIONS[cls]}.{name}"].bounds()
    return Field(_default(cls, name), **(bounds | kwargs))


def _default(cls: type, name: str) -> Any:
    """The default of field ``name`` of a :mod:`kru_core.config` dataclass."""
    return {f.name: f for f in dataclasses.fields(cls)}[name].default


# ---------------------------------------------------------------------------------------------
# Training config (the POST /v1/jobs body)


class TaskSpec(BaseModel):
    """What to learn."""

    model_config = _STRICT

    kind: TaskKind = Field(
        _default(TaskConfig, "kind"),
        description="copy memory, adding, (permuted) pixel MNIST, a user JSONL dataset, or a "
        "character-level language model on a text upload",
    )
    delay: JsonInt = _field(TaskConfig, "delay", description="copy: blanks before recall")
    length: JsonInt = _field(TaskConfig, "length", description="adding: sequence length")
    permuted: bool = Field(
        _default(TaskConfig, "permuted"), description="mnist: one fixed, seeded permutation"
    )
    dataset_id: str | None = Field(
        _default(TaskConfig, "dataset_id"),
        pattern=f"^{ID_PATTERN}$",
        description="dataset and text tasks: the id returned by POST /v1/datasets",
    )
    seq_len: JsonInt = _field(TaskConfig, "seq_len", description="text: window length")
    eval_size: JsonInt = _field(TaskConfig, "eval_size", description="held-out examples")


FactorPair = Annotated[list[JsonPositiveInt], Field(min_length=2, max_length=2)]


class ModelSpec(BaseModel):
    """Which network."""

    model_config = _STRICT

    cell: CellKind = Field(
        _default(ModelConfig, "cell"), description="KRU, KRU-LSTM, or the RNN / LSTM baselines"
    )
    hidden_size: JsonInt = _field(ModelConfig, "hidden_size")
    factors: list[JsonPositiveInt | FactorPair] | None = Field(
        _default(ModelConfig, "factors"),
        min_length=1,
        description="Kronecker factor sizes (ints or [P, Q] pairs); null: the default split",
    )
    complex: bool = Field(_default(ModelConfig, "complex"), description="complex factors")
    activation: Activation = Field(_default(ModelConfig, "activation"))
    backend: Backend = Field(
        _default(ModelConfig, "backend"),
        description="implementation of the KRU recurrence (auto: the fastest for the device)",
    )
    allow_dense_factors: bool = Field(
        _default(ModelConfig, "allow_dense_factors"),
        description=f"accept Kronecker factors with a side above {MAX_FACTOR_SIZE}",
    )


class TrainSpec(BaseModel):
    """How to train."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    steps: JsonInt = _field(TrainConfig, "steps")
    batch_size: JsonInt = _field(TrainConfig, "batch_size")
    optimizer: OptimizerKind = Field(_default(TrainConfig, "optimizer"))
    lr: float = _field(TrainConfig, "lr")
    factor_lr: float | None = _field(
        TrainConfig,
        "factor_lr",
        description="null: lr * min(1, 100 / T) for sequences of T steps",
    )
    lr_schedule: LrSchedule = Field(
        _default(TrainConfig, "lr_schedule"),
        description="constant, or cosine: both learning rates decay towards 0 at the last step",
    )
    unitary_penalty: float = _field(TrainConfig, "unitary_penalty")
    clip_grad_norm: float | None = _field(TrainConfig, "clip_grad_norm")
    eval_every: JsonInt = _field(TrainConfig, "eval_every")
    checkpoint_every: JsonInt = _field(TrainConfig, "checkpoint_every")
    log_every: _bounded_int(**RANGES["train.log_every"].bounds()) | None = Field(
        _default(TrainConfig, "log_every"),
        description=f"steps between recorded training metrics; null: about {LOG_POINTS} a run",
    )
    seed: JsonInt = _field(TrainConfig, "seed", le=MAX_JSON_INT)
    device: str = Field(
        _default(TrainConfig, "device"),
        pattern=DEVICE_PATTERN,
        description="auto, cpu, cuda or cuda:N",
    )
    max_seconds: float | None = _field(
        TrainConfig,
        "max_seconds",
        description="wall-clock limit of the run; a run it stops ends failed, without a model",
    )
    keep_model_on_timeout: bool = Field(
        _default(TrainConfig, "keep_model_on_timeout"),
        description="a run stopped by max_seconds ends succeeded with the model it has",
    )


# Learns to recall the 10 symbols (eval accuracy ~0.99) in about 20 s of one CPU core.
COPY_JOB_EXAMPLE: dict[str, Any] = {
    "name": "copy-demo",
    "task": {"kind": "copy", "delay": 10},
    "model": {"cell": "kru", "hidden_size": 32},
    "train": {"steps": 500, "batch_size": 32, "optimizer": "adam", "lr": 0.01, "eval_every": 100},
}


class JobSpec(BaseModel):
    """A training job: ``task``, ``model`` and ``train`` sections and an optional name."""

    model_config = example_config(COPY_JOB_EXAMPLE, extra="forbid", strict=True)

    name: str | None = Field(
        None, max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$", description="a label for people"
    )
    task: TaskSpec = Field(default_factory=TaskSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)

    def to_job_config(self) -> JobConfig:
        """The validated :class:`JobConfig`; fields not sent keep kru_core's defaults.

        Raises:
            kru_core.config.ConfigError: a cross-field rule of kru_core (e.g. ``tanh`` with
                complex states) fails.
        """
        return JobConfig.from_dict(self.model_dump(exclude_unset=True))


# ---------------------------------------------------------------------------------------------
# Query strings of the list routes (unknown parameters are refused, like unknown body fields)


class PageQuery(BaseModel):
    """A page of a list, newest first."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(50, ge=1, le=MAX_PAGE, description="items per page")
    offset: int = Field(0, ge=0, le=1_000_000_000, description="items to skip")


class JobQuery(PageQuery):
    """A page of jobs, optionally with one status."""

    status: JobStatus | None = Field(None, description="only jobs with this status")


# ---------------------------------------------------------------------------------------------
# Jobs


class JobProgress(BaseModel):
    """How far a job is."""

    model_config = ConfigDict(from_attributes=True)

    step: int = Field(description="optimizer steps done")
    total_steps: int
    fraction: float = Field(ge=0, le=1)
    metrics: dict[str, float] = Field(description="the latest metrics, e.g. loss, eval_accuracy")


class Job(BaseModel):
    """A training job and where it stands."""

    model_config = example_config(
        {
            "id": "8a1f0c3e6b2d4f5a9c7e1b3d5f7a9c0e",
            "name": "copy-demo",
            "status": "running",
            "config": COPY_JOB_EXAMPLE,
            "attempts": 1,
            "created_at": "2026-01-05T10:00:00Z",
            "started_at": "2026-01-05T10:00:01Z",
            "finished_at": None,
            "progress": {
                "step": 120,
                "total_steps": 300,
                "fraction": 0.4,
                "metrics": {"loss": 0.41, "eval_accuracy": 0.62},
            },
            "model_id": None,
            "error": None,
            "cancel_requested": False,
        },
        from_attributes=True,
    )

    id: str
    name: str | None
    status: JobStatus
    config: dict[str, Any] = Field(description="the full training config, defaults filled in")
    attempts: int = Field(description="how many times a worker started it (2 after a crash)")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: JobProgress
    model_id: str | None = Field(description="the trained model, once succeeded")
    error: str | None = Field(description="why it failed, once failed")
    cancel_requested: bool = Field(description="a cancel was asked; the worker is stopping")


class Page(BaseModel, Generic[Item]):
    """A page of a list, newest first: ``items`` from ``offset``, ``total`` over all pages."""

    model_config = ConfigDict(from_attributes=True)

    items: list[Item]
    total: int = Field(description="items matching the filter, all pages")
    limit: int
    offset: int

    @classmethod
    def listed(cls, lister: Callable[..., Any], query: PageQuery, **filters: Any) -> Self:
        """The page that a :mod:`worker.service` ``list_...`` function returns for ``query``'s
        ``limit`` and ``offset`` (and ``filters``, e.g. ``status``)."""
        return cls.model_validate(lister(limit=query.limit, offset=query.offset, **filters))


class JobList(Page[Job]):
    """A page of jobs, newest first."""


class MetricPoint(BaseModel):
    """One point of a job's metric history: where, when, and the metrics at that step."""

    model_config = example_config(
        {
            "step": 100,
            "time": "2026-01-05T10:00:31Z",
            "attempt": 1,
            "phase": "eval",
            "eval_loss": 0.49,
            "eval_accuracy": 0.71,
        },
        extra="allow",
    )

    step: int
    time: datetime
    attempt: int = Field(description="the attempt that recorded it (a resumed run starts > 0)")
    phase: str = Field(description="train (throttled training loss) or eval")


# ---------------------------------------------------------------------------------------------
# Datasets


class Dataset(BaseModel):
    """An uploaded dataset; train on it with task kind ``dataset`` (JSONL) or ``text``."""

    model_config = example_config(
        {
            "id": "0b9d2f4a6c8e4a1b3d5f7a9c1e3b5d7f",
            "filename": "parity.jsonl",
            "kind": "jsonl",
            "size_bytes": 48213,
            "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "summary": {"examples": 1000, "target_kind": "class", "vocab_size": 2},
            "created_at": "2026-01-05T09:58:00Z",
        },
        from_attributes=True,
    )

    id: str = Field(description="the stored file is named by this id, never by filename")
    filename: str = Field(description="the uploaded file's name, for display only")
    kind: Literal["jsonl", "text"]
    size_bytes: int
    sha256: str
    summary: dict[str, Any] = Field(description="what validation found in the file")
    created_at: datetime


class DatasetList(Page[Dataset]):
    """A page of datasets, newest first."""


# ---------------------------------------------------------------------------------------------
# Models


class Model(BaseModel):
    """A trained model: the final checkpoint of a succeeded job."""

    model_config = example_config(
        {
            "id": "5d2c9e0a7b1f4e3a8c6d2b0f9e7a5c3d",
            "name": "copy-demo",
            "job_id": "8a1f0c3e6b2d4f5a9c7e1b3d5f7a9c0e",
            "config": COPY_JOB_EXAMPLE,
            "task": {
                "task_kind": "copy",
                "target_kind": "class",
                "vocab_size": 10,
                "output_size": 10,
                "per_step": True,
            },
            "metrics": {"eval_loss": 0.02, "eval_accuracy": 0.99},
            "parameter_counts": {"total": 1450, "recurrent": 160},
            "created_at": "2026-01-05T10:02:10Z",
        },
        from_attributes=True,
        protected_namespaces=(),
    )

    id: str
    name: str | None
    job_id: str = Field(description="the job that trained it")
    config: dict[str, Any] = Field(description="the training config")
    task: dict[str, Any] = Field(description="inputs and outputs the model expects")
    metrics: dict[str, float] = Field(description="final evaluation metrics")
    parameter_counts: dict[str, int] = Field(description="total and recurrent parameters")
    created_at: datetime


class ModelList(Page[Model]):
    """A page of models, newest first."""


# ---------------------------------------------------------------------------------------------
# Predictions


# Tokens (ints), or one number per step for 1-feature models; ints stay ints.
NumberSequence = Annotated[list[JsonInt | float], Field(min_length=1)]
FeatureSequence = Annotated[list[Annotated[list[float], Field(min_length=1)]], Field(min_length=1)]
TextSequence = Annotated[str, Field(min_length=1)]


class PredictRequest(BaseModel):
    """Sequences to run through a model."""

    model_config = example_config(
        {
            "inputs": [[3, 1, 4, 1, 5, 2, 6, 5, 3, 5, *[0] * 9, 9, *[0] * 10]],
            "probabilities": False,
        },
        extra="forbid",
        strict=True,
    )

    inputs: Annotated[
        list[Annotated[list[Any], Field(min_length=1)] | TextSequence],
        # Documented as the shapes models take; accepted as any lists, so that a bad step is
        # one error from the predictor, which knows the model ("inputs.0.1: expected a token
        # ..."), instead of one per member of the union.
        WithJsonSchema(
            {
                **TypeAdapter(list[NumberSequence | FeatureSequence | TextSequence]).json_schema(),
                "minItems": 1,
            }
        ),
    ] = Field(
        min_length=1,
        description="one entry per sequence: a list of tokens (ints) for token tasks (copy, "
        "token datasets, text), a string for text models, or a list of feature vectors (lists "
        "of floats) for feature tasks (adding: 2 per step; mnist: 1 per step, where plain "
        "numbers also do)",
    )
    probabilities: bool = Field(False, description="also return the output probabilities")


class PredictResponse(BaseModel):
    """Predictions: per-step tasks give one label per step, sequence tasks one value."""

    model_config = example_config(
        {
            "model_id": "5d2c9e0a7b1f4e3a8c6d2b0f9e7a5c3d",
            "predictions": [[0] * 20 + [3, 1, 4, 1, 5, 2, 6, 5, 3, 5]],
        },
        protected_namespaces=(),
    )

    model_id: str
    predictions: list[Any]
    probabilities: list[Any] | None = None


class GenerateRequest(BaseModel):
    """Sample text from a character-level model."""

    model_config = example_config(
        {"prompt": "In the beginning", "max_new_tokens": 50, "temperature": 0.8},
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
    )

    prompt: str = Field(
        min_length=1,
        description="text to continue; every character must be in the model's vocabulary",
    )
    max_new_tokens: JsonInt = Field(100, ge=1, description="characters to generate")
    temperature: float = Field(1.0, ge=0, le=100, description="0: greedy")
    seed: _bounded_int(ge=0, le=MAX_JSON_INT) | None = Field(
        None, description="null: a random seed"
    )


class GenerateResponse(BaseModel):
    """Generated text."""

    model_config = example_config(
        {
            "model_id": "5d2c9e0a7b1f4e3a8c6d2b0f9e7a5c3d",
            "prompt": "In the beginning",
            "text": " God created the heaven and the earth.",
        },
        protected_namespaces=(),
    )

    model_id: str
    prompt: str
    text: str = Field(description="the generated continuation (without the prompt)")


# ---------------------------------------------------------------------------------------------
# Errors


class ErrorItem(BaseModel):
    """One problem of a request."""

    field: str | None = Field(None, description="dotted path of the offending value")
    line: int | None = Field(None, description="dataset uploads: the 1-based line number")
    message: str


class ErrorResponse(BaseModel):
    """Every error body: a stable ``detail`` and, for invalid input, what was wrong where."""

    model_config = example_config(
        {
            "detail": "train.lr: Input should be greater than 0",
            "field": "train.lr",
            "errors": [{"field": "train.lr", "message": "Input should be greater than 0"}],
        },
    )

    detail: str
    field: str | None = None
    errors: list[ErrorItem] | None = Field(
        None, description="every problem found, the first 100 of them when there are more"
    )
    errors_total: int | None = Field(
        None, description="how many problems there were, when errors lists only the first 100"
    )


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries of the given error codes, all with :class:`ErrorResponse`."""
    texts = {
        401: "Missing API key",
        403: "Invalid API key",
        404: "Unknown id",
        409: "Conflict with the resource's state",
        413: "Request body too large",
        422: "Invalid input",
        429: "Over a quota of the API key (Retry-After: when it frees)",
        507: "The server's disk is too full for the upload",
        503: "Not ready",
    }
    return {code: {"model": ErrorResponse, "description": texts[code]} for code in codes}
