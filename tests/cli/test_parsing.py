"""Command-line values: lists, ranges and KEY=VALUE pairs."""

import pytest

from actvar_cli.cli.parsing import parse_float_list, parse_int_list, parse_set
from actvar_cli.errors import ConfigError


def test_int_lists_and_ranges():
    assert parse_int_list("0,7,42", "--classes") == [0, 7, 42]
    assert parse_int_list("3-5,9", "--classes") == [3, 4, 5, 9]
    for bad in ("1,,2", "a", "5-3", ""):
        with pytest.raises(ConfigError, match="not a list of integers"):
            parse_int_list(bad, "--classes")
    assert parse_float_list("0.5,0.75", "--token-rates") == [0.5, 0.75]
    with pytest.raises(ConfigError):
        parse_float_list("0.5,", "--token-rates")


def test_set_pairs_are_read_as_yaml():
    assert parse_set(["teacher_top_k=600", "betas=[0.9, 0.99]", "data=teacher"]) == {
        "teacher_top_k": 600,
        "betas": [0.9, 0.99],
        "data": "teacher",
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["lr"])
