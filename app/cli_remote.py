"""Remote ``kru`` commands: ``kru jobs ...``, ``kru models ...`` and ``kru sessions ...`` against
a kru API.

They run on top of :mod:`kru_client` (HTTP only; no torch is imported). The server is
``--url``/``--api-key``, or the ``KRU_URL``/``KRU_API_KEY`` settings (:class:`RemoteSettings`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings, SettingsConfigDict


class RemoteSettings(BaseSettings):
    """Where the remote commands send their requests (``KRU_URL``, ``KRU_API_KEY``)."""

    model_config = SettingsConfigDict(env_prefix="KRU_", extra="ignore")

    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None


def _add_remote_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="the API (default: KRU_URL, else http://127.0.0.1:8000)")
    p.add_argument("--api-key", help="bearer key (default: KRU_API_KEY)")


def _client(args: argparse.Namespace) -> Any:
    try:
        from kru_client import Client
    except ImportError as exc:  # httpx: a dependency of the client, not of the server
        raise SystemExit(
            f"kru {args.command}: needs the client (pip install 'kru[client]'): {exc}"
        ) from None
    settings = RemoteSettings()
    return Client(args.url or settings.url, api_key=args.api_key or settings.api_key)


def _remote(run: Any) -> Any:
    """Run a remote command; an API error is printed (status, detail, field), exit code 1."""

    def wrapped(args: argparse.Namespace) -> int:
        from kru_client import KruApiError

        try:
            return run(args)
        except KruApiError as exc:
            where = f" (field {exc.field})" if exc.field else ""
            status = f"{exc.status} " if exc.status else ""
            print(f"kru {args.command}: error: {status}{exc.detail}{where}", file=sys.stderr)
            return 1

    return wrapped


def _actions(handler: Any, *parsers: argparse.ArgumentParser) -> None:
    """Give each action's parser the remote arguments and ``handler``."""
    for q in parsers:
        _add_remote_arguments(q)
        q.set_defaults(handler=handler)


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _read_json(path: Path) -> Any:
    text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    return json.loads(text)


def add_jobs(subparsers: argparse._SubParsersAction) -> None:
    """Register ``kru jobs submit|list|watch|cancel``."""
    p = subparsers.add_parser("jobs", help="training jobs on a kru API (remote)")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    submit = sub.add_parser("submit", help="submit a job config (JSON file)")
    submit.add_argument("config", type=Path, metavar="CONFIG.json")
    submit.add_argument("--name", help="the job's name")
    listing = sub.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--status", help="only jobs with this status")
    watch = sub.add_parser("watch", help="follow a job: progress bar and latest metrics")
    watch.add_argument("job_id", metavar="ID")
    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id", metavar="ID")
    _actions(run_jobs, submit, listing, watch, cancel)


@_remote
def run_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "submit":
            job = client.submit_job(_read_json(args.config), name=args.name)
            _print(job.model_dump(mode="json"))
        elif args.action == "list":
            for job in client.list_jobs(status=args.status):
                step = f"{job.progress.step}/{job.progress.total_steps}"
                print(f"{job.id}  {job.status:<9}  {step:>13}  {job.name or ''}")
        elif args.action == "watch":
            return _watch(client, args.job_id)
        else:
            _print(client.cancel(args.job_id).model_dump(mode="json"))
    return 0


def _watch(client: Any, job_id: str) -> int:
    tty = sys.stderr.isatty()
    line = ""
    final = None
    for event in client.events(job_id):
        data = event.data
        if event.event == "progress":
            total = max(1, int(data.get("total_steps", 1)))
            step = int(data.get("step", 0))
            filled = int(24 * step / total)
            metrics = "  ".join(f"{k} {v:.4g}" for k, v in sorted(data.get("metrics", {}).items()))
            line = f"step {step}/{total}  [{'#' * filled}{'-' * (24 - filled)}]  {metrics}"
        elif event.event == "status":
            line = f"status {data.get('status')}"
        elif event.event == "end":
            final = event.job
        sys.stderr.write(("\r" + line) if tty else (line + "\n"))
        sys.stderr.flush()
    if tty:
        sys.stderr.write("\n")
    if final is None:
        return 1
    _print(final.model_dump(mode="json"))
    return 0 if final.status == "succeeded" else 1


