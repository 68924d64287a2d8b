"""Running one delivery of a job in a worker: claim, train (resuming), report, end.

The Celery task (:mod:`worker.tasks`) is a thin call to :func:`run_job`. While a job trains, a
heartbeat thread refreshes its heartbeat every ``heartbeat_interval`` seconds (so a slow step
never looks like a dead worker) and reads its cancel flag; the training loop's ``should_stop``
only reads in-memory flags.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from kru_core.config import ConfigError, JobConfig
from worker import admission, jobs, quotas, retention
from worker.datasets import dataset_file
from worker.ids import new_id
from worker.jobs import Claim
from worker.models import Model, utcnow

if TYPE_CHECKING:
    from kru_core.training import Progress, TrainResult
    from worker.context import Context

logger = logging.getLogger(__name__)

#: Set when the worker process starts a warm shutdown (SIGTERM, first Ctrl-C): the running job
#: stops at its next step, checkpoints and goes back to the queue.
shutdown_requested = threading.Event()

WORKER_NAME = f"{socket.gethostname()}:{os.getpid()}"


class Activity:
    """Whether this process is running a delivery, and since when it is idle (monotonic); the
    consume watchdog (:mod:`worker.watchdog`) reads it under :attr:`lock`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy = False
        self.idle_since = time.monotonic()
        #: The job of the delivery being run (the worker registry reports it).
        self.job_id: str | None = None

    def begin(self, job_id: str | None = None) -> None:
        with self.lock:
            self.busy = True
            self.job_id = job_id

    def end(self) -> None:
        with self.lock:
            self.busy = False
            self.job_id = None
            self.idle_since = time.monotonic()


#: This worker process's activity (one delivery at a time: ``--pool solo``).
activity = Activity()


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


#: Progress writes kept while the store is down (beyond them, the newest are dropped).
MAX_PENDING_WRITES = 10_000

#: How long the end of a job (its status, its model) is retried while the store is down.
END_RETRY_S = 120.0


