"""The job config refuses what the model would refuse, naming the field (before any job runs)."""

import pytest

from kru_core.config import LOG_POINTS, MAX_FACTOR_SIZE, ConfigError, JobConfig


@pytest.mark.parametrize(
    ("model", "field", "fragment"),
    [
        ({"hidden_size": 128, "factors": [2, 2]}, "model.factors", "got 4 x 4"),
        ({"hidden_size": 12, "factors": [[3, 2], [4, 4]]}, "model.factors", "got 12 x 8"),
        ({"hidden_size": 8, "factors": [2, [0, 4]]}, "model.factors.1", "positive"),
        ({"hidden_size": 8, "factors": []}, "model.factors", "non-empty"),
        ({"cell": "lstm", "hidden_size": 8, "factors": [2, 4]}, "model.factors", "dense"),
        ({"hidden_size": 0}, "model.hidden_size", ">= 1"),
        ({"activation": "tanh"}, "model.activation", "real states"),
    ],
)
def test_bad_model_sections_name_the_field(model: dict, field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        JobConfig.from_dict({"model": model})
    assert info.value.field == field
    assert fragment in info.value.message


@pytest.mark.parametrize(
    "model",
    [
        {"hidden_size": 512},
        {"hidden_size": 411, "factors": [3, 137], "allow_dense_factors": True},  # paper's PTB
        {"hidden_size": 12, "factors": [[3, 4], [4, 3]]},
        {"cell": "kru_lstm", "hidden_size": 45, "factors": [3, 3, 5], "complex": False},
    ],
)
def test_good_model_sections_round_trip(model: dict) -> None:
    cfg = JobConfig.from_dict({"model": model})
    assert JobConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("factors", [[8192], [2, 4096], [[2, 4096], [4096, 2]]])
def test_factors_above_the_maximum_need_allow_dense_factors(factors: list) -> None:
    model = {"hidden_size": 8192, "factors": factors}
    with pytest.raises(ConfigError, match=r"model\.factors\.\d") as error:
        JobConfig.from_dict({"model": model})
    assert f"at most {MAX_FACTOR_SIZE}" in error.value.message
    cfg = JobConfig.from_dict({"model": {**model, "allow_dense_factors": True}})
    assert cfg.model.allow_dense_factors


@pytest.mark.parametrize(
    ("steps", "log_every", "interval"),
    [(500, None, 2), (2000, None, 8), (100, None, 1), (1_000_000, None, 4000), (500, 7, 7)],
)
def test_log_interval_gives_about_log_points_a_run(
    steps: int, log_every: int | None, interval: int
) -> None:
    train = JobConfig.from_dict({"train": {"steps": steps, "log_every": log_every}}).train
    assert train.log_interval() == interval
    if log_every is None and steps >= LOG_POINTS:
        assert LOG_POINTS <= steps // interval < 2 * LOG_POINTS


def test_log_every_must_be_a_positive_integer() -> None:
    for bad in (0, -1, 2.5, "3"):
        with pytest.raises(ConfigError) as info:
            JobConfig.from_dict({"train": {"log_every": bad}})
        assert info.value.field == "train.log_every"