def add_models(subparsers: argparse._SubParsersAction) -> None:
    """Register ``kru models list|predict|generate``."""
    p = subparsers.add_parser("models", help="trained models on a kru API (remote)")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = sub.add_parser("list", help="list models, newest first")
    predict = sub.add_parser("predict", help='predict: --input FILE ({"inputs": [...]})')
    predict.add_argument("model_id", metavar="ID")
    predict.add_argument("--input", type=Path, required=True, metavar="FILE", help="- for stdin")
    predict.add_argument("--probabilities", action="store_true")
    generate = sub.add_parser("generate", help="generate text from a text model")
    generate.add_argument("model_id", metavar="ID")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=100)
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--seed", type=int)
    _actions(run_models, listing, predict, generate)


@_remote
def run_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "list":
            for model in client.list_models():
                metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(model.metrics.items()))
                print(f"{model.id}  {model.name or ''}  {metrics}")
        elif args.action == "predict":
            body = _read_json(args.input)
            result = client.predict(args.model_id, body["inputs"], args.probabilities)
            print(json.dumps(result.model_dump(exclude_none=True)))
        else:
            result = client.generate(
                args.model_id,
                args.prompt,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                seed=args.seed,
            )
            print(json.dumps(result.model_dump()))
    return 0


def add_sessions(subparsers: argparse._SubParsersAction) -> None:
    """Register ``kru sessions stream|show|delete``."""
    p = subparsers.add_parser(
        "sessions",
        help="streaming sessions on a kru API (remote): a sequence sent chunk by chunk",
        description="Stream a sequence to a model chunk by chunk, its hidden state kept by the "
        "API between chunks (POST /v1/models/{id}/sessions, docs/api.md 'Streaming sessions').",
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    stream = sub.add_parser(
        "stream",
        help="read chunks from --input (one JSON chunk a line, or - for stdin) and print each "
        "chunk's predictions as it comes",
    )
    stream.add_argument("model_id", metavar="MODEL_ID")
    stream.add_argument(
        "--input", type=Path, default=Path("-"), metavar="FILE", help="- (default) for stdin"
    )
    stream.add_argument(
        "--session",
        metavar="SESSION_ID",
        help="continue this open session from its position (default: open a new one)",
    )
    stream.add_argument("--ttl", type=float, help="idle seconds a new session lives")
    stream.add_argument(
        "--keep", action="store_true", help="leave the session open at the end (default: delete)"
    )
    show = sub.add_parser("show", help="a session's position and expiry")
    show.add_argument("session_id", metavar="SESSION_ID")
    delete = sub.add_parser("delete", help="close a session")
    delete.add_argument("session_id", metavar="SESSION_ID")
    _actions(run_sessions, stream, show, delete)


def _chunks(path: Path) -> Any:
    """The chunks of ``path`` (or stdin), one JSON value a line, read as they arrive."""
    lines = sys.stdin if str(path) == "-" else path.open(encoding="utf-8")
    try:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"kru sessions: line {number}: not JSON: {exc}") from None
    finally:
        if lines is not sys.stdin:
            lines.close()


@_remote
def run_sessions(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "show":
            _print(client.get_session(args.session_id).info())
            return 0
        if args.action == "delete":
            client.get_session(args.session_id).close()
            return 0
        if args.session:
            session = client.get_session(args.session)
            if session.model_id != args.model_id:
                raise SystemExit(
                    f"kru sessions: session {args.session} is on model {session.model_id}, "
                    f"not {args.model_id}"
                )
        else:
            session = client.session(args.model_id, ttl_seconds=args.ttl)
        print(json.dumps({"session_id": session.id, "position": session.position}), flush=True)
        try:
            for chunk in _chunks(args.input):
                predictions = session.predict(chunk)
                print(json.dumps({"position": session.position, "predictions": predictions}),
                      flush=True)  # fmt: skip
        except BaseException:  # the state is kept: the stream can go on where it stopped
            print(f"kru sessions: session {session.id} is left open at position "
                  f"{session.position}; continue with --session {session.id}",
                  file=sys.stderr)  # fmt: skip
            raise
        if not args.keep:
            session.close()
    return 0
