"""Running one delivery of a job in a worker: claim, train (resuming), report, end.

The Celery task (:mod:`worker.tasks`) is a thin call to :func:`run_job`. While a job trains, a
heartbeat thread refreshes its heartbeat every ``heartbeat_interval`` seconds (so a slow step
never looks like a dead worker) and reads its cancel flag; the training loop's ``should_stop``
only reads in-memory flags.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from kru_core.config import ConfigError, JobConfig
from worker import jobs
from worker.context import Context
from worker.datasets import dataset_file
from worker.jobs import Claim
from worker.models import Model, utcnow

logger = logging.getLogger(__name__)

#: Set when the worker process starts a warm shutdown (SIGTERM, first Ctrl-C): the running job
#: stops at its next step, checkpoints and goes back to the queue.
shutdown_requested = threading.Event()

WORKER_NAME = f"{socket.gethostname()}:{os.getpid()}"


class StoreUnavailable(Exception):
    """The job store could not be reached to claim a job; the message must not be dropped."""


class Heartbeat(threading.Thread):
    """Refreshes a claim's heartbeat and watches its cancel flag until :meth:`stop`."""

    def __init__(self, ctx: Context, claim: Claim) -> None:
        super().__init__(name=f"heartbeat-{claim.job_id[:8]}", daemon=True)
        self.ctx = ctx
        self.claim = claim
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.ctx.settings.heartbeat_interval):
            try:
                cancel = jobs.heartbeat(self.ctx.store, self.claim)
            except Exception as exc:  # the database may come back; the reaper decides
                logger.warning("job %s: heartbeat failed: %s", self.claim.job_id, exc)
                continue
            if cancel is None:
                logger.warning("job %s: claim lost (reaped); stopping", self.claim.job_id)
                self.lost.set()
                return
            if cancel:
                self.cancelled.set()

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=5)


class ProgressReporter:
    """``on_progress`` for :func:`kru_core.training.train`: throttled writes of step, metrics,
    metric history and events. Evaluations are always recorded; training steps at most every
    ``progress_interval`` seconds (and the last one)."""

    def __init__(self, ctx: Context, claim: Claim) -> None:
        self.ctx = ctx
        self.claim = claim
        self.metrics: dict[str, float] = dict(claim.metrics)
        self._last_write = 0.0
        self.lost = False

    def __call__(self, progress: Any) -> None:
        now = time.monotonic()
        last = progress.step >= progress.total_steps
        throttled = now - self._last_write < self.ctx.settings.progress_interval
        if progress.kind == "train" and not last and throttled:
            return
        point = {k: float(v) for k, v in progress.metrics.items()}
        self.metrics.update(point)
        fraction = min(1.0, progress.step / max(1, progress.total_steps))
        event = {
            "step": progress.step,
            "total_steps": progress.total_steps,
            "fraction": fraction,
            "metrics": point,
            "phase": progress.kind,
        }
        try:
            ok = jobs.report_progress(
                self.ctx.store,
                self.claim,
                step=progress.step,
                total_steps=progress.total_steps,
                metrics=self.metrics,
                phase=progress.kind,
                point=point if progress.kind in ("train", "eval") and point else None,
                event=event,
            )
        except Exception as exc:  # progress is best effort; the heartbeat thread keeps the claim
            logger.warning("job %s: progress write failed: %s", self.claim.job_id, exc)
            return
        self._last_write = now
        if not ok:
            self.lost = True


def run_job(ctx: Context, job_id: str) -> None:
    """Claim the job and run it to an end, or do nothing if it cannot be claimed."""
    settings = ctx.settings
    stale_before = jobs.stale_cutoff(settings.heartbeat_timeout)
    try:
        claim = jobs.claim(
            ctx.store,
            job_id,
            worker=WORKER_NAME,
            max_attempts=settings.max_attempts,
            stale_before=stale_before,
        )
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"job {job_id}: cannot claim it: {exc}") from exc
    if claim is None:
        logger.info("job %s: not claimable (held by a live worker, finished or unknown)", job_id)
        return
    logger.info("job %s: attempt %d on %s", job_id, claim.attempt, WORKER_NAME)
    heartbeat = Heartbeat(ctx, claim)
    heartbeat.start()
    try:
        _train(ctx, claim, heartbeat)
    finally:
        heartbeat.stop()


