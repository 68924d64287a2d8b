"""Checkpoints: safetensors for tensors, JSON for the rest, written atomically, never unpickled.

A checkpoint is a directory ``step-000000200/`` in a run directory:

* ``model.safetensors``: the model's ``state_dict``;
* ``train_state.safetensors``: optimizer state tensors (``optimizer.<param index>.<key>``) and
  RNG states as ``uint8`` tensors (``rng.<name>``);
* ``checkpoint.json``: format and version, the full job config, step, metrics, the task info
  (vocabulary included), parameter counts, the optimizer's non-tensor state and param groups,
  and free-form ``meta`` (e.g. elapsed seconds).

:meth:`CheckpointStore.save` writes everything into a temporary directory in the run directory,
flushes it to disk, then renames it into place, so a reader sees either the whole checkpoint or
none of it. The store keeps the latest ``keep`` checkpoints.

Example::

    >>> store = CheckpointStore(run_dir)
    >>> store.save(step=200, config=cfg, task_info=info, model=model, optimizer=opt)
    >>> ckpt = store.load()          # the latest
    >>> model.load_state_dict(ckpt.model_state)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from kru_core.config import ConfigError, JobConfig
from kru_core.errors import CheckpointError
from kru_core.tasks.base import TaskInfo

logger = logging.getLogger(__name__)

FORMAT = "kru-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.safetensors"
META_FILE = "checkpoint.json"
_NAME = re.compile(r"^step-(\d{9,})$")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: its directory.
        step: optimizer steps done.
        config: the job config of the run.
        task_info: what the model was trained on (vocabulary, sizes, per-step or not).
        metrics: the last evaluation metrics (``eval_*``) at saving time.
        model_state: the model's ``state_dict``.
        optimizer_state: an ``Optimizer.state_dict()`` (``None`` when not loaded or not saved).
        rng_state: RNG states by name (``uint8`` tensors).
        parameter_counts: ``{"total", "recurrent"}``.
        meta: free-form run data saved with it (e.g. ``elapsed_seconds``).
    """

    path: Path
    step: int
    config: JobConfig
    task_info: TaskInfo
    metrics: dict[str, float]
    model_state: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None = None
    rng_state: dict[str, Tensor] = field(default_factory=dict)
    parameter_counts: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class CheckpointStore:
    """The checkpoints of one run, in ``root``; keeps the latest ``keep``.

    Args:
        root: the run directory (created on the first save).
        keep: how many checkpoints to keep (the oldest are deleted after each save).
    """

    def __init__(self, root: str | Path, *, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"expected keep >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        """The complete checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _NAME.match(path.name)
            if match and (path / META_FILE).is_file():
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The latest checkpoint directory, or ``None`` when there is none."""
        found = self.checkpoints()
        return found[-1] if found else None

    def latest_step(self) -> int:
        """The step of the latest checkpoint; 0 when there is none."""
        latest = self.latest()
        return 0 if latest is None else step_of(latest)

    def save(
        self,
        *,
        step: int,
        config: JobConfig,
        task_info: TaskInfo,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        rng_state: dict[str, Tensor] | None = None,
        metrics: dict[str, float] | None = None,
        parameter_counts: dict[str, int] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Path:
        """Write a checkpoint at ``step`` atomically and return its directory.

        A checkpoint already at ``step`` (a run stopped and resumed without a step in between)
        is replaced.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        final = self.root / f"step-{step:09d}"
        tmp = self.root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_tensors(tmp / MODEL_FILE, _model_tensors(model))
            train_tensors: dict[str, Tensor] = {}
            optimizer_json = None
            if optimizer is not None:
                opt_tensors, optimizer_json = _split_optimizer_state(optimizer.state_dict())
                train_tensors.update(opt_tensors)
            for name, state in (rng_state or {}).items():
                train_tensors[f"rng.{name}"] = state.to("cpu", torch.uint8)
            _write_tensors(tmp / TRAIN_STATE_FILE, train_tensors)
            document = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "step": step,
                "config": config.to_dict(),
                "task": task_info.to_dict(),
                "metrics": metrics or {},
                "parameter_counts": parameter_counts or {},
                "optimizer": optimizer_json,
                "meta": {"created_at": time.time(), "torch": torch.__version__, **(meta or {})},
            }
            _write_json(tmp / META_FILE, document)
            _fsync_dir(tmp)
            _replace_dir(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        logger.debug("saved checkpoint %s", final)
        return final

    def load(
        self, path: str | Path | None = None, *, train_state: bool = True, device: str = "cpu"
    ) -> Checkpoint:
        """Load ``path`` (default: the latest); see :func:`load_checkpoint`."""
        if path is None:
            path = self.latest()
            if path is None:
                raise CheckpointError(f"no checkpoint in {self.root}")
        return load_checkpoint(path, train_state=train_state, device=device)

    def _prune(self) -> None:
        for path in self.checkpoints()[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        # Temporary directories of a writer that died before its rename; a run directory has a
        # single writer (the job's worker), so nothing else is writing them.
        for path in self.root.glob(".tmp-step-*"):
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(".old-step-*"):
            shutil.rmtree(path, ignore_errors=True)


def step_of(path: str | Path) -> int:
    """The step of a checkpoint directory ``step-000000200`` (200), from its name."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path}: not a checkpoint directory (step-NNNNNNNNN)")
    return int(match.group(1))


def load_checkpoint(
    path: str | Path, *, train_state: bool = True, device: str = "cpu"
) -> Checkpoint:
    """Load a checkpoint directory; only JSON and safetensors are read, nothing is unpickled.

    Args:
        path: a checkpoint directory, or a run directory (its latest checkpoint is loaded).
        train_state: also load the optimizer and RNG states (not needed for inference).
        device: where to put the tensors.

    Raises:
        CheckpointError: missing files, an unknown format or version, inconsistent content.
    """
    path = Path(path)
    if not (path / META_FILE).is_file() and path.is_dir():
        latest = CheckpointStore(path).latest()
        if latest is not None:
            path = latest
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"not a checkpoint (no {META_FILE}): {path}")
    try:
        document = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable {meta_path}: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"not a {FORMAT} document: {meta_path}")
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: expected format_version <= {FORMAT_VERSION}, got {version!r}"
        )
    try:
        config = JobConfig.from_dict(document["config"])
        task_info = TaskInfo.from_dict(document["task"])
        step = int(document["step"])
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{meta_path}: invalid content: {exc}") from None
    model_state = _read_tensors(path / MODEL_FILE, device)
    optimizer_state, rng_state = None, {}
    if train_state:
        tensors = _read_tensors(path / TRAIN_STATE_FILE, device)
        rng_state = {k[4:]: v.cpu() for k, v in tensors.items() if k.startswith("rng.")}
        if document.get("optimizer") is not None:
            optimizer_state = _join_optimizer_state(tensors, document["optimizer"])
    return Checkpoint(
        path=path,
        step=step,
        config=config,
        task_info=task_info,
        metrics=dict(document.get("metrics") or {}),
        model_state=model_state,
        optimizer_state=optimizer_state,
        rng_state=rng_state,
        parameter_counts=dict(document.get("parameter_counts") or {}),
        meta=dict(document.get("meta") or {}),
    )


# -- helpers ---------------------------------------------------------------------------------


def _model_tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    # clone: safetensors refuses tensors that share storage (views, tied weights)
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().to("cpu").clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    indices = [int(i) for i in state_dict["state"]]
    return tensors, {
        "state_indices": indices,
        "state_scalars": scalars,
        "param_groups": state_dict["param_groups"],
    }


def _join_optimizer_state(tensors: dict[str, Tensor], document: dict[str, Any]) -> dict[str, Any]:
    try:
        state: dict[int, dict[str, Any]] = {int(i): {} for i in document["state_indices"]}
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                state[int(index)][key] = value
        for index, values in document["state_scalars"].items():
            state[int(index)].update(values)
        return {"state": state, "param_groups": document["param_groups"]}
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"inconsistent optimizer state: {exc}") from None


def _write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    _fsync_file(path)


def _read_tensors(path: Path, device: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"unreadable {path}: {exc}") from None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_json(path: Path, document: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_finite(document), f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # some filesystems cannot fsync a directory; the rename is atomic all the same
    with contextlib.suppress(OSError):
        _fsync_file(path)


def _replace_dir(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
