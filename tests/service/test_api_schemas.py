"""The request schemas mirror kru_core's config: same fields, same defaults, same answers."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import BaseModel, ValidationError

from app.schemas import COPY_JOB_EXAMPLE, JobSpec, ModelSpec, TaskSpec, TrainSpec
from kru_core.config import ConfigError, JobConfig, ModelConfig, TaskConfig, TrainConfig


@pytest.mark.parametrize(
    ("spec", "config"),
    [
        (TaskSpec, TaskConfig),
        (ModelSpec, ModelConfig),
        (TrainSpec, TrainConfig),
        (JobSpec, JobConfig),
    ],
)
def test_same_fields_and_defaults(spec: type[BaseModel], config: type) -> None:
    fields = {f.name: f for f in dataclasses.fields(config)}
    assert set(spec.model_fields) == set(fields)
    defaults = spec().model_dump()
    for name, field in fields.items():
        if field.default is not dataclasses.MISSING:
            assert defaults[name] == field.default, name


def test_defaults_give_kru_core_defaults() -> None:
    assert JobSpec().to_job_config() == JobConfig()
    assert JobSpec.model_validate(COPY_JOB_EXAMPLE).to_job_config() == JobConfig.from_dict(
        COPY_JOB_EXAMPLE
    )


@pytest.mark.parametrize(
    "data",
    [
        {"model": {"hidden_size": 32, "factors": [[2, 4], [4, 2], 4]}, "train": {"factor_lr": 0.5}},
        {"model": {"cell": "lstm", "hidden_size": 64}, "train": {"lr_schedule": "cosine"}},
        {"task": {"kind": "text", "dataset_id": "ab" * 16, "seq_len": 50}, "name": "t"},
        {"train": {"steps": 10.0, "seed": 3.0}},  # JSON integers written as 10.0
    ],
)
def test_what_the_schema_accepts_kru_core_accepts(data: dict) -> None:
    config = JobSpec.model_validate(data).to_job_config()
    assert JobConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "data",
    [
        {"train": {"lr": 0}},
        {"train": {"lr": 11}},
        {"train": {"steps": 0}},
        {"train": {"batch_size": 4097}},
        {"model": {"hidden_size": 8193}},
        {"task": {"delay": 0}},
        {"task": {"length": 1}},
        {"train": {"unitary_penalty": -1}},
        {"train": {"device": "cuda:x"}},
        {"train": {"lr_schedule": "linear"}},
        {"model": {"factors": []}},
        {"model": {"factors": [0]}},
    ],
)
def test_ranges_match(data: dict) -> None:
    """Out of range for the schema is out of range for kru_core too (and the reverse)."""
    with pytest.raises(ValidationError):
        JobSpec.model_validate(data)
    with pytest.raises(ConfigError):
        JobConfig.from_dict(data)


def test_every_config_range_is_in_the_openapi() -> None:
    """Each bound of kru_core's RANGES is what the docs show (the seed narrowed to JSON's)."""
    from app.main import create_app
    from app.schemas import MAX_JSON_INT
    from kru_core.config import RANGES

    components = create_app().openapi()["components"]["schemas"]
    names = {"task": "TaskSpec", "model": "ModelSpec", "train": "TrainSpec"}
    keys = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum"}
    for path, bounds in RANGES.items():
        section, field = path.split(".")
        prop = components[names[section]]["properties"][field]
        shown = (
            prop
            if "anyOf" not in prop
            else next(p for p in prop["anyOf"] if "type" in p and p["type"] != "null")
        )
        expected = {keys[k]: v for k, v in bounds.bounds().items()}
        if path == "train.seed":
            expected["maximum"] = MAX_JSON_INT
        assert {k: shown[k] for k in expected if k in shown} == expected, path
