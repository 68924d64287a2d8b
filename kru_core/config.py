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

TASK_KINDS: tuple[str, ...] = typing.get_args(TaskKind)
CELL_KINDS: tuple[str, ...] = typing.get_args(CellKind)
ACTIVATIONS: tuple[str, ...] = typing.get_args(Activation)
OPTIMIZERS: tuple[str, ...] = typing.get_args(OptimizerKind)
LR_SCHEDULES: tuple[str, ...] = typing.get_args(LrSchedule)


def _check_range(
    path: str,
    value: float | int | None,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, f"expected a finite number, got {value}")
    if ge is not None and value < ge:
        raise ConfigError(path, f"expected a value >= {ge}, got {value}")
    if gt is not None and value <= gt:
        raise ConfigError(path, f"expected a value > {gt}, got {value}")
    if le is not None and value > le:
        raise ConfigError(path, f"expected a value <= {le}, got {value}")


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
        _check_range("task.delay", self.delay, ge=1, le=10_000)
        _check_range("task.length", self.length, ge=2, le=10_000)
        _check_range("task.seq_len", self.seq_len, ge=2, le=10_000)
        _check_range("task.eval_size", self.eval_size, ge=1, le=100_000)
        if self.kind in ("dataset", "text") and not self.dataset_id:
            raise ConfigError("task.dataset_id", f"required for task kind {self.kind!r}")


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
    """

    cell: CellKind = "kru"
    hidden_size: int = 128
    factors: tuple[int | tuple[int, int], ...] | None = None
    complex: bool = True
    activation: Activation = "auto"

    def __post_init__(self) -> None:
        if self.cell not in CELL_KINDS:
            raise ConfigError(
                "model.cell", f"expected one of {list(CELL_KINDS)}, got {self.cell!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                "model.activation", f"expected one of {list(ACTIVATIONS)}, got {self.activation!r}"
            )
        _check_range("model.hidden_size", self.hidden_size, ge=1, le=8192)
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
            rows, cols = rows * p, cols * q
        if rows != self.hidden_size or cols != self.hidden_size:
            raise ConfigError(
                "model.factors",
                f"expected factor sizes whose products equal hidden_size {self.hidden_size}, "
                f"got {rows} x {cols}",
            )


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
        seed: seeds data, initialisation and sampling.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        max_seconds: wall-clock limit of the run (``None``: no limit).
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
    seed: int = 0
    device: str = "auto"
    max_seconds: float | None = None

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
        _check_range("train.steps", self.steps, ge=1, le=10_000_000)
        _check_range("train.batch_size", self.batch_size, ge=1, le=4096)
        _check_range("train.lr", self.lr, gt=0, le=10)
        _check_range("train.factor_lr", self.factor_lr, gt=0, le=10)
        _check_range("train.unitary_penalty", self.unitary_penalty, ge=0, le=1e6)
        _check_range("train.clip_grad_norm", self.clip_grad_norm, gt=0)
        _check_range("train.eval_every", self.eval_every, ge=1)
        _check_range("train.checkpoint_every", self.checkpoint_every, ge=1)
        _check_range("train.seed", self.seed, ge=0, le=2**63 - 1)
        _check_range("train.max_seconds", self.max_seconds, gt=0)
        d = self.device
        if not (d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise ConfigError(
                "train.device", f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {d!r}"
            )


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
