"""kru_core: Kronecker Recurrent Units in pure PyTorch (the model library)."""

from .checkpoint import Checkpoint, CheckpointStore, load_checkpoint
from .config import ConfigError, JobConfig, ModelConfig, TaskConfig, TrainConfig
from .errors import (
    CheckpointError,
    DatasetError,
    InputError,
    KruError,
    TaskUnavailableError,
    TrainingError,
)
from .inference import LoadedModel
from .klstm import KLSTM
from .kron import factorize, kron_matvec, unitary_penalty
from .kru import KRU, KRUCell
from .models import SequenceModel
from .tasks import Task, TaskInfo, build_task, inspect_dataset, inspect_text
from .training import Progress, TrainResult, build_model, evaluate, train

__all__ = [
    "KLSTM",
    "KRU",
    "Checkpoint",
    "CheckpointError",
    "CheckpointStore",
    "ConfigError",
    "DatasetError",
    "InputError",
    "JobConfig",
    "KRUCell",
    "KruError",
    "LoadedModel",
    "ModelConfig",
    "Progress",
    "SequenceModel",
    "Task",
    "TaskConfig",
    "TaskInfo",
    "TaskUnavailableError",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "build_model",
    "build_task",
    "evaluate",
    "factorize",
    "inspect_dataset",
    "inspect_text",
    "kron_matvec",
    "load_checkpoint",
    "train",
    "unitary_penalty",
]
