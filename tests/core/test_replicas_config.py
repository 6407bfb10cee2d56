"""`replicas:` in the configuration: defaults that keep one engine, and clear errors for
bogus values (the messages name the key and say what is wrong)."""

from __future__ import annotations

from typing import Any

import pytest

from modelyard.config import ConfigError, parse_config

COMMAND = {"engine": "command", "command": ["serve", "{port}"]}


def problems(replicas: Any, **model: Any) -> str:
    document = {"models": {"coder": {**COMMAND, **model, "replicas": replicas}}}
    with pytest.raises(ConfigError) as error:
        parse_config(document, "conf.yaml", {})
    return "\n".join(error.value.problems)


def test_the_default_is_one_engine_that_scales_to_zero() -> None:
    replicas = (
        parse_config({"models": {"coder": COMMAND}}, "conf.yaml", {}).models["coder"].replicas
    )
    assert (replicas.min, replicas.max, replicas.target_in_flight) == (0, 1, 8)


@pytest.mark.parametrize(
    ("replicas", "expected"),
    [
        ({"min": 3, "max": 2}, "min (3) is larger than max (2)"),
        ({"max": 0}, "models.coder.replicas.max"),
        ({"min": -1}, "models.coder.replicas.min"),
        ({"max": 10**9}, "less than or equal to 64"),
        ({"target_in_flight": 0}, "models.coder.replicas.target_in_flight"),
        ({"target_in_flight": -5}, "greater than or equal to 1"),
        ({"max": "two"}, "models.coder.replicas.max"),
        ({"max": 2.5}, "models.coder.replicas.max"),
        ({"maximum": 2}, "maximum"),
        ("many", "models.coder.replicas"),
        ([1, 2], "models.coder.replicas"),
    ],
)
def test_bogus_replicas_are_refused_clearly(replicas: Any, expected: str) -> None:
    assert expected in problems(replicas)


def test_a_remote_engine_or_an_exclusive_member_has_one_engine() -> None:
    remote = {"engine": "remote", "url": "http://gpu-host:8001"}
    document = {"models": {"far": {**remote, "replicas": {"max": 2}}}}
    with pytest.raises(ConfigError) as error:
        parse_config(document, "conf.yaml", {})
    assert "engine 'remote' is one server" in "\n".join(error.value.problems)
    document = {
        "models": {"a": {**COMMAND, "replicas": {"max": 2}}, "b": COMMAND},
        "groups": {"one-at-a-time": {"members": ["a", "b"], "exclusive": True}},
    }
    with pytest.raises(ConfigError) as error:
        parse_config(document, "conf.yaml", {})
    assert "exclusive group 'one-at-a-time': replicas.max must be 1" in "\n".join(
        error.value.problems
    )
