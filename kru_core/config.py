"""Job configuration: the ``task``, ``model`` and ``train`` sections of a training job.

These frozen dataclasses are the single description of a training run. The CLI reads them from a
JSON file, the service from the ``POST /v1/jobs`` body, and checkpoints carry them so that a model
rebuilds itself. :func:`JobConfig.from_dict` validates strictly: unknown fields, wrong types and
out-of-range values raise :class:`ConfigError`, whose ``field`` is the dotted path of the culprit
(``"train.lr"``); it is re-exported here from :mod:`kru_core.errors`.

Example::

    >>> cfg = JobConfig.from_dict({"task": {"kind": "copy", "delay": 20},
    ...                            "model": {"cell": "kru", "hidden_size": 64},
    ...                            "train": {"steps": 100}})
    >>> cfg.train.batch_size
    64
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from kru_core.errors import ConfigError

TaskKind = Literal["copy", "adding", "mnist", "dataset", "text"]
CellKind = Literal["kru", "kru_lstm", "rnn", "lstm"]
Activation = Literal["auto", "modrelu", "split_relu", "tanh", "identity"]
OptimizerKind = Literal["rmsprop", "adam"]
LrSchedule = Literal["constant", "cosine"]
#: ``kru_core.recurrence.BACKENDS`` (a test checks they agree; the config module imports no torch).
Backend = Literal["auto", "eager", "cpu", "triton"]

TASK_KINDS: tuple[str, ...] = typing.get_args(TaskKind)
CELL_KINDS: tuple[str, ...] = typing.get_args(CellKind)
ACTIVATIONS: tuple[str, ...] = typing.get_args(Activation)
OPTIMIZERS: tuple[str, ...] = typing.get_args(OptimizerKind)
LR_SCHEDULES: tuple[str, ...] = typing.get_args(LrSchedule)
BACKENDS: tuple[str, ...] = typing.get_args(Backend)

#: Device names a job (``train.device``) or a worker (``KRU_DEVICE``) may give; the request
#: schema uses the pattern, the config and the settings :func:`check_device_name`.
DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:[0-9]+)$"


def check_device_name(name: str) -> str | None:
    """``None`` when ``name`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; else the message."""
    if re.fullmatch(DEVICE_PATTERN, name):
        return None
    return f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}"


#: The largest Kronecker factor side accepted unless ``model.allow_dense_factors``: the paper's
#: factors are 2 to a few dozen; one factor the size of N is a dense RNN in disguise.
MAX_FACTOR_SIZE = 64


@dataclass(frozen=True)
class Range:
    """Bounds of one numeric config field (``None``: unbounded on that side)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def bounds(self) -> dict[str, float]:
        """The bounds that are set, as keyword arguments (``pydantic.Field(**r.bounds())``)."""
        return {
            k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le)) if v is not None
        }


#: The smallest ``train.max_seconds``: a shorter limit stops a run before its first steps.
MIN_MAX_SECONDS = 1.0

#: The one home of the config's numeric ranges, by dotted field path; the API's request schemas
#: (``app/schemas.py``) derive theirs from it.
RANGES: dict[str, Range] = {
    "task.delay": Range(ge=1, le=10_000),
    "task.length": Range(ge=2, le=10_000),
    "task.seq_len": Range(ge=2, le=10_000),
    "task.eval_size": Range(ge=1, le=100_000),
    "model.hidden_size": Range(ge=1, le=8192),
    "train.steps": Range(ge=1, le=10_000_000),
    "train.batch_size": Range(ge=1, le=4096),
    "train.lr": Range(gt=0, le=10),
    "train.factor_lr": Range(gt=0, le=10),
    "train.unitary_penalty": Range(ge=0, le=1e6),
    "train.clip_grad_norm": Range(gt=0),
    "train.eval_every": Range(ge=1),
    "train.checkpoint_every": Range(ge=1),
    "train.log_every": Range(ge=1),
    "train.seed": Range(ge=0, le=2**63 - 1),
    "train.max_seconds": Range(ge=MIN_MAX_SECONDS),
}


def _check_range(path: str, value: float | int | None) -> None:
    """Refuse ``value`` outside ``RANGES[path]`` (or not finite) with a :class:`ConfigError`."""
    if value is None:
        return
    bounds = RANGES[path]
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, f"expected a finite number, got {value}")
    if bounds.ge is not None and value < bounds.ge:
        raise ConfigError(path, f"expected a value >= {bounds.ge}, got {value}")
    if bounds.gt is not None and value <= bounds.gt:
        raise ConfigError(path, f"expected a value > {bounds.gt}, got {value}")
    if bounds.le is not None and value > bounds.le:
        raise ConfigError(path, f"expected a value <= {bounds.le}, got {value}")


@dataclass(frozen=True)
class TaskConfig:
    """What to learn.

    Args:
        kind: ``copy`` (copy memory, ``delay``), ``adding`` (``length``), ``mnist`` (pixel MNIST,
            ``permuted``), ``dataset`` (a user JSONL upload, ``dataset_id``) or ``text`` (a
            character-level language model on a text upload, ``dataset_id``, ``seq_len``).
        delay: copy task: blanks between the data and the recall (``T`` in the paper).
        length: adding task: sequence length.
        permuted: mnist: use one fixed, seeded pixel permutation.
        dataset_id: dataset and text tasks: the id of an uploaded dataset.
        seq_len: text task: training window length in characters.
        eval_size: held-out examples evaluated at each evaluation.
    """

    kind: TaskKind = "copy"
    delay: int = 100
    length: int = 100
    permuted: bool = False
    dataset_id: str | None = None
    seq_len: int = 100
    eval_size: int = 512

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ConfigError("task.kind", f"expected one of {list(TASK_KINDS)}, got {self.kind!r}")
        _check_range("task.delay", self.delay)
        _check_range("task.length", self.length)
        _check_range("task.seq_len", self.seq_len)
        _check_range("task.eval_size", self.eval_size)
        if self.kind in ("dataset", "text") and not self.dataset_id:
            raise ConfigError("task.dataset_id", f"required for task kind {self.kind!r}")


def dense_factor_message(factor: object) -> str:
    """Why a factor above :data:`MAX_FACTOR_SIZE` is refused (config and admission alike)."""
    return (
        f"expected factor sizes of at most {MAX_FACTOR_SIZE}, got {factor}: a factor that "
        "large is close to a dense RNN (set model.allow_dense_factors: true to train it anyway)"
    )


@dataclass(frozen=True)
class ModelConfig:
    """Which network.

    Args:
        cell: ``kru``, ``kru_lstm`` (Kronecker-factored LSTM gates), or the baselines ``rnn``
            (``torch.nn.RNN``, tanh) and ``lstm`` (``torch.nn.LSTM``).
        hidden_size: N, the hidden state size.
        factors: Kronecker factor sizes (ints for square factors, ``[P, Q]`` pairs), or ``None``
            for :func:`kru_core.factorize`'s default.
        complex: complex factors and hidden state (KRU); real factors when false.
        activation: ``modrelu``, ``split_relu``, ``tanh`` (real only), ``identity``, or
            ``auto``: the measured choice for the task (``docs/results.md``): ``split_relu``
            for ``adding``, ``modrelu`` for everything else.
        backend: which implementation runs the KRU recurrence: ``auto`` (the fastest measured
            one for the device), ``eager`` (PyTorch ops, the reference), ``cpu`` (the compiled
            C++ operator) or ``triton`` (the GPU kernel); an unavailable one falls back to
            ``eager`` with a log line. Checkpoints do not depend on it.
        allow_dense_factors: accept factors with a side above :data:`MAX_FACTOR_SIZE` (the
            service also refuses a default factorization with one, e.g. a prime hidden size).
    """

    cell: CellKind = "kru"
    hidden_size: int = 128
    factors: tuple[int | tuple[int, int], ...] | None = None
    complex: bool = True
    activation: Activation = "auto"
    backend: Backend = "auto"
    allow_dense_factors: bool = False

    def __post_init__(self) -> None:
        if self.cell not in CELL_KINDS:
            raise ConfigError(
                "model.cell", f"expected one of {list(CELL_KINDS)}, got {self.cell!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                "model.activation", f"expected one of {list(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(
                "model.backend", f"expected one of {list(BACKENDS)}, got {self.backend!r}"
            )
        _check_range("model.hidden_size", self.hidden_size)
        if self.factors is not None:
            self._check_factors()
        if self.cell == "kru" and self.complex and self.activation == "tanh":
            raise ConfigError(
                "model.activation", "tanh needs real states: set model.complex to false"
            )

    def _check_factors(self) -> None:
        factors = self.factors or ()
        if self.cell in ("rnn", "lstm"):
            raise ConfigError("model.factors", f"expected null for cell {self.cell!r} (dense)")
        if len(factors) == 0:
            raise ConfigError("model.factors", "expected a non-empty list or null, got []")
        rows = cols = 1
        for i, f in enumerate(factors):
            p, q = f if isinstance(f, tuple) else (f, f)
            if p < 1 or q < 1:
                raise ConfigError(f"model.factors.{i}", f"expected positive sizes, got {f}")
            if max(p, q) > MAX_FACTOR_SIZE and not self.allow_dense_factors:
                raise ConfigError(f"model.factors.{i}", dense_factor_message(f))
            rows, cols = rows * p, cols * q
        if rows != self.hidden_size or cols != self.hidden_size:
            raise ConfigError(
                "model.factors",
                f"expected factor sizes whose products equal hidden_size {self.hidden_size}, "
                f"got {rows} x {cols}",
            )


#: About how many training-metric points a run records when ``train.log_every`` is not set.
LOG_POINTS = 250


@dataclass(frozen=True)
class TrainConfig:
    """How to train. The defaults were chosen by measurement (``docs/results.md``): Adam at
    3e-3 with a cosine decay and the gradient norm clipped to 1 learns the copy and adding
    tasks several times faster, and more stably, than RMSprop at 1e-3 without clipping.

    Args:
        steps: optimizer steps.
        batch_size: sequences per step.
        optimizer: ``rmsprop`` or ``adam``.
        lr: learning rate of every parameter but the Kronecker factors.
        factor_lr: learning rate of the Kronecker factors (``None``: ``lr * min(1, 100 / T)``
            for sequences of ``T`` steps, :func:`kru_core.training.factor_learning_rate`).
        lr_schedule: ``constant``, or ``cosine``: both learning rates decay as
            ``(1 + cos(pi * step / steps)) / 2`` towards 0 at the last step.
        unitary_penalty: weight of ``sum_f ||W_f^H W_f - I||_F^2`` in the loss.
        clip_grad_norm: clip the global gradient norm to this value (``None``: no clipping).
        eval_every: evaluate on held-out data every this many steps.
        checkpoint_every: save a checkpoint every this many steps (and always at the end).
        log_every: record the training metrics every this many steps (and at the last one);
            ``None``: :meth:`log_interval`'s default, about :data:`LOG_POINTS` points a run.
        seed: seeds data, initialisation and sampling.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        max_seconds: wall-clock limit of the run (``None``: no limit), at least
            :data:`MIN_MAX_SECONDS`. A run it stops ends ``failed`` in the service, with no
            model registered, unless ``keep_model_on_timeout``.
        keep_model_on_timeout: a run stopped by its own ``max_seconds`` after at least one step
            ends ``succeeded`` with the model it has (an anytime run); default false.
    """

    steps: int = 2000
    batch_size: int = 64
    optimizer: OptimizerKind = "adam"
    lr: float = 3e-3
    factor_lr: float | None = None
    lr_schedule: LrSchedule = "cosine"
    unitary_penalty: float = 1e-2
    clip_grad_norm: float | None = 1.0
    eval_every: int = 100
    checkpoint_every: int = 200
    log_every: int | None = None
    seed: int = 0
    device: str = "auto"
    max_seconds: float | None = None
    keep_model_on_timeout: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                "train.optimizer", f"expected one of {list(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                "train.lr_schedule",
                f"expected one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}",
            )
        _check_range("train.steps", self.steps)
        _check_range("train.batch_size", self.batch_size)
        _check_range("train.lr", self.lr)
        _check_range("train.factor_lr", self.factor_lr)
        _check_range("train.unitary_penalty", self.unitary_penalty)
        _check_range("train.clip_grad_norm", self.clip_grad_norm)
        _check_range("train.eval_every", self.eval_every)
        _check_range("train.checkpoint_every", self.checkpoint_every)
        _check_range("train.log_every", self.log_every)
        _check_range("train.seed", self.seed)
        _check_range("train.max_seconds", self.max_seconds)
        if (problem := check_device_name(self.device)) is not None:
            raise ConfigError("train.device", problem)

    def log_interval(self) -> int:
        """Steps between recorded training metrics: ``log_every``, or ``steps // LOG_POINTS``
        (at least 1) when it is not set."""
        return self.log_every or max(1, self.steps // LOG_POINTS)


@dataclass(frozen=True)
class JobConfig:
    """A whole training job: ``task``, ``model`` and ``train`` sections plus an optional name."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str | None = None

    @classmethod
    def from_dict(cls, data: Any) -> JobConfig:
        """Build and validate a config from plain JSON data; raise :class:`ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError("body", f"expected an object, got {type(data).__name__}")
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (tuples become lists); ``from_dict(to_dict())`` round-trips."""
        return _jsonable(dataclasses.asdict(self))

    def replace(self, **sections: dict[str, Any]) -> JobConfig:
        """A copy with fields overridden per section: ``cfg.replace(train={"steps": 10})``."""
        data = self.to_dict()
        for section, values in sections.items():
            if section not in data or not isinstance(data[section], dict):
                raise ConfigError(section, "unknown section")
            data[section] = {**data[section], **values}
        return JobConfig.from_dict(data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{key}", f"unknown field; expected one of {sorted(known)}")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return "a [P, Q] pair"
    return {int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; JSON lists become tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected an object, got {type(value).__name__}")
        return _build(tp, value, f"{path}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, path)
            except ConfigError as exc:
                errors.append(exc.message)
        if len(errors) == 1:
            raise ConfigError(path, errors[0])
        names = " or ".join(_type_name(o) for o in options)
        raise ConfigError(path, f"expected {names}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"expected one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}.{i}") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(path, f"expected a list of {len(args)} items, got {len(value)}")
        return tuple(
            _coerce(a, v, f"{path}.{i}") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected a boolean, got {type(value).__name__}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {type(value).__name__}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {type(value).__name__}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {type(value).__name__}")
        if len(value) > 200:
            raise ConfigError(path, f"expected at most 200 characters, got {len(value)}")
        return value
    raise ConfigError(path, f"unsupported type {_type_name(tp)}")  # pragma: no cover
