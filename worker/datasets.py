"""Dataset uploads: validated with ``kru_core``'s inspection, stored under their own id.

A file lives at ``datasets_dir / f"{id}.jsonl"`` or ``f"{id}.txt"``; the client's file name is
kept for display only and never touches a path.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select

from kru_core.errors import DatasetError
from worker import quotas
from worker.errors import Conflict, InsufficientStorage, Invalid, NotFound
from worker.ids import is_id, new_id
from worker.models import OPEN_OWNER, Dataset, Job, utcnow

if TYPE_CHECKING:
    from worker.context import Context

DATASET_KINDS = ("jsonl", "text")
_SUFFIX = {"jsonl": ".jsonl", "text": ".txt"}
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def infer_kind(filename: str) -> str:
    """``jsonl`` for ``.jsonl``, ``.json`` and ``.ndjson`` names, else ``text``."""
    return "jsonl" if filename.lower().endswith(_JSONL_SUFFIXES) else "text"


def display_name(filename: str) -> str:
    """The client's file name reduced to a harmless display string (no directories, no control
    characters, at most 255 characters)."""
    base = re.split(r"[/\\]", filename or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip().lstrip(".")
    return base[:255] or "upload"


def path_for(ctx: Context, dataset_id: str, kind: str) -> Path:
    """Where the dataset ``dataset_id`` of ``kind`` is stored."""
    if not is_id(dataset_id):
        raise ValueError(f"not a dataset id: {dataset_id!r}")
    return ctx.settings.datasets_dir / f"{dataset_id}{_SUFFIX[kind]}"


def dataset_file(ctx: Context, dataset_id: str) -> Path | None:
    """The stored file of a registered dataset, or None."""
    with ctx.store.reading() as db:
        row = db.get(Dataset, dataset_id)
    if row is None:
        return None
    path = path_for(ctx, row.id, row.kind)
    return path if path.exists() else None


def store_upload(
    ctx: Context, filename: str, content: bytes, kind: str | None, *, owner: str = OPEN_OWNER
) -> tuple[Dataset, bool]:
    """Validate ``content`` and register it for ``owner``; return the row and True, or the row
    ``owner`` already stored with the same bytes and kind and False (deduplicated by
    SHA-256 per key). Raises ``Invalid``, ``OverQuota`` (the key's dataset storage) or
    ``InsufficientStorage`` (the disk) with nothing stored."""
    kind = kind or infer_kind(filename)
    if kind not in DATASET_KINDS:
        raise Invalid("kind", f"expected one of {list(DATASET_KINDS)}, got {kind!r}")
    limit = ctx.settings.max_upload_bytes
    if not content:
        raise Invalid("file", "the file is empty")
    if len(content) > limit:
        raise Invalid("file", f"expected at most {limit} bytes, got {len(content)}")
    sha256 = hashlib.sha256(content).hexdigest()
    with ctx.store.reading() as db:
        existing = db.scalars(
            select(Dataset)
            .where(Dataset.owner == owner, Dataset.sha256 == sha256, Dataset.kind == kind)
            .limit(1)
        ).first()
    if existing is not None and path_for(ctx, existing.id, kind).exists():
        return existing, False
    _check_utf8(content)
    quotas.check_upload(ctx, owner, len(content))
    _check_free_disk(ctx, len(content))
    dataset_id = new_id()
    final = path_for(ctx, dataset_id, kind)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".{dataset_id}.partial")
    partial.write_bytes(content)
    try:
        summary = _inspect(partial, kind)
        os.replace(partial, final)
        row = Dataset(
            id=dataset_id,
            filename=display_name(filename),
            kind=kind,
            size_bytes=len(content),
            sha256=sha256,
            summary=summary,
            created_at=utcnow(),
            owner=owner,
        )
        with ctx.store.writing() as db:
            db.add(row)
    except BaseException:
        partial.unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        raise
    return row, True


def _check_free_disk(ctx: Context, size: int) -> None:
    """``InsufficientStorage`` when storing ``size`` bytes would leave less than
    ``min_free_disk_bytes`` free where datasets are stored."""
    directory = ctx.settings.datasets_dir
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    wanted = ctx.settings.min_free_disk_bytes
    if free - size < wanted:
        raise InsufficientStorage(
            f"the server's disk is too full to store {size} bytes: {free} bytes free, and "
            f"{wanted} must stay free (KRU_MIN_FREE_DISK_BYTES)"
        )


def jobs_using(ctx: Context, dataset_id: str) -> list[str]:
    """The queued or running jobs that train on ``dataset_id``."""
    query = select(Job.id, Job.config).where(Job.status.in_(("queued", "running")))
    with ctx.store.reading() as db:
        rows = db.execute(query).all()
    return [r.id for r in rows if (r.config.get("task") or {}).get("dataset_id") == dataset_id]


def delete_upload(ctx: Context, dataset_id: str, *, owner: str = OPEN_OWNER) -> None:
    """Delete ``owner``'s dataset ``dataset_id``: its row, then its file.

    ``NotFound`` for an unknown id or another key's dataset; ``Conflict`` while a queued or
    running job trains on it (cancel the job, or wait for it to end). A job submitted just
    after the delete is refused (unknown dataset); one that was queued before is not
    deleted from under: it was checked for here.
    """
    with ctx.store.reading() as db:
        row = db.get(Dataset, dataset_id) if len(dataset_id) <= 64 else None
    if row is None or row.owner != owner:
        raise NotFound(f"dataset {dataset_id!r} not found")
    users = jobs_using(ctx, dataset_id)
    if users:
        raise Conflict(
            f"dataset {dataset_id!r} is used by {len(users)} queued or running job(s) "
            f"({', '.join(users[:5])}); cancel them or wait for them to end"
        )
    with ctx.store.writing() as db:
        db.execute(delete(Dataset).where(Dataset.id == dataset_id))
    path_for(ctx, dataset_id, row.kind).unlink(missing_ok=True)


def _check_utf8(content: bytes) -> None:
    """Refuse bytes that are not UTF-8 text with one error naming the first bad line (a binary
    file would otherwise be thousands of per-line errors)."""
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = content.count(b"\n", 0, exc.start) + 1
        raise Invalid(
            "file",
            f"not UTF-8 text (the first bad byte is on line {line}): upload a JSONL or text file",
            errors=[(line, "not UTF-8 text")],
        ) from None


def _inspect(path: Path, kind: str) -> dict[str, Any]:
    from kru_core.tasks.datasets import inspect_dataset
    from kru_core.tasks.text import inspect_text

    try:
        return inspect_dataset(path) if kind == "jsonl" else inspect_text(path)
    except DatasetError as exc:
        raise Invalid("file", str(exc), errors=exc.errors) from None
