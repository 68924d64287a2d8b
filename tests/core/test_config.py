"""The job config refuses what the model would refuse, naming the field (before any job runs)."""

import pytest

from kru_core.config import ConfigError, JobConfig


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
        {"hidden_size": 411, "factors": [3, 137]},
        {"hidden_size": 12, "factors": [[3, 4], [4, 3]]},
        {"cell": "kru_lstm", "hidden_size": 45, "factors": [3, 3, 5], "complex": False},
    ],
)
def test_good_model_sections_round_trip(model: dict) -> None:
    cfg = JobConfig.from_dict({"model": model})
    assert JobConfig.from_dict(cfg.to_dict()) == cfg
