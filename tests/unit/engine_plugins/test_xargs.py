from __future__ import annotations

import math
from typing import Any

import pytest

from engine_plugins.xargs import (
    ArgumentError,
    MirostatArgs,
    parse_mirostat,
    parse_repetition_penalty,
)


def test_mirostat_off_without_target() -> None:
    assert parse_mirostat(None) is None
    assert parse_mirostat({}) is None


def test_mirostat_coerces_loose_types() -> None:
    assert parse_mirostat({"mirostat_target": "3", "mirostat_lr": "0.2"}) == \
        MirostatArgs(3.0, 0.2)
    assert parse_mirostat({"mirostat_target": 5}) == MirostatArgs(5.0, 0.1)
    assert parse_mirostat({"mirostat_target": True}) == MirostatArgs(1.0, 0.1)


@pytest.mark.parametrize("extra,kwargs,named", [
    ({"mirostat_lr": 0.1}, {}, "mirostat_lr"),
    ({"mirostat_target": "x"}, {}, "mirostat_target"),
    ({"mirostat_target": math.nan}, {}, "mirostat_target"),
    ({"mirostat_target": math.inf}, {}, "mirostat_target"),
    ({"mirostat_target": 0}, {}, "mirostat_target"),
    ({"mirostat_target": -1}, {}, "mirostat_target"),
    ({"mirostat_target": [3]}, {}, "mirostat_target"),
    ({"mirostat_target": 3, "mirostat_lr": 2}, {}, "mirostat_lr"),
    ({"mirostat_target": 3}, {"temperature": 0.0}, "temperature"),
    ({"mirostat_target": 3}, {"top_k": 5}, "top_k"),
    ({"mirostat_target": 3}, {"top_p": 0.9}, "top_p"),
    ({"mirostat_target": 3}, {"min_p": 0.1}, "min_p"),
])
def test_mirostat_rejects_bad_input_naming_the_parameter(
        extra: dict[str, Any], kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ArgumentError) as info:
        parse_mirostat(extra, **kwargs)
    assert named in str(info.value)


def test_repetition_penalty_range_and_identity() -> None:
    assert parse_repetition_penalty({"repetition_penalty": "1.3"}) == 1.3
    assert parse_repetition_penalty({"repetition_penalty": 1}) is None
    for bad in (0, 2.01, "a", math.nan):
        with pytest.raises(ArgumentError):
            parse_repetition_penalty({"repetition_penalty": bad})
