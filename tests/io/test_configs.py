"""Config dataclasses from mappings: unknown keys and wrong types name the key and value."""

import pytest

from rectdiff.io.configs import check_types
from rectdiff.rectify.student import RectifyConfig
from rectdiff.training import TrainConfig


@pytest.mark.parametrize(
    "values, pattern",
    [
        ({"steps": 1.5}, r"training option steps = 1.5 has type float; expected int"),
        ({"steps": True}, r"steps = True has type bool; expected int"),
        ({"lr": "fast"}, r"lr = 'fast' has type str; expected float"),
        ({"huber_c": "0.1"}, r"huber_c = '0.1' has type str; expected float \| None"),
        ({"weighting_params": 3}, r"weighting_params = 3 has type int; expected dict\[str, Any\]"),
    ],
)
def test_wrong_types_name_key_value_type_and_expected_type(values, pattern):
    with pytest.raises(ValueError, match=pattern):
        TrainConfig.from_dict(values)


def test_right_types_pass_and_unchecked_annotations_are_left_alone():
    config = TrainConfig.from_dict(
        {"steps": 10, "lr": 1, "huber_c": None, "time_sampler": "uniform"}
    )
    assert config.steps == 10 and config.lr == 1
    check_types(RectifyConfig, {"train": TrainConfig(), "num_pairs": 4})  # an object field
    with pytest.raises(ValueError, match=r"num_pairs = 4.0 has type float; expected int"):
        RectifyConfig.from_dict({"num_pairs": 4.0})
