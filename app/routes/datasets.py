"""``/v1/datasets``: upload (multipart), list and describe datasets."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Security, UploadFile

from app.auth import bearer_scheme
from app.deps import DatasetId
from app.schemas import Dataset, DatasetList, PageQuery, error_responses
from worker import service

router = APIRouter(
    prefix="/datasets",
    tags=["datasets"],
    dependencies=[Security(bearer_scheme)],
    responses=error_responses(401, 403),
)


@router.post("", status_code=201, response_model=Dataset, responses=error_responses(413, 422))
def upload_dataset(
    file: Annotated[
        UploadFile,
        File(description="JSONL (one {'input': [...], 'target': ...} a line) or UTF-8 text"),
    ],
    kind: Annotated[
        Literal["jsonl", "text"] | None,
        Form(description="jsonl or text; default: from the file name (.jsonl/.json: jsonl)"),
    ] = None,
) -> Dataset:
    """Upload a dataset file (multipart field ``file``); it is validated, then stored."""
    content = file.file.read()
    view = service.create_dataset(file.filename or "", content, kind=kind)
    return Dataset.model_validate(view)


@router.get("", response_model=DatasetList, responses=error_responses(422))
def list_datasets(query: Annotated[PageQuery, Query()]) -> DatasetList:
    """List uploaded datasets, newest first."""
    return DatasetList.model_validate(service.list_datasets(limit=query.limit, offset=query.offset))


@router.get("/{dataset_id}", response_model=Dataset, responses=error_responses(404))
def get_dataset(dataset_id: DatasetId) -> Dataset:
    """Describe a dataset: kind, size, checksum and what validation found."""
    return Dataset.model_validate(service.get_dataset(dataset_id))
