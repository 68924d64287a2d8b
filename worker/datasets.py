"""Dataset uploads: validated with ``kru_core``'s inspection, stored under their own id.

A file lives at ``datasets_dir / f"{id}.jsonl"`` or ``f"{id}.txt"``; the client's file name is
kept for display only and never touches a path.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Any

from kru_core.errors import DatasetError
from worker.context import Context
from worker.errors import Invalid
from worker.models import Dataset, utcnow

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
    if not re.fullmatch(r"[0-9a-f]{32}", dataset_id):
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


def store_upload(ctx: Context, filename: str, content: bytes, kind: str | None) -> Dataset:
    """Validate ``content`` and register it; raise ``Invalid`` with nothing stored."""
    kind = kind or infer_kind(filename)
    if kind not in DATASET_KINDS:
        raise Invalid("kind", f"expected one of {list(DATASET_KINDS)}, got {kind!r}")
    limit = ctx.settings.max_upload_bytes
    if not content:
        raise Invalid("file", "the file is empty")
    if len(content) > limit:
        raise Invalid("file", f"expected at most {limit} bytes, got {len(content)}")
    dataset_id = uuid.uuid4().hex
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
            sha256=hashlib.sha256(content).hexdigest(),
            summary=summary,
            created_at=utcnow(),
        )
        with ctx.store.writing() as db:
            db.add(row)
    except BaseException:
        partial.unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        raise
    return row


def _inspect(path: Path, kind: str) -> dict[str, Any]:
    from kru_core.tasks.datasets import inspect_dataset
    from kru_core.tasks.text import inspect_text

    try:
        return inspect_dataset(path) if kind == "jsonl" else inspect_text(path)
    except DatasetError as exc:
        raise Invalid("file", str(exc), errors=exc.errors) from None