def _train(ctx: Context, claim: Claim, heartbeat: Heartbeat) -> None:
    from kru_core.errors import KruError

    settings = ctx.settings
    out_dir = settings.jobs_dir / claim.job_id
    reporter = ProgressReporter(ctx, claim)

    def should_stop() -> bool:
        return (
            heartbeat.cancelled.is_set()
            or heartbeat.lost.is_set()
            or reporter.lost
            or shutdown_requested.is_set()
        )

    try:
        config = _limited(JobConfig.from_dict(claim.config), settings.max_job_seconds)
        dataset_path = _dataset_path(ctx, config)
        resumed_from = _latest_step(out_dir)
        if resumed_from:
            jobs.note(
                ctx.store,
                claim,
                {"status": "running", "attempt": claim.attempt, "resumed_from_step": resumed_from},
            )
        from kru_core.training import train

        result = train(
            config,
            out_dir=out_dir,
            dataset_path=dataset_path,
            on_progress=reporter,
            should_stop=should_stop,
            resume=True,
            device=None if settings.device == "auto" else settings.device,
        )
    except (KruError, ConfigError, _JobInputError) as exc:
        _fail(ctx, claim, str(exc) or type(exc).__name__)
        return
    except MemoryError as exc:
        _fail(ctx, claim, f"out of memory: {exc}".rstrip(": "))
        return
    except Exception as exc:
        if _is_out_of_memory(exc):
            _fail(ctx, claim, f"out of memory: {_first_line(exc)}")
            return
        logger.exception("job %s: training raised", claim.job_id)
        _fail(ctx, claim, f"internal error: {type(exc).__name__}: {_first_line(exc)}")
        return
    if heartbeat.lost.is_set() or reporter.lost:
        return
    try:
        _conclude(ctx, claim, result, heartbeat, config, reporter.metrics)
    except Exception as exc:
        logger.exception("job %s: could not conclude", claim.job_id)
        _fail(
            ctx, claim, f"internal error after training: {type(exc).__name__}: {_first_line(exc)}"
        )


def _conclude(
    ctx: Context,
    claim: Claim,
    result: Any,
    heartbeat: Heartbeat,
    config: JobConfig,
    reported: dict[str, float],
) -> None:
    metrics = {**reported, **{k: float(v) for k, v in result.metrics.items()}}
    if result.status == "stopped":
        if heartbeat.cancelled.is_set() or _cancel_requested(ctx, claim):
            jobs.finish(ctx.store, claim, "cancelled", step=result.step, metrics=metrics)
        elif jobs.release(ctx.store, claim, reason="worker shutting down") and ctx.enqueue(
            claim.job_id
        ):
            jobs.mark_enqueued(ctx.store, claim.job_id)
        return
    if result.status == "timeout" and config.train.max_seconds == ctx.settings.max_job_seconds:
        limit = ctx.settings.max_job_seconds
        _fail(
            ctx,
            claim,
            f"stopped at step {result.step}: the job ran past the server's "
            f"wall-clock limit of {limit:g} s (KRU_MAX_JOB_SECONDS)",
        )
        return
    model = _model_row(ctx, claim, result)
    jobs.finish(ctx.store, claim, "succeeded", model=model, step=result.step, metrics=metrics)
    logger.info("job %s: succeeded at step %d, model %s", claim.job_id, result.step, model.id)


def _fail(ctx: Context, claim: Claim, error: str) -> None:
    logger.warning("job %s: failed: %s", claim.job_id, error)
    jobs.finish(ctx.store, claim, "failed", error=error[:4000])


class _JobInputError(Exception):
    """The job refers to something that is gone (e.g. its dataset)."""


def _limited(config: JobConfig, max_job_seconds: float) -> JobConfig:
    # --pool solo has no Celery time limits: the wall-clock limit is enforced in the loop.
    own = config.train.max_seconds
    if own is not None and own < max_job_seconds:
        return config
    return config.replace(train={"max_seconds": float(max_job_seconds)})


def _dataset_path(ctx: Context, config: JobConfig) -> Path | None:
    if config.task.kind not in ("dataset", "text") or config.task.dataset_id is None:
        return None
    path = dataset_file(ctx, config.task.dataset_id)
    if path is None:
        raise _JobInputError(f"dataset {config.task.dataset_id!r} not found")
    return path


def _latest_step(out_dir: Path) -> int:
    from kru_core.checkpoint import CheckpointStore

    latest = CheckpointStore(out_dir).latest() if out_dir.exists() else None
    if latest is None:
        return 0
    digits = "".join(ch for ch in Path(latest).name if ch.isdigit())
    return int(digits) if digits else 0


def _cancel_requested(ctx: Context, claim: Claim) -> bool:
    return bool(jobs.heartbeat(ctx.store, claim))


def _model_row(ctx: Context, claim: Claim, result: Any) -> Model:
    from kru_core.checkpoint import load_checkpoint

    checkpoint = Path(result.checkpoint)
    info = load_checkpoint(checkpoint, train_state=False).task_info.to_dict()
    try:
        stored = str(checkpoint.resolve().relative_to(ctx.settings.data_dir))
    except ValueError:
        stored = str(checkpoint.resolve())
    config = claim.config
    return Model(
        id=uuid.uuid4().hex,
        job_id=claim.job_id,
        name=config.get("name"),
        config=config,
        task=info,
        metrics={k: float(v) for k, v in result.metrics.items()},
        parameter_counts={k: int(v) for k, v in result.parameter_counts.items()},
        checkpoint=stored,
        created_at=utcnow(),
    )


def _is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__