def _retrying(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, retried every second for up to :data:`END_RETRY_S` while the
    store cannot be reached (a database restart at the end of a job loses nothing)."""
    deadline = time.monotonic() + END_RETRY_S
    while True:
        try:
            return fn(*args, **kwargs)
        except SQLAlchemyError as exc:
            if time.monotonic() > deadline:
                raise
            logger.warning("%s failed, retrying: %s", what, exc)
            time.sleep(1.0)


#: Progress writes sent in one transaction at most.
WRITE_BATCH = 500


class ProgressReporter:
    """``on_progress`` for :func:`kru_core.training.train`: throttled writes of step, metrics,
    metric history and events.

    Training metrics are recorded every :attr:`log_every` steps (``train.log_every``), and at
    any step when nothing was written for ``progress_interval`` seconds; evaluations and
    checkpoints always. Recorded points are written at most every ``progress_interval`` seconds,
    in one transaction (and at once for evaluations, checkpoints and the last step).
    """

    def __init__(self, ctx: Context, claim: Claim, *, log_every: int = 1) -> None:
        self.ctx = ctx
        self.claim = claim
        self.log_every = log_every
        self.metrics: dict[str, float] = dict(claim.metrics)
        self._last_write = 0.0
        self.lost = False
        #: Recorded writes not yet in the store (throttled, or the store was down), oldest first.
        self.pending: list[dict[str, Any]] = []

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        last = progress.step >= progress.total_steps
        due = now - self._last_write >= self.ctx.settings.progress_interval
        if progress.kind == "train" and not last:
            logged = progress.step % self.log_every == 0
            if not logged and (self.pending or not due):
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
        write = {
            "step": progress.step,
            "total_steps": progress.total_steps,
            "metrics": dict(self.metrics),
            "phase": progress.kind,
            "point": point if progress.kind in ("train", "eval") and point else None,
            "event": event,
        }
        if len(self.pending) < MAX_PENDING_WRITES:
            self.pending.append(write)
        if progress.kind == "train" and not last and not due:
            return
        self._last_write = now
        self.flush()

    def flush(self) -> bool:
        """Write the pending progress, oldest first; True when none is left. A write that
        fails (the store is down) stays pending for the next call: nothing is lost to an
        outage shorter than the job."""
        while self.pending:
            batch = self.pending[:WRITE_BATCH]
            try:
                ok = jobs.report_progress(self.ctx.store, self.claim, batch)
            except Exception as exc:  # the heartbeat thread keeps the claim; retried later
                logger.warning(
                    "job %s: progress write failed (%d pending): %s",
                    self.claim.job_id,
                    len(self.pending),
                    exc,
                )
                return False
            del self.pending[: len(batch)]
            if not ok:
                self.lost = True
                self.pending.clear()
        return True


def run_job(ctx: Context, job_id: str) -> None:
    """Claim the job and run it to an end, or do nothing if it cannot be claimed."""
    activity.begin(job_id)
    try:
        _run_job(ctx, job_id)
    finally:
        activity.end()


def _run_job(ctx: Context, job_id: str) -> None:
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
    try:  # the job left the broker: its key's next held job may take its place
        quotas.publish_next(ctx, job_id)
    except Exception as exc:  # the reaper publishes it later
        logger.warning("job %s: publishing its key's next job failed: %s", job_id, exc)
    heartbeat = Heartbeat(ctx, claim)
    heartbeat.start()
    try:
        _train(ctx, claim, heartbeat)
    finally:
        heartbeat.stop()
    try:  # a job that ended keeps its last checkpoint and its model's (worker.retention)
        retention.prune_checkpoints(ctx, claim)
    except Exception as exc:
        logger.warning("job %s: removing older checkpoints failed: %s", job_id, exc)


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
        reporter.log_every = config.train.log_interval()
        dataset_path = _dataset_path(ctx, config)
        # torch is imported when a job runs, not when the API imports this module.
        from kru_core.checkpoint import CheckpointStore
        from kru_core.training import train

        resumed_from = CheckpointStore(out_dir).latest_step()
        if resumed_from:
            jobs.note(
                ctx.store,
                claim,
                {"status": "running", "attempt": claim.attempt, "resumed_from_step": resumed_from},
            )

        device = None if settings.device == "auto" else settings.device
        budget = admission.job_memory_budget(settings)
        limit = admission.memory_limit(budget) if _on_cpu(device or config.train.device) else None
        with limit or contextlib.nullcontext():
            result = train(
                config,
                out_dir=out_dir,
                dataset_path=dataset_path,
                on_progress=reporter,
                should_stop=should_stop,
                resume=True,
                device=device,
            )
    except (KruError, ConfigError, _JobInputError) as exc:
        _fail(ctx, claim, str(exc) or type(exc).__name__)
        return
    except Exception as exc:
        if admission.is_allocation_failure(exc):
            gc.collect()  # the failed run's tensors, before anything else allocates
            _fail(
                ctx,
                claim,
                f"out of memory: the job needed more than this worker allows "
                f"({budget / 2**30:.3g} GiB for a job, KRU_MAX_JOB_MEMORY_BYTES): "
                f"{_first_line(exc) if str(exc) else type(exc).__name__}",
            )
            return
        logger.exception("job %s: training raised", claim.job_id)
        _fail(ctx, claim, f"internal error: {type(exc).__name__}: {_first_line(exc)}")
        return
    if heartbeat.lost.is_set() or reporter.lost:
        return
    _retrying(f"job {claim.job_id}: progress write", _flushed, reporter)
    if reporter.lost:
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
    result: TrainResult,
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
    if result.status == "timeout":
        error = timeout_error(config, ctx.settings.max_job_seconds, result.step)
        if error is not None:
            _fail(ctx, claim, error)
            return
    model = _model_row(ctx, claim, result)
    _retrying(
        f"job {claim.job_id}: recording its end",
        jobs.finish,
        ctx.store,
        claim,
        "succeeded",
        model=model,
        step=result.step,
        metrics=metrics,
    )
    logger.info("job %s: succeeded at step %d, model %s", claim.job_id, result.step, model.id)


def timeout_error(config: JobConfig, max_job_seconds: float, step: int) -> str | None:
    """Why a run stopped by a wall-clock limit ends ``failed`` (no model registered), or None
    when it ends ``succeeded``: only a run stopped by its own ``train.max_seconds`` after at
    least one step with ``train.keep_model_on_timeout``. ``config`` is the limited config the
    run had (:func:`_limited`)."""
    limit = config.train.max_seconds or max_job_seconds
    steps = config.train.steps
    if limit >= max_job_seconds:
        return (
            f"timed out: stopped at step {step} of {steps}: the job ran past the server's "
            f"wall-clock limit of {max_job_seconds:g} s (KRU_MAX_JOB_SECONDS); no model "
            "registered"
        )
    if config.train.keep_model_on_timeout and step > 0:
        return None
    return (
        f"timed out: stopped at step {step} of {steps} by train.max_seconds ({limit:g} s); no "
        "model registered (train.keep_model_on_timeout: true keeps the model of a run that "
        "made progress)"
    )


def _fail(ctx: Context, claim: Claim, error: str) -> None:
    logger.warning("job %s: failed: %s", claim.job_id, error)
    _retrying(
        f"job {claim.job_id}: recording its end",
        jobs.finish,
        ctx.store,
        claim,
        "failed",
        error=error[:4000],
    )


def _flushed(reporter: ProgressReporter) -> None:
    if not reporter.flush():
        raise _StoreDown("progress writes still pending")


class _StoreDown(SQLAlchemyError):
    """Pending progress could not be written yet (retried by :func:`_retrying`)."""


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


def _cancel_requested(ctx: Context, claim: Claim) -> bool:
    return bool(jobs.heartbeat(ctx.store, claim))


def _model_row(ctx: Context, claim: Claim, result: TrainResult) -> Model:
    checkpoint = Path(result.checkpoint)
    info = result.task_info.to_dict()
    try:
        stored = str(checkpoint.resolve().relative_to(ctx.settings.data_dir))
    except ValueError:
        stored = str(checkpoint.resolve())
    config = claim.config
    return Model(
        id=new_id(),
        job_id=claim.job_id,
        name=config.get("name"),
        config=config,
        task=info,
        metrics={k: float(v) for k, v in result.metrics.items()},
        parameter_counts={k: int(v) for k, v in result.parameter_counts.items()},
        checkpoint=stored,
        created_at=utcnow(),
    )


def _on_cpu(device: str) -> bool:
    """Whether a job on ``device`` (``auto``, ``cpu``, ``cuda...``) trains on the CPU."""
    if device == "auto":
        import torch

        return not torch.cuda.is_available()
    return device == "cpu"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__
