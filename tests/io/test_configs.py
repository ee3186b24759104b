"""Config dataclasses from mappings: unknown keys and wrong types name the key and value."""

import pytest

from rectdiff.io.configs import check_types, merge_tables, read_layered_toml
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


def test_a_layered_toml_is_its_base_with_the_named_keys_replaced(tmp_path):
    """``base = "..."``: tables merge key by key through a chain of bases, every other value
    is replaced, and the paths are relative to the file that names the base."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.toml").write_text(
        'seed = 1\n[train]\nsteps = 10\nlr = 0.5\n[data]\nname = "x"\n'
    )
    (tmp_path / "sub" / "b.toml").write_text('base = "../a.toml"\n[train]\nlr = 0.25\n')
    (tmp_path / "c.toml").write_text('base = "sub/b.toml"\nseed = 2\n[train]\nextra = [1]\n')
    assert read_layered_toml(tmp_path / "c.toml") == {
        "seed": 2, "train": {"steps": 10, "lr": 0.25, "extra": [1]}, "data": {"name": "x"},
    }  # fmt: skip
    assert merge_tables({"t": {"a": 1}}, {"t": 3}) == {"t": 3}  # a table replaced by a value


@pytest.mark.parametrize(
    "text, pattern",
    [
        ('base = "self.toml"\n', r"base 'self.toml' makes a cycle \(.*self.toml -> .*self.toml\)"),
        ('base = "loop.toml"\n', r"base 'self.toml' makes a cycle"),
        ('base = "nope.toml"\n', r"base 'nope.toml' does not exist \(looked for .*nope.toml\)"),
        ("base = 3\n", r"base must be a file name \(a string\), got 3"),
    ],
)
def test_a_bad_base_is_refused_by_name(tmp_path, text, pattern):
    (tmp_path / "self.toml").write_text(text)
    (tmp_path / "loop.toml").write_text('base = "self.toml"\n')
    with pytest.raises(ValueError, match=pattern):
        read_layered_toml(tmp_path / "self.toml")
