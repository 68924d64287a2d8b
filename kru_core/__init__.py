"""kru_core: Kronecker Recurrent Units in pure PyTorch (the model library).

The names below are imported on first use (PEP 562), so that ``import kru_core.config`` or
``kru_core.errors`` (what the API's schemas and the worker's settings need) does not import
torch; ``from kru_core import KRU`` imports what it names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Each public name and the submodule that defines it.
_EXPORTS = {
    "Checkpoint": "checkpoint",
    "CheckpointStore": "checkpoint",
    "load_checkpoint": "checkpoint",
    "ConfigError": "config",
    "JobConfig": "config",
    "ModelConfig": "config",
    "TaskConfig": "config",
    "TrainConfig": "config",
    "CheckpointError": "errors",
    "DatasetError": "errors",
    "InputError": "errors",
    "KruError": "errors",
    "TaskUnavailableError": "errors",
    "TrainingError": "errors",
    "LoadedModel": "inference",
    "KLSTM": "klstm",
    "factorize": "kron",
    "kron_matvec": "kron",
    "unitary_penalty": "kron",
    "KRU": "kru",
    "KRUCell": "kru",
    "SequenceModel": "models",
    "build_model": "models",
    "Task": "tasks",
    "TaskInfo": "tasks",
    "build_task": "tasks",
    "inspect_dataset": "tasks",
    "inspect_text": "tasks",
    "Progress": "training",
    "TrainResult": "training",
    "evaluate": "training",
    "train": "training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # the names for type checkers (at run time: __getattr__)
    from .checkpoint import Checkpoint, CheckpointStore, load_checkpoint  # noqa: F401
    from .config import ConfigError, JobConfig, ModelConfig, TaskConfig, TrainConfig  # noqa: F401
    from .errors import (  # noqa: F401
        CheckpointError,
        DatasetError,
        InputError,
        KruError,
        TaskUnavailableError,
        TrainingError,
    )
    from .inference import LoadedModel  # noqa: F401
    from .klstm import KLSTM  # noqa: F401
    from .kron import factorize, kron_matvec, unitary_penalty  # noqa: F401
    from .kru import KRU, KRUCell  # noqa: F401
    from .models import SequenceModel, build_model  # noqa: F401
    from .tasks import Task, TaskInfo, build_task, inspect_dataset, inspect_text  # noqa: F401
    from .training import Progress, TrainResult, evaluate, train  # noqa: F401
